"""box_regression_loss: hand-computed L1 / smooth-L1 sums, the beta -> L1 limit, empty input, bad arguments."""
import pytest
import torch
import torch.nn.functional as F

from minimask.losses import box_regression_loss


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
