"""rewards.evaluate: metrics checked by hand and against numpy, and end to end on a tiny model."""

import json
import math

import numpy as np
import pytest
import torch

from rewards.evaluate import calibration, distribution, evaluate, evaluate_sets, length_baseline, metrics_from_rewards
from rewards.model import RewardModel, score_batch
from tests.rewards import synthetic


def _row(i, strength, safety_bin, chosen="long answer here", rejected="short", source="human", batch="W1"):
    return {"id": i, "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "strength": strength, "safety_bin": safety_bin,
            "is_adversarial": False, "source": source, "split": "test", "batch": batch}


ROWS = [
    _row(1, 3, "both_safe"),
    _row(2, 3, "both_safe", chosen="a", rejected="much longer"),
    _row(3, 2, "chosen_safe_other_unsafe"),
    _row(4, 1, None, chosen="same", rejected="size", source="imported", batch="W2"),
    _row(5, None, None, source="imported", batch="W2"),
    _row(6, 0, "both_unsafe"),
]
CHOSEN = [2.0, 0.0, 1.0, 0.5, -1.0, 0.3]
REJECTED = [1.0, 0.5, 1.0, 0.0, 1.0, 0.1]  # gaps 1, -0.5, 0 (tie), 0.5, -2, 0.2


def test_accuracy_by_strength_bin_source_and_batch() -> None:
    m = metrics_from_rewards(ROWS, CHOSEN, REJECTED)
    # credits: 1, 0, 0.5 (tie), 1, 0, 1
    assert m["n"] == 6 and m["ties"] == 1
    assert m["accuracy"] == pytest.approx(3.5 / 6)
    assert m["by_strength"] == {
        "significantly_better": {"n": 2, "accuracy": 0.5},
        "better": {"n": 1, "accuracy": 0.5},
        "slightly_better": {"n": 1, "accuracy": 1.0},
        "negligibly_better_or_unsure": {"n": 1, "accuracy": 1.0},
        "unknown": {"n": 1, "accuracy": 0.0},
    }
    assert list(m["by_strength"]) == ["significantly_better", "better", "slightly_better",
                                      "negligibly_better_or_unsure", "unknown"]  # the paper's Table 8 order
    assert m["by_safety_bin"]["both_safe"] == {"n": 2, "accuracy": 0.5}
    assert m["by_safety_bin"]["unknown"] == {"n": 2, "accuracy": 0.5}
    assert m["by_source"] == {"human": {"n": 4, "accuracy": 2.5 / 4}, "imported": {"n": 2, "accuracy": 0.5}}
    assert m["by_batch"]["W2"] == {"n": 2, "accuracy": 0.5}
    gaps = [1, -0.5, 0, 0.5, -2, 0.2]
    assert m["loss"] == pytest.approx(sum(math.log(1 + math.exp(-g)) for g in gaps) / 6)
    json.dumps(m)  # plain JSON


def test_length_baseline_prefers_the_longer_response() -> None:
    b = length_baseline(ROWS)
    # longer chosen: rows 1, 3, 5, 6 (credit 1); row 2 shorter (0); row 4 equal length (0.5)
    assert b["accuracy"] == pytest.approx(4.5 / 6)
    assert b["by_strength"]["significantly_better"] == {"n": 2, "accuracy": 0.5}
    assert b["by_strength"]["slightly_better"] == {"n": 1, "accuracy": 0.5}
    assert metrics_from_rewards(ROWS, CHOSEN, REJECTED)["length_baseline"] == b


def test_calibration_bins_by_confidence() -> None:
    gaps = [0.1, -0.2, 0.6, 1.0, -3.0, 5.0, 0.0]
    c = calibration(gaps)
    conf = [1 / (1 + math.exp(-abs(g))) for g in gaps]  # 0.525 0.550 0.646 0.731 0.953 0.993 0.5
    bins = {(b["confidence_lo"], b["confidence_hi"]): b for b in c["bins"]}
    assert bins[(0.5, 0.6)]["n"] == 3 and bins[(0.5, 0.6)]["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert bins[(0.6, 0.7)]["n"] == 1 and bins[(0.7, 0.8)]["n"] == 1 and bins[(0.8, 0.9)]["n"] == 0
    assert bins[(0.9, 1.0)]["n"] == 2 and bins[(0.9, 1.0)]["accuracy"] == 0.5
    assert bins[(0.8, 0.9)]["accuracy"] is None
    assert bins[(0.6, 0.7)]["gap_lo"] == pytest.approx(math.log(0.6 / 0.4))
    ece = (3 / 7) * abs(0.5 - sum(conf[i] for i in (0, 1, 6)) / 3) + (1 / 7) * abs(1 - conf[2]) \
        + (1 / 7) * abs(1 - conf[3]) + (2 / 7) * abs(0.5 - (conf[4] + conf[5]) / 2)
    assert c["ece"] == pytest.approx(ece)


def test_distribution_matches_numpy() -> None:
    values = [3.0, -1.0, 0.5, 2.0, 7.5, 0.0, 1.25]
    d = distribution(values)
    assert d["mean"] == pytest.approx(np.mean(values)) and d["std"] == pytest.approx(np.std(values))
    for q in (5, 25, 50, 75, 95):
        assert d[f"p{q:02d}"] == pytest.approx(np.quantile(values, q / 100))
    assert (d["min"], d["max"], d["n"]) == (-1.0, 7.5, 7)
    assert distribution([]) == {"n": 0}


def test_evaluate_on_a_model_scores_each_row(rm_tokenizer) -> None:
    torch.manual_seed(0)
    model = RewardModel(synthetic.tiny_args(rm_tokenizer.n_words))
    rows = synthetic.make_rows(12, seed=4, test_fraction=1.0)
    m = evaluate(model, rm_tokenizer, rows, batch_size=5)
    chosen = score_batch(model, rm_tokenizer, [r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows])
    rejected = score_batch(model, rm_tokenizer, [r["prompt"] for r in rows], [r["rejected"][0]["content"] for r in rows])
    expected = metrics_from_rewards(rows, chosen, rejected)
    assert m["accuracy"] == expected["accuracy"] and m["n"] == 12
    assert m["rewards"]["chosen"]["mean"] == pytest.approx(expected["rewards"]["chosen"]["mean"], abs=1e-6)
    sets = evaluate_sets(model, rm_tokenizer, {"all": rows, "first": rows[:4]})
    assert sets["all"]["accuracy"] == m["accuracy"] and sets["first"]["n"] == 4
    json.dumps(sets)
