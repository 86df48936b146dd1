"""Reads of the policy side that are more than one line."""
from __future__ import annotations

from typing import Any

from annotation.models import Judgment

from .models import RLHFRound
from .stats import win_rate_summary


def round_human_win_rate(*, rnd: RLHFRound) -> dict[str, Any] | None:
    """People's verdict on a round's evaluation pairs (config.evaluation.human_comparisons): a win where the
    chosen response is the new checkpoint's, a tie where it is only negligibly better or unsure. Human
    judgments only (simulated and imported ones are left out). None before any judgment."""
    if rnd.checkpoint_out_id is None:
        return None
    judgments = (Judgment.objects.filter(comparison__in=rnd.human_eval_comparisons.all(), source=Judgment.Source.HUMAN)
                 .values_list("chosen", "strength", "comparison__response_a__checkpoint_id",
                              "comparison__response_b__checkpoint_id"))
    wins = losses = ties = 0
    for chosen, strength, a_checkpoint, b_checkpoint in judgments:
        if not strength:
            ties += 1
        elif (a_checkpoint if chosen == "A" else b_checkpoint) == rnd.checkpoint_out_id:
            wins += 1
        else:
            losses += 1
    return win_rate_summary(wins, losses, ties) if wins + losses + ties else None
