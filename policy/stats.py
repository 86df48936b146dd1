"""Small statistics the loop reports with its win rates. Plain Python: the web side and the workers share it.

A win rate here counts a tie as half a win, as Chatbot Arena and policy.demo_world.win_rate do. Its
95% interval is Wilson's score interval on (wins + ties / 2) out of n: it stays inside [0, 1] and is
honest for small n and rates near 0 or 1, where the normal approximation is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (z = 1.96: 95%); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(wins: int, losses: int) -> float:
    """P(at least `wins` successes in wins + losses fair coin flips): one-sided, exact; ties are left out."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def win_rate_summary(wins: int, losses: int, ties: int) -> dict[str, Any]:
    """The row every win rate of the loop is reported as: counts, rate (ties half), Wilson 95% CI, sign test."""
    n = wins + losses + ties
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "losses": losses, "ties": ties, "n": n,
            "ci95": [round(lo, 4), round(hi, 4)], "sign_test_p": sign_test_p(wins, losses)}


def verdict_of(summary: Mapping[str, Any] | None) -> str:
    """"improved" when the whole 95% CI is above one half, "regression" when it is entirely below, else
    "no_difference"; "" without a summary."""
    if not summary or not summary.get("n"):
        return ""
    lo, hi = summary["ci95"]
    return "improved" if lo > 0.5 else "regression" if hi < 0.5 else "no_difference"
