"""Reward-model evaluation as plain JSON-able dicts.

For a list of preference rows: accuracy (does the chosen response get the higher reward?), overall
and per strength bucket in the layout of the Llama 2 paper's Table 8 (significantly better / better /
slightly better / negligibly better or unsure, plus "unknown" for imported pairs without a
strength), per safety bin, per batch and per source; calibration (accuracy against bins of the
model's confidence sigmoid(|r_c - r_r|), which is monotone in the reward gap, with the expected
calibration error); the distributions of chosen and rejected rewards; and, on the same rows, a
length-only baseline that always prefers the longer response, so a report can show how much the
model knows beyond length.

Ties (equal rewards, equal lengths) count as half right: a coin flip's expected accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rewards.data import encode_response, response_text

STRENGTH_BUCKETS = {
    3: "significantly_better",
    2: "better",
    1: "slightly_better",
    0: "negligibly_better_or_unsure",
    None: "unknown",
}
# Confidence sigmoid(|gap|) bin edges; in reward-gap terms 0, 0.41, 0.85, 1.39, 2.20, inf.
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def score_pairs(model, tokenizer, rows: Sequence[Mapping], *, batch_size: int = 32,
                max_seq_len: int | None = None) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and of the rejected response of every row, encoded as in training."""
    from rewards.model import rewards_of  # torch only where a model is scored

    max_len = max_seq_len or model.args.max_seq_len
    seqs = [encode_response(tokenizer, row["prompt"], response_text(row[side]), max_len)[0]
            for side in ("chosen", "rejected") for row in rows]
    rewards = rewards_of(model, seqs, pad_id=tokenizer.pad_id, batch_size=batch_size)
    return rewards[: len(rows)], rewards[len(rows):]


def evaluate(model, tokenizer, rows: Sequence[Mapping], *, batch_size: int = 32,
             max_seq_len: int | None = None) -> dict[str, Any]:
    """All metrics of one model on one set of rows (see metrics_from_rewards)."""
    chosen, rejected = score_pairs(model, tokenizer, rows, batch_size=batch_size, max_seq_len=max_seq_len)
    return metrics_from_rewards(rows, chosen, rejected)


def evaluate_sets(model, tokenizer, sets: Mapping[str, Sequence[Mapping]], *, batch_size: int = 32,
                  max_seq_len: int | None = None) -> dict[str, dict[str, Any]]:
    """evaluate() per named test set; each distinct row is scored once even when it sits in several sets."""
    unique = {row["id"]: row for rows in sets.values() for row in rows}
    rows = list(unique.values())
    chosen, rejected = score_pairs(model, tokenizer, rows, batch_size=batch_size, max_seq_len=max_seq_len)
    by_id = {row["id"]: (c, r) for row, c, r in zip(rows, chosen, rejected)}
    return {
        name: metrics_from_rewards(set_rows, [by_id[r["id"]][0] for r in set_rows], [by_id[r["id"]][1] for r in set_rows])
        for name, set_rows in sets.items()
    }


def metrics_from_rewards(rows: Sequence[Mapping], chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Metrics from given rewards: a pure function, so it can be checked by hand."""
    if not len(rows) == len(chosen) == len(rejected):
        raise ValueError(f"{len(rows)} rows, {len(chosen)} chosen and {len(rejected)} rejected rewards")
    gaps = [c - r for c, r in zip(chosen, rejected)]
    credit = [_credit(g) for g in gaps]
    return {
        "n": len(rows),
        "accuracy": _mean(credit),
        # The paper's loss without margin: what the ranking alone costs, comparable across margin settings.
        "loss": _mean([_neg_log_sigmoid(g) for g in gaps]),
        "ties": sum(g == 0 for g in gaps),
        "by_strength": _accuracy_by(rows, credit, lambda r: STRENGTH_BUCKETS[r["strength"]], list(STRENGTH_BUCKETS.values())),
        "by_safety_bin": _accuracy_by(rows, credit, lambda r: r["safety_bin"] or "unknown"),
        "by_source": _accuracy_by(rows, credit, lambda r: r["source"]),
        "by_batch": _accuracy_by(rows, credit, lambda r: str(r["batch"])),
        "calibration": calibration(gaps),
        "rewards": {"chosen": distribution(chosen), "rejected": distribution(rejected), "gap": distribution(gaps)},
        "length_baseline": length_baseline(rows),
    }


def length_baseline(rows: Sequence[Mapping]) -> dict[str, Any]:
    """Accuracy of preferring the longer response (in characters), overall and per strength bucket."""
    credit = [_credit(len(response_text(r["chosen"])) - len(response_text(r["rejected"]))) for r in rows]
    return {
        "n": len(rows),
        "accuracy": _mean(credit),
        "by_strength": _accuracy_by(rows, credit, lambda r: STRENGTH_BUCKETS[r["strength"]], list(STRENGTH_BUCKETS.values())),
    }


def calibration(gaps: Sequence[float]) -> dict[str, Any]:
    """Accuracy per bin of confidence sigmoid(|gap|), against the mean confidence in the bin, and the
    expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    bins = []
    ece = 0.0
    for lo, hi in zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:]):
        last = hi == CONFIDENCE_EDGES[-1]
        members = [g for g in gaps if lo <= _sigmoid(abs(g)) and (_sigmoid(abs(g)) < hi or last)]
        accuracy = _mean([_credit(g) for g in members])
        confidence = _mean([_sigmoid(abs(g)) for g in members])
        if members:
            ece += len(members) / len(gaps) * abs(accuracy - confidence)
        bins.append({
            "confidence_lo": lo, "confidence_hi": hi,
            "gap_lo": _logit(lo), "gap_hi": None if last else _logit(hi),  # the same bin in reward-gap terms
            "n": len(members), "accuracy": accuracy, "mean_confidence": confidence,
        })
    return {"bins": bins, "ece": ece if gaps else None}


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, population std, min, max and quantiles (linear interpolation, as numpy's default)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered)
    out = {
        "n": len(ordered),
        "mean": mean,
        "std": math.sqrt(sum((v - mean) ** 2 for v in ordered) / len(ordered)),
        "min": ordered[0],
        "max": ordered[-1],
    }
    for q in QUANTILES:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{round(q * 100):02d}"] = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return out


def _accuracy_by(rows: Sequence[Mapping], credit: Sequence[float], key: Callable[[Mapping], str],
                 order: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[float]] = {name: [] for name in order or ()}
    for row, c in zip(rows, credit):
        groups.setdefault(key(row), []).append(c)
    names = list(order or ()) + sorted(set(groups) - set(order or ()))
    return {name: {"n": len(groups[name]), "accuracy": _mean(groups[name])} for name in names}


def _credit(gap: float) -> float:
    return 1.0 if gap > 0 else 0.5 if gap == 0 else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _neg_log_sigmoid(x: float) -> float:
    # log(1 + exp(-x)), without overflow for large |x|
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


if __name__ == "__main__":
    import sys

    from rewards.cli import evaluate_main

    sys.exit(evaluate_main())


def accuracy_warnings(evaluation: Mapping[str, Any] | None) -> list[str]:
    """Why a trained reward model's held-out accuracy should not be trusted, if it should not: no held-out
    pairs, not above chance with 95% confidence (Wilson interval), or not above the length-only baseline
    on the same pairs. Empty when it is fine."""
    from policy.stats import wilson_interval

    overall = (evaluation or {}).get("all") or {}
    n, accuracy = overall.get("n") or 0, overall.get("accuracy")
    if not n or accuracy is None:
        return ["No held-out pairs: the run's accuracy is unknown. Freeze batches with a test slice "
                "(TANDEM_TEST_SLICE_FRACTION) before training."]
    warnings = []
    lo, hi = wilson_interval(accuracy * n, n)
    if lo <= 0.5:
        warnings.append(f"Held-out accuracy {accuracy:.1%} (95% CI {lo:.1%}-{hi:.1%}, {n} pairs) is not above chance "
                        "with confidence: more judgments, a larger test slice or another learning rate may help.")
    baseline = (overall.get("length_baseline") or {}).get("accuracy")
    if baseline is not None and accuracy <= baseline:
        warnings.append(f"Held-out accuracy {accuracy:.1%} is not above the length-only baseline ({baseline:.1%}, "
                        "always prefer the longer response) on the same pairs: the model has learnt nothing "
                        "length does not already tell.")
    return warnings
