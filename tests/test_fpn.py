"""Tests for minimask.model.fpn: shapes/strides, P6, norm/bias layout, init, the top-down wiring (by hand) and the
size contract."""
import math

import pytest
import torch
from torch import nn

from minimask.model.fpn import FPN
from minimask.model.resnet import ResNet


def _features(batch, channels, size):
    """C2..C5 for an image of `size` x `size`: strides 4, 8, 16, 32."""
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(channels, [4, 8, 16, 32])]


def test_output_shapes_and_strides():
    fpn = FPN(in_channels=[8, 16, 32, 64], out_channels=16)
    assert fpn.out_channels == 16 and fpn.strides == [4, 8, 16, 32, 64]
    outs = fpn(_features(2, [8, 16, 32, 64], 128))
    assert len(outs) == 5
    for p, s in zip(outs, fpn.strides):
        assert p.shape == (2, 16, 128 // s, 128 // s)


def test_p6_is_p5_subsampled():
    fpn = FPN(in_channels=[4, 4, 4, 4], out_channels=8)
    for size in (64, 96):  # P5 2x2 and 3x3 (odd: P6 keeps ceil(3 / 2) = 2 rows)
        outs = fpn(_features(1, [4] * 4, size))
        assert torch.equal(outs[4], outs[3][..., ::2, ::2])
        assert outs[4].shape[-1] == math.ceil(outs[3].shape[-1] / 2)


def test_default_has_conv_bias_and_xavier_fill_init():
    torch.manual_seed(0)
    fpn = FPN(in_channels=[256, 512, 1024, 2048], out_channels=256)
    convs = list(fpn.lateral_convs) + list(fpn.output_convs)
    assert all(isinstance(n, nn.Identity) for n in list(fpn.lateral_norms) + list(fpn.output_norms))
    for conv in convs:
        assert conv.bias is not None and torch.equal(conv.bias, torch.zeros_like(conv.bias))
        # c2_xavier_fill = kaiming_uniform_(a=1): U(-b, b) with b = sqrt(3 / fan_in), std b / sqrt(3).
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(3 / fan_in)
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert [c.kernel_size for c in fpn.lateral_convs] == [(1, 1)] * 4
    assert [c.kernel_size for c in fpn.output_convs] == [(3, 3)] * 4


def test_norm_variant_has_no_conv_bias():
    fpn = FPN(in_channels=[32, 64, 96, 128], out_channels=64, norm="GN")
    for conv in list(fpn.lateral_convs) + list(fpn.output_convs):
        assert conv.bias is None
    for n in list(fpn.lateral_norms) + list(fpn.output_norms):
        assert isinstance(n, nn.GroupNorm) and n.num_channels == 64 and n.num_groups == 32
    outs = fpn(_features(2, [32, 64, 96, 128], 64))
    assert [tuple(p.shape) for p in outs] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2),
                                              (2, 64, 1, 1)]


def _identity_like(fpn, lateral_scales):
    """Lateral 1x1 convs multiply level k by lateral_scales[k]; output 3x3 convs are the identity; no bias."""
    with torch.no_grad():
        for conv, scale in zip(fpn.lateral_convs, lateral_scales):
            conv.weight.fill_(scale)
            conv.bias.zero_()
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()


def test_top_down_by_hand():
    fpn = FPN(in_channels=[1, 1, 1, 1], out_channels=1)
    _identity_like(fpn, [1.0, 1.0, 1.0, 1.0])
    c5 = torch.tensor([[[[5.0]]]])
    c4 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    c3 = torch.zeros(1, 1, 4, 4)
    c3[0, 0, 0, 0] = 100.0
    c2 = torch.zeros(1, 1, 8, 8)
    p2, p3, p4, p5, p6 = fpn([c2, c3, c4, c5])
    assert p5.tolist() == [[[[5.0]]]]
    assert p4.tolist() == [[[[6.0, 7.0], [8.0, 9.0]]]]  # C4 + P5 copied to every pixel
    assert p3.tolist() == [[[[106.0, 6.0, 7.0, 7.0],  # C3 + each P4 pixel copied to a 2x2 block
                             [6.0, 6.0, 7.0, 7.0],
                             [8.0, 8.0, 9.0, 9.0],
                             [8.0, 8.0, 9.0, 9.0]]]]
    assert p2[0, 0, :2, :2].tolist() == [[106.0, 106.0], [106.0, 106.0]]
    assert p2[0, 0, 6:, 6:].tolist() == [[9.0, 9.0], [9.0, 9.0]]
    assert p2[0, 0, 0, 2:4].tolist() == [6.0, 6.0]
    assert p6.tolist() == [[[[5.0]]]]


def test_top_down_matches_brute_force_with_distinct_levels():
    # Distinct lateral scales expose any level mix-up; repeat_interleave is an independent nearest-2x upsample.
    fpn = FPN(in_channels=[1, 1, 1, 1], out_channels=1)
    scales = [1.0, 10.0, 100.0, 1000.0]
    _identity_like(fpn, scales)
    feats = _features(2, [1] * 4, 64)
    outs = fpn(feats)
    expected = [None] * 4
    expected[3] = scales[3] * feats[3]
    for k in (2, 1, 0):
        up = expected[k + 1].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        expected[k] = scales[k] * feats[k] + up
    for got, want in zip(outs[:4], expected):
        torch.testing.assert_close(got, want)


def test_empty_batch():
    fpn = FPN(in_channels=[4, 4, 4, 4], out_channels=8)
    outs = fpn(_features(0, [4] * 4, 64))
    assert [tuple(p.shape) for p in outs] == [(0, 8, 16, 16), (0, 8, 8, 8), (0, 8, 4, 4), (0, 8, 2, 2),
                                              (0, 8, 1, 1)]


def test_on_resnet_features():
    backbone = ResNet(depth=18, norm="GN").eval()
    names = ["res2", "res3", "res4", "res5"]
    fpn = FPN(in_channels=[backbone.out_channels[n] for n in names], out_channels=32, norm="GN")
    assert [backbone.strides[n] for n in names] == fpn.strides[:4]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 96, 64))  # multiples of 32
        outs = fpn([feats[n] for n in names])
    assert [tuple(p.shape[-2:]) for p in outs] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)]


def test_invalid_arguments_and_inputs():
    with pytest.raises(ValueError, match="4 entries"):
        FPN(in_channels=[8, 16, 32])
    with pytest.raises(ValueError, match="positive"):
        FPN(in_channels=[8, 16, 32, 0])
    fpn = FPN(in_channels=[4, 4, 4, 4], out_channels=8)
    good = _features(1, [4] * 4, 64)
    with pytest.raises(ValueError, match="4 feature maps"):
        fpn(good[:3])
    with pytest.raises(ValueError, match=r"C3"):
        fpn([good[0], torch.randn(1, 5, 8, 8), good[2], good[3]])
    with pytest.raises(ValueError, match="twice"):  # a 65-pixel image: C2 17x17 vs C3 8x8
        fpn([torch.randn(1, 4, 17, 17), good[1], good[2], good[3]])
    with pytest.raises(ValueError, match="twice"):  # mismatched batch sizes
        fpn([torch.randn(2, 4, 16, 16), good[1], good[2], good[3]])
