"""The reward models' ranking loss (Llama 2, section 3.2.2), with its margin and optional centering.

    L = -log(sigmoid(r_chosen - r_rejected - m(strength)))  +  center_coef * (r_chosen + r_rejected)^2

The margin asks for a wider reward gap where annotators said one response was clearly better. The
centering term (Eisenstein et al. 2023, "Helping or Herding?"; TRL's ``center_rewards_coefficient``)
pins the otherwise free offset of the rewards near zero, which keeps reward scales comparable across
runs. ``logsigmoid`` is used instead of ``log(sigmoid(.))``: the latter underflows to log(0) = -inf once
the gap is below about -100, the former stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Margin per strength (3 significantly better, 2 better, 1 slightly better, 0 negligibly better / unsure).
MARGINS: dict[str, dict[int, float]] = {
    "none": {3: 0.0, 2: 0.0, 1: 0.0, 0: 0.0},
    "small": {3: 1.0, 2: 2 / 3, 1: 1 / 3, 0: 0.0},
    "large": {3: 3.0, 2: 2.0, 1: 1.0, 0: 0.0},
}


def margin_for(strength: int | None, scale: str) -> float:
    """The margin of one pair. Unknown strength (imported data) gets 0: no claim about how much better."""
    if scale not in MARGINS:
        raise ValueError(f"margin scale must be one of {', '.join(MARGINS)}, not {scale!r}")
    if strength is None:
        return 0.0
    if strength not in MARGINS[scale]:
        raise ValueError(f"strength must be 0..3 or None, not {strength!r}")
    return MARGINS[scale][strength]


def margins_for(strengths: Sequence[int | None], scale: str, row_margins: Sequence[float] | None = None) -> list[float]:
    """Margins of a batch. scale "row" takes each row's own ``margin`` field (as the export computed it)."""
    if scale == "row":
        if row_margins is None or len(row_margins) != len(strengths):
            raise ValueError("margin scale 'row' needs one row margin per pair")
        return [float(m) for m in row_margins]
    return [margin_for(s, scale) for s in strengths]


def pairwise_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> Tensor:
    """Per-pair loss (B,) for rewards (B,) of the chosen and rejected responses and margins (B,).

    Per pair rather than averaged, so a training step can sum over the pairs of all its micro-batches
    and processes and divide once by the step's pair count: the exact mean whatever the sharding.
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"rewards must be two (B,) tensors, got {tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")
    gap = r_chosen - r_rejected
    if margin is not None:
        gap = gap - margin.to(gap.dtype)
    loss = -F.logsigmoid(gap)  # = log(1 + exp(-gap)), stable for any gap
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def preference_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> Tensor:
    """Mean loss over the batch: -log(sigmoid(r_c - r_r - m)) + center_coef * (r_c + r_r)^2."""
    return pairwise_loss(r_chosen, r_rejected, margin, center_coef).mean()


def margin_tensor(
    strengths: Sequence[int | None], scale: str, row_margins: Sequence[float] | None = None, device=None
) -> Tensor | None:
    """Margins (B,) in float32 on device, or None when the scale is "none" (saves the subtraction)."""
    if scale == "none":
        return None
    return torch.tensor(margins_for(strengths, scale, row_margins), dtype=torch.float32, device=device)
