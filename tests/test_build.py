"""build_model: random initialisation of every layer as in detectron2 (spec section 1.4), nothing frozen.

Rules (spec 1.4; FV `weight_init.py`, D2 `resnet.py`, `fpn.py`, `rpn.py`, `box_head.py`, `fast_rcnn.py`,
`mask_head.py`, `keypoint_head.py`):
  msra    = c2_msra_fill: kaiming_normal_(fan_out, relu), std sqrt(2 / fan_out): ResNet convs, box-head convs,
            mask-head convs and deconv, every keypoint-head weight;
  xavier  = c2_xavier_fill: kaiming_uniform_(a=1), U(+-sqrt(3 / fan_in)): FPN convs, box-head fcs;
  normal  = normal(std): RPN convs 0.01, cls_score 0.01, bbox_pred 0.001, mask predictor 0.001;
  every bias 0; every norm gamma 1 and beta 0 (no zero-init of the last gamma in a block); BN statistics 0 / 1.
fan_out / fan_in as torch computes them (dim 0 / dim 1 times the kernel area), which is what D2's calls get, also
for ConvTranspose2d. Tolerances are ~5 standard errors at a fixed seed.
"""
import math
import re

import pytest
import torch
from torch import nn

import minimask
from minimask.config import PRESETS, get_config
from minimask.engine.initialization import check_init_config
from minimask.model.norm import FrozenBatchNorm2d

_SMALL_HEADS = ["model.fpn.out_channels=64", "model.box_head.fc_dims=(256,)", "model.roi_heads.num_classes=5",
                "model.keypoint_head.conv_dims=(64, 64)"]

_RULES = [  # (module-name regex, module type, kind) — first match wins
    (r"^backbone\.", nn.Conv2d, "msra"),
    (r"^fpn\.(lateral|output)_convs\.\d+$", nn.Conv2d, "xavier"),
    (r"^rpn\.head\.(conv|objectness_logits|anchor_deltas)$", nn.Conv2d, ("normal", 0.01)),
    (r"^roi_heads\.box_head\.", nn.Conv2d, "msra"),
    (r"^roi_heads\.box_head\.", nn.Linear, "xavier"),
    (r"^roi_heads\.box_predictor\.(\d+\.)?cls_score$", nn.Linear, ("normal", 0.01)),
    (r"^roi_heads\.box_predictor\.(\d+\.)?bbox_pred$", nn.Linear, ("normal", 0.001)),
    (r"^roi_heads\.mask_head\.predictor$", nn.Conv2d, ("normal", 0.001)),
    (r"^roi_heads\.mask_head\.(convs\.\d+|deconv)$", (nn.Conv2d, nn.ConvTranspose2d), "msra"),
    (r"^roi_heads\.keypoint_head\.(convs\.\d+|deconv)$", (nn.Conv2d, nn.ConvTranspose2d), "msra"),
]


def _small(preset: str) -> list[str]:
    groups = get_config(preset).model.backbone.groups
    return _SMALL_HEADS + [f"model.backbone.width_per_group={1 if groups > 1 else 32}",
                           f"model.box_head.conv_dims={tuple(64 for _ in get_config(preset).model.box_head.conv_dims)}",
                           "model.mask_head.conv_dims=(64, 64, 64, 64)"]


def _check_weight(name: str, w: torch.Tensor, kind) -> None:
    w = w.detach().double().flatten(1) if w.dim() > 1 else w.detach().double()
    n = w.numel()
    mean, std = w.mean().item(), w.std().item()
    kurtosis = (((w - mean) / std) ** 4).mean().item()
    if isinstance(kind, tuple):
        expected_std, shape = kind[1], "normal"
    elif kind == "msra":
        expected_std, shape = _FAN[name][1], "normal"
    else:
        expected_std, shape = _FAN[name][0], "uniform"
        assert w.abs().max().item() <= math.sqrt(3) * expected_std + 1e-12, f"{name}: beyond the XavierFill bound"
    assert abs(mean) < 5 * expected_std / math.sqrt(n), f"{name}: mean {mean:.3g}"
    assert abs(std / expected_std - 1) < 5 / math.sqrt(2 * n) + 0.01, \
        f"{name}: std {std:.4g}, expected {expected_std:.4g}"
    if n >= 2000:  # normal: kurtosis 3; uniform: 1.8
        assert (kurtosis > 2.5) == (shape == "normal"), f"{name}: kurtosis {kurtosis:.2f} for a {shape} init"


_FAN: dict[str, tuple[float, float]] = {}  # name -> (xavier std sqrt(1 / fan_in), msra std sqrt(2 / fan_out))


def check_detectron2_init(model: nn.Module) -> None:
    """Assert that every parameter and buffer of `model` has detectron2's scratch init (see the module docstring)."""
    covered = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase)):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), f"{name}: gamma is not 1"
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), f"{name}: beta is not 0"
            if getattr(module, "running_mean", None) is not None:
                assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
                assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
            covered |= {id(module.weight), id(module.bias)}
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            kind = next((k for pattern, types, k in _RULES if re.search(pattern, name) and isinstance(module, types)),
                        None)
            assert kind is not None, f"{name} ({type(module).__name__}) is a layer the init rules do not know"
            w = module.weight
            area = w.shape[2:].numel()
            _FAN[name] = (math.sqrt(1 / (w.shape[1] * area)), math.sqrt(2 / (w.shape[0] * area)))
            _check_weight(name, w, kind)
            covered.add(id(w))
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), f"{name}: bias is not 0"
                covered.add(id(module.bias))
        else:
            assert not isinstance(module, FrozenBatchNorm2d), f"{name}: FrozenBN in a random-init model"
    uncovered = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not uncovered, f"parameters no init rule checked: {uncovered}"


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []),
    ("r50_fpn_gn", None),
    ("r50_fpn_syncbn", None),
    ("tiny_keypoint", []),
    ("r50_fpn_gn_cascade", None),
])
def test_random_init_follows_detectron2(preset, overrides):
    torch.manual_seed(0)
    cfg = get_config(preset, _small(preset) if overrides is None else overrides)
    check_init_config(cfg, "random")
    check_detectron2_init(minimask.build_model(cfg))


def test_the_checker_catches_a_wrong_init():
    torch.manual_seed(0)
    model = minimask.build_model(get_config("tiny"))
    nn.init.kaiming_uniform_(model.fpn.output_convs[0].weight, a=math.sqrt(5))  # torch's default conv init
    with pytest.raises(AssertionError, match="fpn.output_convs.0"):
        check_detectron2_init(model)
    model = minimask.build_model(get_config("tiny"))
    nn.init.zeros_(model.backbone.layer1[0].norm2.weight)  # zero-init of a block's gamma
    with pytest.raises(AssertionError, match="gamma"):
        check_detectron2_init(model)
    model = minimask.build_model(get_config("tiny"))
    nn.init.normal_(model.roi_heads.box_predictor.bbox_pred.weight, std=0.01)
    with pytest.raises(AssertionError, match="bbox_pred"):
        check_detectron2_init(model)


# The paper's presets (every one trains from random init); the ImageNet / torchvision fine-tuning presets are not.
PAPER_PRESETS = [p for p in PRESETS if re.match(r"(r50|r101|x101_32x8d|x152_32x8d)_fpn_(gn|syncbn)", p)
                 or p.startswith(("tiny", "demo"))]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_random_init_preset_trains_everything(preset):
    cfg = get_config(preset, _small(preset) if not preset.startswith(("tiny", "demo")) else [])
    check_init_config(cfg, "random")
    model = minimask.build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def test_paper_presets_pass_and_the_frozen_bn_baseline_is_refused_under_random_init():
    assert len(PAPER_PRESETS) >= 10 and "r50_fpn_frozenbn" not in PAPER_PRESETS
    for preset in PAPER_PRESETS:
        check_init_config(get_config(preset), "random")
    with pytest.raises(ValueError, match="model.backbone.norm=FrozenBN"):
        check_init_config(get_config("r50_fpn_frozenbn"), "random")


def test_compile_backbone_compiles_in_place_and_keeps_parameter_names():
    plain = minimask.build_model(minimask.get_config("tiny"))
    compiled = minimask.build_model(minimask.get_config("tiny", ["model.compile_backbone=True"]))
    assert compiled.backbone._compiled_call_impl is not None and compiled.fpn._compiled_call_impl is not None
    assert plain.backbone._compiled_call_impl is None and plain.rpn._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way
