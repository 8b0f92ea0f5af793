"""Tests for minimask.model.resnet: shapes/strides, published parameter counts, torchvision weight import, stride
placement, freezing, scratch init and argument validation."""
import math

import pytest
import torch
from torch import nn

from minimask.interop.torchvision_format import resnet_key
from minimask.model.norm import FrozenBatchNorm2d
from minimask.model.resnet import ResNet

ALL = ("stem", "res2", "res3", "res4", "res5")


@pytest.mark.parametrize("depth,groups,width,channels", [
    (18, 1, 64, [64, 64, 128, 256, 512]),
    (34, 1, 64, [64, 64, 128, 256, 512]),
    (18, 1, 32, [32, 32, 64, 128, 256]),  # half-width basic blocks (the CPU demo): stem and res2 follow the width
    (50, 1, 64, [64, 256, 512, 1024, 2048]),
    (50, 32, 4, [64, 256, 512, 1024, 2048]),
])
def test_output_shapes_and_strides(depth, groups, width, channels):
    model = ResNet(depth=depth, groups=groups, width_per_group=width, norm="GN", out_features=ALL).eval()
    assert model.out_channels == dict(zip(ALL, channels))
    assert model.strides == dict(zip(ALL, [4, 4, 8, 16, 32]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == list(ALL)
    for name, feat in out.items():
        s = model.strides[name]
        assert feat.shape == (1, model.out_channels[name], 64 // s, 64 // s), name


def test_odd_input_sizes_round_up_and_batch_dimension():
    model = ResNet(depth=18, norm="GN", out_features=ALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 70, 33))
    for name, feat in out.items():  # every strided layer maps n -> ceil(n / 2)
        s = model.strides[name]
        assert feat.shape == (2, model.out_channels[name], math.ceil(70 / s), math.ceil(33 / s)), name


def test_empty_batch():
    model = ResNet(depth=18, norm="GN").eval()
    with torch.no_grad():
        out = model(torch.zeros(0, 3, 32, 32))
    assert out["res5"].shape == (0, 512, 1, 1)


# Published torchvision classification models (1000-class fc, BatchNorm): sum of parameter numels.
@pytest.mark.parametrize("depth,groups,width,expected", [
    (18, 1, 64, 11_689_512),
    (34, 1, 64, 21_797_672),
    (50, 1, 64, 25_557_032),
    (101, 1, 64, 44_549_160),
    (152, 1, 64, 60_192_808),
    (50, 32, 4, 25_028_904),
    (101, 32, 8, 88_791_336),
])
def test_parameter_counts_match_torchvision(depth, groups, width, expected):
    with torch.device("meta"):  # shapes only: skips the (slow) weight init of up to 88M parameters
            model = ResNet(depth=depth, groups=groups, width_per_group=width, norm="BN", num_classes=1000,
                       out_features=("logits",))
    assert sum(p.numel() for p in model.parameters()) == expected


def _randomize_bn(module: nn.Module) -> None:
    # Non-trivial BN statistics/affine so that a mis-mapped key changes the logits.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("arch,depth,groups,width", [("resnet50", 50, 1, 64), ("resnet18", 18, 1, 64),
                                                     ("resnext50_32x4d", 50, 32, 4)])
def test_torchvision_weights_load_strictly_and_give_identical_logits(arch, depth, groups, width):
    tv = pytest.importorskip("torchvision")
    ref = getattr(tv.models, arch)(weights=None, num_classes=10)
    _randomize_bn(ref)
    ref.eval()
    model = ResNet(depth=depth, groups=groups, width_per_group=width, norm="BN", stride_in_1x1=False,
                   num_classes=10, out_features=("res4", "logits"))
    model.load_state_dict({resnet_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        got = model(x)
        expected_res4 = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
    torch.testing.assert_close(got["logits"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["res4"], expected_res4, rtol=1e-4, atol=1e-5)
    # The same weights in FrozenBatchNorm2d (fine-tuning setup): same eval-mode function.
    frozen = ResNet(depth=depth, groups=groups, width_per_group=width, norm="FrozenBN", num_classes=10,
                    out_features=("logits",))
    frozen.load_state_dict({resnet_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x)["logits"], expected, rtol=1e-4, atol=1e-4)


def test_torchvision_resnet_key():
    sd = {k: torch.zeros(1) for k in ["conv1.weight", "bn1.weight", "layer1.0.bn3.running_mean",
                                      "layer2.0.downsample.1.num_batches_tracked", "fc.bias", "layer4.2.conv2.weight"]}
    assert [resnet_key(k) for k in sd] == [
        "conv1.weight", "norm1.weight", "layer1.0.norm3.running_mean", "layer2.0.downsample.1.num_batches_tracked",
        "fc.bias", "layer4.2.conv2.weight"]


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_stride_placement(stride_in_1x1):
    model = ResNet(depth=50, norm="GN", stride_in_1x1=stride_in_1x1, out_features=("res3",))
    first = model.layer2[0]
    assert first.conv1.stride == ((2, 2) if stride_in_1x1 else (1, 1))
    assert first.conv2.stride == ((1, 1) if stride_in_1x1 else (2, 2))
    assert first.downsample[0].stride == (2, 2)
    for block in list(model.layer2)[1:] + list(model.layer1):  # only the first block of res3 is strided
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
    assert model(torch.randn(1, 3, 32, 32))["res3"].shape == (1, 512, 4, 4)


def test_groups_only_on_3x3_and_bottleneck_widths():
    with torch.device("meta"):
        model = ResNet(depth=50, groups=32, width_per_group=8, norm="GN", out_features=ALL)  # X-101's 32x8d block
    for idx, width in enumerate([256, 512, 1024, 2048]):
        block = getattr(model, f"layer{idx + 1}")[0]
        assert block.conv1.out_channels == width and block.conv1.groups == 1
        assert block.conv2.groups == 32 and block.conv2.in_channels == width
        assert block.conv3.groups == 1 and block.conv3.out_channels == 256 * 2 ** idx


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at(freeze_at):
    model = ResNet(depth=18, norm="BN", freeze_at=freeze_at, out_features=ALL)
    frozen = ["conv1", "norm1"][: 2 * (freeze_at >= 1)] + [f"layer{i}" for i in range(1, freeze_at)]

    def is_frozen(name):
        return any(name == f or name.startswith(f + ".") for f in frozen)

    for name, p in model.named_parameters():
        assert p.requires_grad == (not is_frozen(name)), name
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            assert isinstance(m, FrozenBatchNorm2d) == is_frozen(name), name
            assert is_frozen(name) or isinstance(m, nn.BatchNorm2d), name
    n_frozen_bn = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # R18 norms: stem 1; layer1 4; layer2..4: 5 each (2 blocks x 2 + shortcut).
    assert n_frozen_bn == [0, 1, 5, 10, 15, 20][freeze_at]


def test_frozen_stages_get_no_gradient():
    model = ResNet(depth=18, norm="GN", freeze_at=2, out_features=("res3",))
    model(torch.randn(2, 3, 32, 32))["res3"].sum().backward()
    assert model.conv1.weight.grad is None and model.layer1[0].conv1.weight.grad is None
    assert isinstance(model.layer1[0].norm1, nn.GroupNorm)  # GN has no statistics to freeze: stays GN
    assert all(p.grad is not None for p in model.layer2.parameters())  # and nothing built is unused


@pytest.mark.parametrize("bad", [-1, 6, 1.5])
def test_freeze_at_out_of_range(bad):
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(depth=18, freeze_at=bad)


def test_scratch_init_statistics():
    torch.manual_seed(0)
    model = ResNet(depth=50, norm="GN", out_features=ALL)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 16 * 3 + 4  # stem + 3 per bottleneck + 4 shortcuts
    for m in norms:  # no zero-init of the last norm in a block: every gamma is 1, every beta 0
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        assert m.num_groups == 32
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None, name
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / fan_out), fan_out = out_channels * kh * kw.
    for conv in [model.layer4[0].conv2, model.layer4[1].conv3, model.layer3[0].downsample[0], model.conv1]:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
        assert abs(conv.weight.mean().item()) < 0.05 * math.sqrt(2 / fan_out)


def test_no_norm_uses_conv_bias_and_fc_init():
    model = ResNet(depth=18, norm=None, num_classes=7, out_features=("res2", "logits"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None and torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert isinstance(model.norm1, nn.Identity) and isinstance(model.layer2[0].downsample[1], nn.Identity)
    assert model.fc.weight.shape == (7, 512) and torch.equal(model.fc.bias, torch.zeros(7))
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)  # detectron2: normal(std=0.01)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 7) and out["res2"].shape == (2, 64, 8, 8)
    assert model.out_channels == {"res2": 64} and model.strides == {"res2": 4}


def test_outputs_and_attributes_in_network_order():
    model = ResNet(depth=18, norm="GN", out_features=("res4", "stem", "res2"))
    assert list(model.out_channels) == list(model.strides) == ["stem", "res2", "res4"]
    assert list(model(torch.randn(1, 3, 32, 32))) == ["stem", "res2", "res4"]


def test_stages_after_last_requested_are_not_built():
    full = ResNet(depth=18, norm="GN", out_features=ALL).eval()
    part = ResNet(depth=18, norm="GN", out_features=("stem", "res3")).eval()
    assert not hasattr(part, "layer3") and not hasattr(part, "layer4") and not hasattr(part, "fc")
    part.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("layer3", "layer4"))})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, ref = part(x), full(x)
    assert list(got) == ["stem", "res3"]
    torch.testing.assert_close(got["res3"], ref["res3"], rtol=0, atol=0)
    stem_only = ResNet(depth=50, out_features=("stem",))
    assert not hasattr(stem_only, "layer1") and stem_only(x)["stem"].shape == (1, 64, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=42), "42"),
    (dict(depth=18, groups=32, width_per_group=4), "groups=32"),
    (dict(depth=34, width_per_group=0), "width_per_group"),
    (dict(depth=50, groups=0), "groups"),
    (dict(depth=50, width_per_group=-4), "width_per_group"),
    (dict(depth=18, stride_in_1x1=True), "stride_in_1x1"),
    (dict(out_features=("res2", "res6")), "res6"),
    (dict(out_features="res2"), "res2"),
    (dict(out_features=()), "at least one"),
    (dict(out_features=("res2", "res2")), "duplicates"),
    (dict(out_features=("logits",)), "num_classes"),
    (dict(num_classes=10), "logits"),
    (dict(num_classes=0, out_features=("logits",)), "num_classes"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


def test_bad_input_shape():
    model = ResNet(depth=18, out_features=("stem",))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
