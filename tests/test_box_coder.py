"""Box coder: hand-computed deltas, the encode/decode round trip, and the decode clamp."""
import math

import pytest
import torch

from minimask.ops.box_coder import SCALE_CLAMP, decode, encode


def test_encode_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size (10, 20)
    targets = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), size (20, 20)
    expected = torch.tensor([[0.7, 0.2, math.log(2.0), 0.0]])
    torch.testing.assert_close(encode(targets, boxes), expected)
    torch.testing.assert_close(encode(targets, boxes, (10, 10, 5, 5)), expected * torch.tensor([10, 10, 5, 5]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0)])
def test_decode_inverts_encode(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50 + 1], 1)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    targets = torch.cat([xy, xy + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50 + 1], 1)
    deltas = encode(targets, boxes, weights)
    torch.testing.assert_close(decode(deltas, boxes, weights), targets)


def test_decode_class_specific_and_clamp():
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, 100.0]])  # two classes; the second explodes
    out = decode(deltas, boxes)
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[:, :4], boxes)
    side = 16 * math.exp(SCALE_CLAMP)  # == 1000: the clamp caps growth at 1000/16
    torch.testing.assert_close(out[:, 4:], torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]]))
    assert torch.isfinite(out).all()


def test_decode_runs_in_fp32_for_half_deltas():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert decode(torch.zeros(1, 4, dtype=torch.float16), boxes).dtype == torch.float32
    assert decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="deltas"):
        decode(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="boxes"):
        decode(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="targets and boxes"):
        encode(torch.zeros(2, 4), torch.zeros(3, 4))
