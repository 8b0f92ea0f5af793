"""Initial weights for training: a backbone from ImageNet classification (`--init imagenet`) or a whole detector
(`--init checkpoint`), read with `torch.load(weights_only=True)` so that a crafted file cannot run code.

Errors are ValueErrors whose message names the file and what is wrong with it (train.py turns them into a one-line
error and exit code 2).
"""
from __future__ import annotations

from pathlib import Path

import torch


def load_initial_weights(model, init: str, path: str) -> None:
    """--init imagenet: a backbone state dict, strict=False with the differences reported; --init checkpoint: a
    whole model (state dict or {"model": ...}), strict. Both with weights_only loading."""
    if not Path(path).is_file():
        raise ValueError(f"--weights: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a weights-only checkpoint"
        raise ValueError(f"--weights: cannot load {path} as a weights-only checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights: {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        if init == "imagenet":
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
            missing, unexpected = model.backbone.load_state_dict(state, strict=False)
            print(f"ImageNet init from {path}: {len(missing)} missing keys {missing[:5]}, "
                  f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        else:
            model.load_state_dict(state, strict=True)
            print(f"initialised the whole model from {path}")
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"--weights: {path} does not fit the model: {detail}") from None
