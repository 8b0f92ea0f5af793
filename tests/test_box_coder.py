"""Box coder: hand-computed deltas, the encode/decode round trip, the decode clamp; box_regression_loss:
hand-computed L1 / smooth-L1 sums, the beta -> L1 limit, empty input, bad arguments."""
import math

import pytest
import torch
import torch.nn.functional as F

from minimask.ops.box_coder import SCALE_CLAMP, box_regression_loss, decode, encode


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


def test_l1_hand_computed():
    pred = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    target = torch.tensor([[0.0, 1.0, 2.5, 0.0]])
    # |0.5| + |-2| + |-0.5| + 0 = 3.0
    torch.testing.assert_close(box_regression_loss(pred, target, "l1"), torch.tensor(3.0))


def test_smooth_l1_hand_computed():
    pred = torch.tensor([[0.05, -1.0, 2.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    target = torch.zeros(2, 4)
    beta = 0.2
    # |x| < beta: 0.5 x^2 / beta; else |x| - beta / 2.
    expected = 0.5 * 0.05**2 / 0.2 + (1.0 - 0.1) + (2.0 - 0.1) + 0.0 + 0.5 * 0.1**2 / 0.2
    torch.testing.assert_close(box_regression_loss(pred, target, "smooth_l1", beta), torch.tensor(expected))
    # torch's own smooth_l1_loss as a second oracle
    torch.testing.assert_close(box_regression_loss(pred, target, "smooth_l1", beta),
                               F.smooth_l1_loss(pred, target, beta=beta, reduction="sum"))


def test_tiny_beta_is_l1():
    pred = torch.tensor([[1e-7, -3.0, 0.25, 4.0]])
    target = torch.zeros(1, 4)
    assert box_regression_loss(pred, target, "smooth_l1", 0.0) == box_regression_loss(pred, target, "l1")
    assert box_regression_loss(pred, target, "smooth_l1", 1e-6) == box_regression_loss(pred, target, "l1")


def test_empty_is_zero_and_in_graph():
    pred = torch.randn(5, 4, requires_grad=True)
    for kind, beta in (("l1", 0.0), ("smooth_l1", 1.0 / 9)):
        loss = box_regression_loss(pred[:0], torch.zeros(0, 4), kind, beta)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.equal(grad, torch.zeros(5, 4))


def test_gradient_l1():
    pred = torch.tensor([[0.5, -1.0, 0.0, 3.0]], requires_grad=True)
    box_regression_loss(pred, torch.tensor([[0.0, 0.0, 0.0, 4.0]]), "l1").backward()
    assert pred.grad.tolist() == [[1.0, -1.0, 0.0, -1.0]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        box_regression_loss(torch.zeros(1, 4), torch.zeros(1, 4), "giou")
    with pytest.raises(ValueError, match="same shape"):
        box_regression_loss(torch.zeros(1, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="beta"):
        box_regression_loss(torch.zeros(1, 4), torch.zeros(1, 4), "smooth_l1", -1.0)
