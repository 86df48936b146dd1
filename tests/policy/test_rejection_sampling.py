"""policy.rejection_sampling: best of K by a toy reward recomputed here, the pool across rounds, Figure 7's
max-versus-median against brute force over subsets, and resuming from the last complete chunk."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from policy.rejection_sampling import RejectionSamplingConfig, max_vs_median, rejection_sampling_round
from policy.reward import Prompt
from policy.sft import SFTConfig
from policy.tokenizer import Tokenizer
from tests.policy.rl_helpers import (TokenFractionReward, one_cpu_thread, prompts, tiny_policy,  # noqa: F401
                                    tiny_tokenizer)

TARGETS = range(3, 43)


def config(**overrides) -> RejectionSamplingConfig:
    base = dict(k=4, temperature=1.2, max_new_tokens=8, chunk_prompts=2, round=1,
                sft=SFTConfig(max_steps=2, batch_size=4, lr=1e-3, device="cpu"))
    return RejectionSamplingConfig(**{**base, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_max_vs_median_is_the_expectation_over_all_subsets() -> None:
    rng = random.Random(0)
    rewards = [[rng.gauss(0, 1) for _ in range(6)] for _ in range(3)] + [[1.0, 1.0, 2.0, 0.0, 2.0, 5.0]]  # ties too
    rows = max_vs_median(rewards)
    assert [r["n"] for r in rows] == [1, 2, 4, 6]
    for row in rows:
        n = row["n"]
        subsets = [[list(c) for c in itertools.combinations(r, n)] for r in rewards]
        brute_max = statistics.mean(statistics.mean(max(s) for s in per) for per in subsets)
        brute_median = statistics.mean(statistics.mean(statistics.median(s) for s in per) for per in subsets)
        assert row["max"] == pytest.approx(brute_max, abs=1e-12)
        assert row["median"] == pytest.approx(brute_median, abs=1e-12)
    assert rows[0]["max"] == rows[0]["median"]  # one sample: max = median = mean
    assert rows[-1]["max"] > rows[-1]["median"]
    assert [r["n"] for r in max_vs_median([[0.0] * 5])] == [1, 2, 4, 5]


def test_round_keeps_the_best_of_k_and_fine_tunes_on_it(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    reward_fn = TokenFractionReward(TARGETS)
    policy = tiny_policy(tiny_tokenizer.n_words)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    seen = []
    result = rejection_sampling_round(policy, tiny_tokenizer, prompts(5), reward_fn, config(), tmp_path,
                                      progress=lambda step, total, m: seen.append(step))
    rows = [row for path in sorted((tmp_path / "samples").iterdir()) for row in read_jsonl(path)]
    assert len(list((tmp_path / "samples").iterdir())) == 3 and [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    pool = read_jsonl(result.pool_path)
    assert len(pool) == 5
    for row, entry in zip(rows, pool):
        assert len(row["samples"]) == 4
        # The reward of every sample is the toy reward of its tokens, recomputed here.
        for s in row["samples"]:
            assert s["reward"] == pytest.approx(4 * reward_fn.fraction(s["tokens"]))
            assert s["response"] == tiny_tokenizer.decode(s["tokens"])
        assert entry["reward"] == max(s["reward"] for s in row["samples"])
        assert entry["prompt"] == row["prompt"] and entry["round"] == 1
    assert result.metrics["reward_best_mean"] >= result.metrics["reward_mean"]
    assert result.metrics["max_vs_median"][-1]["n"] == 4 and result.metrics["sft_steps"] == 2
    assert seen == [1, 2, 3, 4, 5]  # three sampling chunks, two SFT steps
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())  # SFT changed the policy
    assert (result.policy_dir / "consolidated.00.pth").is_file() and (result.policy_dir / "tokenizer.model").is_file()

    # Done: calling again returns the result without sampling, with the fine-tuned weights in the policy.
    calls = reward_fn.calls
    fresh = tiny_policy(tiny_tokenizer.n_words)
    again = rejection_sampling_round(fresh, tiny_tokenizer, prompts(5), reward_fn, config(), tmp_path)
    assert reward_fn.calls == calls and again.metrics == json.loads(json.dumps(result.metrics))
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_pool_keeps_the_best_of_every_round(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    reward_fn = TokenFractionReward(TARGETS)
    a, b, c = prompts(3)
    perfect, useless = [5, 6, 7], [300, 301]  # every token a target (reward 4); none (reward 0)
    earlier = [
        {"prompt": a.to_json(), "response": tiny_tokenizer.decode(perfect), "tokens": perfect, "reward": -9.0,
         "round": 1},
        {"prompt": b.to_json(), "response": tiny_tokenizer.decode(useless), "tokens": useless, "reward": 9.0,
         "round": 1},
        {"prompt": c.to_json(), "response": "kept as it is", "reward": 0.5, "round": 1},
    ]
    pool_in = tmp_path / "pool_round1.jsonl"
    pool_in.write_text("".join(json.dumps(e) + "\n" for e in earlier))
    result = rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, [a, b], reward_fn,
                                      config(round=2), tmp_path / "round2", pool_in=pool_in)
    pool = {e["prompt"]["messages"][0]["content"]: e for e in read_jsonl(result.pool_path)}
    # a: the earlier sample, re-scored by this round's reward (4.0, not its stale -9.0), beats any new one.
    assert (pool[a.messages[0]["content"]]["round"], pool[a.messages[0]["content"]]["reward"]) == (1, 4.0)
    # b: the earlier sample re-scores to 0 (its stale 9.0 is ignored); this round's best replaces it.
    new_b = pool[b.messages[0]["content"]]
    assert new_b["round"] == 2 and new_b["reward"] > 0
    # c: not sampled this round, kept untouched.
    assert pool[c.messages[0]["content"]] == earlier[2] | {"prompt": c.to_json()}
    m = result.metrics
    assert (m["pool_size"], m["pool_replaced"], m["pool_kept_earlier"], m["pool_new_prompts"]) == (3, 1, 1, 0)

    # Without re-scoring the stale rewards decide: b keeps its useless earlier sample.
    stale = rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, [a, b], reward_fn,
                                     config(round=2, rescore_pool=False), tmp_path / "round2_stale", pool_in=pool_in)
    pool = {e["prompt"]["messages"][0]["content"]: e for e in read_jsonl(stale.pool_path)}
    assert pool[b.messages[0]["content"]]["round"] == 1 and pool[a.messages[0]["content"]]["round"] == 2


def test_restart_continues_from_the_last_complete_chunk(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    straight = rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(6),
                                        TokenFractionReward(TARGETS), config(), tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def crash_after_first_chunk(step, total, metrics):
        if step == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(6),
                                 TokenFractionReward(TARGETS), config(), tmp_path / "resumed",
                                 progress=crash_after_first_chunk)
    assert [p.name for p in (tmp_path / "resumed" / "samples").iterdir()] == ["chunk_00000.jsonl"]
    reward_fn = TokenFractionReward(TARGETS)
    resumed = rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(6), reward_fn,
                                       config(), tmp_path / "resumed")
    assert reward_fn.calls == 2  # chunks 1 and 2 only
    for name in ("chunk_00000.jsonl", "chunk_00001.jsonl", "chunk_00002.jsonl"):
        straight_chunk, resumed_chunk = (tmp_path / run / "samples" / name for run in ("straight", "resumed"))
        assert straight_chunk.read_text() == resumed_chunk.read_text()
    assert straight.pool_path.read_text() == resumed.pool_path.read_text()
    with pytest.raises(ValueError, match="config"):
        rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(6), reward_fn,
                                 config(k=3), tmp_path / "resumed")
    with pytest.raises(ValueError, match="prompts"):
        rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(5), reward_fn,
                                 config(), tmp_path / "resumed")


@pytest.mark.parametrize("bad", [dict(k=0), dict(temperature=0.0), dict(temperature=-1.0), dict(chunk_prompts=0)])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        config(**bad)


def test_a_malformed_pool_is_refused_before_sampling(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    pool_in = tmp_path / "pool.jsonl"
    entry = {"prompt": Prompt([{"role": "user", "content": "x"}]).to_json(), "response": "y"}
    pool_in.write_text(json.dumps(entry) + "\n")
    reward_fn = TokenFractionReward(TARGETS)
    with pytest.raises(ValueError, match="reward, round"):
        rejection_sampling_round(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(2), reward_fn, config(),
                                 tmp_path / "out", pool_in=pool_in)
    assert reward_fn.calls == 0
