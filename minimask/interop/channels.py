"""Fitting 3-channel (RGB) weights to a model of another input: thermal (1 channel) or RGB + thermal (4).

ImageNet backbones and detectors trained on colour images have a first convolution with 3 input channels; a
multispectral model (`minimask.data.images.load_frames`) has C. Only that layer and the pixel normalisation differ; the
rule used for `--init imagenet` and for `--init checkpoint` from a 3-channel detector alike:

- filters: the visible channels keep the RGB filters; the thermal channel gets the mean of the three RGB filters
  (the filter a grey image sees); then all C are scaled by 3 / C. A scene that looks the same in every channel
  (a grey image, and a thermal frame equal to its brightness) then gives exactly the response of the 3-channel
  layer to the grey image: for C = 1 the thermal filter is the sum of the RGB filters, for C = 4 the RGB filters
  and their mean are scaled by 3/4, so activations keep their scale at the start of fine-tuning. (The same idea
  as the "cross-modality" initialisation of Wang et al., "Temporal Segment Networks", ECCV 2016, Sec. 3.2, which
  averages RGB filters for optical-flow input.)
- normalisation: the thermal channel is normalised like a grey version of the visible ones, with the mean of the
  three channels' pixel means and of their stds, which the filter rule above assumes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minimask.data.images import modalities_of

RULE = "visible filters kept, thermal filter = the mean of the 3 RGB filters, all scaled by 3/C"


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """(O, 3, k, k) filters of an RGB layer -> (O, C, k, k) for a C-channel input (module docstring's rule), in
    the model's channel order: the visible channels (in the weights' own order, BGR or RGB), then thermal."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected the (O, 3, k, k) weight of a 3-channel first convolution, got "
                         f"{tuple(weight.shape)}")
    layout = modalities_of(in_channels)
    parts = [weight] * ("visible" in layout) + [weight.mean(dim=1, keepdim=True)] * ("thermal" in layout)
    return torch.cat(parts, dim=1) * (3.0 / in_channels)  # (O, C, k, k)


def adapt_pixel_values(values, in_channels: int) -> tuple[float, ...]:
    """3 per-channel values (pixel mean or std) -> C: the visible ones, then their mean for thermal."""
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values}")
    layout = modalities_of(in_channels)
    return tuple(values * ("visible" in layout) + [sum(values) / 3] * ("thermal" in layout))


def conventions_for_channels(conventions: dict, in_channels: int) -> dict:
    """ImageNet weights' conventions (`imagenet_conventions`) for a model of `in_channels` input channels."""
    out = dict(conventions)
    if in_channels != 3:
        for key in ("model.pixel_mean", "model.pixel_std"):
            if key in out:
                out[key] = adapt_pixel_values(out[key], in_channels)
    return out


def adapt_detector_state(state: dict, in_channels: int) -> tuple[dict, str | None]:
    """A 3-channel detector's state dict for a C-channel model: `backbone.conv1.weight` and the `pixel_mean` /
    `pixel_std` buffers adapted by the rule; other entries untouched. Returns (state, a note or None)."""
    weight = state.get("backbone.conv1.weight")
    if in_channels == 3 or weight is None or weight.shape[1] != 3:
        return state, None
    state = dict(state)
    state["backbone.conv1.weight"] = adapt_first_conv(weight, in_channels)
    for key in ("pixel_mean", "pixel_std"):
        if key in state and state[key].numel() == 3:
            state[key] = torch.tensor(adapt_pixel_values(state[key].flatten().tolist(), in_channels),
                                      dtype=state[key].dtype).view(-1, 1, 1)
    return state, f"the 3-channel first convolution adapted to a {in_channels}-channel input ({RULE})"
