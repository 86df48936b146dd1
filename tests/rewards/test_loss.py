"""rewards.loss against the formula written out by hand in float64, value and gradient."""

import math

import pytest
import torch

from rewards.loss import margin_for, margin_tensor, margins_for, pairwise_loss, preference_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("center_coef", [0.0, 0.05])
def test_loss_and_gradient_match_hand_computation(center_coef: float) -> None:
    rc = torch.tensor([1.5, -0.2, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.5, 0.4, 0.3, -1.0], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1.0, 2 / 3, 0.0, 1 / 3], dtype=torch.float64)
    loss = preference_loss(rc, rr, m, center_coef)
    loss.backward()

    n = 4
    expected_loss = 0.0
    for i in range(n):
        c, r, mi = rc[i].item(), rr[i].item(), m[i].item()
        d = c - r - mi
        s = c + r
        expected_loss += (-math.log(_sigmoid(d)) + center_coef * s * s) / n
        # d/dr_c of -log(sigmoid(d)) is -(1 - sigmoid(d)); d/dr_r is +(1 - sigmoid(d)); centering adds 2 c s.
        assert rc.grad[i].item() == pytest.approx((-(1 - _sigmoid(d)) + 2 * center_coef * s) / n, abs=1e-14)
        assert rr.grad[i].item() == pytest.approx(((1 - _sigmoid(d)) + 2 * center_coef * s) / n, abs=1e-14)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-14)


def test_margin_is_subtracted_from_the_gap() -> None:
    rc, rr = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5])
    with_margin = pairwise_loss(rc, rr, torch.tensor([1.0, 0.25]))
    shifted = pairwise_loss(rc - torch.tensor([1.0, 0.25]), rr)
    torch.testing.assert_close(with_margin, shifted)
    assert with_margin[0].item() == pytest.approx(math.log(2))  # gap 0: -log(1/2)


def test_stable_for_extreme_gaps() -> None:
    rc = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    rr = torch.zeros(2, requires_grad=True)
    losses = pairwise_loss(rc, rr)
    assert losses.tolist() == pytest.approx([1000.0, 0.0])
    losses.sum().backward()
    assert rc.grad.tolist() == pytest.approx([-1.0, 0.0]) and torch.isfinite(rr.grad).all()
    # The naive form underflows: what logsigmoid protects against.
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-1000.0))))


def test_margin_scales_by_strength() -> None:
    assert [margin_for(s, "small") for s in (3, 2, 1, 0)] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [margin_for(s, "large") for s in (3, 2, 1, 0)] == [3, 2, 1, 0]
    assert [margin_for(s, "none") for s in (3, 2, 1, 0)] == [0, 0, 0, 0]
    assert margin_for(None, "large") == 0.0  # imported data: strength unknown
    assert margins_for([3, None], "row", [0.5, 0.25]) == [0.5, 0.25]
    assert margin_tensor([3, 1], "none") is None
    assert margin_tensor([3, 1], "large").tolist() == [3.0, 1.0]
    with pytest.raises(ValueError):
        margin_for(4, "small")
    with pytest.raises(ValueError):
        margin_for(1, "huge")
    with pytest.raises(ValueError):
        margins_for([1, 2], "row", [0.5])
