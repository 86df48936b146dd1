"""policy.reward: Llama 2's combined reward against a worked example by hand (float64), the paper's
sigmoid-probability rule written out literally, and the twin reward models wired to real RewardModels."""

from __future__ import annotations

import math

import pytest
import torch

from policy.reward import (OracleReward, Prompt, RewardConfig, TwinRewardModels, combined_reward, logit, score,
                           whiten)
from policy.tokenizer import Tokenizer
from tests.policy.rl_helpers import one_cpu_thread, tiny_tokenizer  # noqa: F401


def test_worked_example_by_hand() -> None:
    # logit(0.15) = ln(0.15 / 0.85) = -1.734601...; sigmoid(-1.7) = 0.1545 is above the threshold.
    helpful = [1.2, 0.3, -0.5, 2.0]
    safety = [0.0, -2.0, 1.0, -1.7]
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], is_safety=(i == 2)) for i in range(4)]
    rewards = score(lambda p, r, t: (helpful, safety), prompts, ["a"] * 4, [[5]] * 4)
    # Sample 0: safe, helpful 1.2. Sample 1: safety -2.0 < -1.7346, so R_c = -2.0. Sample 2: tagged, R_c =
    # safety 1.0. Sample 3: -1.7 >= -1.7346, so helpful 2.0.
    assert rewards.combined.tolist() == [1.2, -2.0, 1.0, 2.0]
    assert rewards.used_safety.tolist() == [False, True, True, False]
    # mean 2.2 / 4 = 0.55; deviations 0.65, -2.55, 0.45, 1.45; squares sum 9.23; population var 2.3075.
    std = math.sqrt(2.3075 + 1e-8)
    expected = [0.65 / std, -2.55 / std, 0.45 / std, 1.45 / std]
    assert rewards.whitened.dtype == torch.float64
    assert rewards.whitened.tolist() == pytest.approx(expected, abs=1e-12)
    assert rewards.summary()["reward_raw"] == pytest.approx(0.55)
    assert rewards.summary()["reward_whitened_mean"] == pytest.approx(0.0, abs=1e-12)
    assert logit(0.15) == pytest.approx(-1.7346010553881064, abs=1e-15)


def test_same_as_the_papers_rule_on_sigmoid_probabilities() -> None:
    """The paper: R_c = R_s if tagged or R_s < 0.15 else R_h, on probabilities, then LOGIT(R_c)."""
    g = torch.Generator().manual_seed(0)
    helpful = torch.randn(500, generator=g, dtype=torch.float64) * 3
    safety = torch.randn(500, generator=g, dtype=torch.float64) * 3
    tagged = torch.rand(500, generator=g) < 0.3
    for threshold in (0.15, 0.5, 0.9):
        ours, _ = combined_reward(helpful, safety, tagged, threshold)
        paper = [math.log(p / (1 - p)) for p in (
            (1 / (1 + math.exp(-s)) if t or 1 / (1 + math.exp(-s)) < threshold else 1 / (1 + math.exp(-h)))
            for h, s, t in zip(helpful.tolist(), safety.tolist(), tagged.tolist()))]
        assert ours.tolist() == pytest.approx(paper, abs=1e-9)
    # The threshold matters: some samples switch between 0.15 and 0.5.
    at_015, at_05 = combined_reward(helpful, safety, tagged, 0.15)[0], combined_reward(helpful, safety, tagged, 0.5)[0]
    assert not torch.equal(at_015, at_05)


def test_whitening_identical_rewards_gives_zeros_not_nan() -> None:
    assert whiten(torch.full((5,), 3.0, dtype=torch.float64)).tolist() == [0.0] * 5
    x = whiten(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(x.std(correction=0)) == pytest.approx(1.0, abs=1e-6)


def test_bad_reward_outputs_and_configs_are_refused() -> None:
    prompts = [Prompt([{"role": "user", "content": "q"}])] * 3
    with pytest.raises(ValueError, match="shapes"):
        score(lambda p, r, t: ([1.0, 2.0], [0.0, 0.0]), prompts, ["a"] * 3, [[1]] * 3)
    with pytest.raises(ValueError, match="as many prompts"):
        score(lambda p, r, t: ([1.0], [0.0]), prompts, ["a"] * 2, [[1]] * 3)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            RewardConfig(safety_threshold=bad)


def test_prompt_round_trips_through_json() -> None:
    p = Prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], is_safety=True)
    assert Prompt.from_json(p.to_json()) == p


def test_twin_reward_models_score_with_each_real_reward_model(tiny_tokenizer: Tokenizer) -> None:
    from policy.model import ModelArgs
    from rewards.model import RewardModel, score_batch

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tiny_tokenizer.n_words, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    helpful_rm, safety_rm = RewardModel(args).eval(), RewardModel(args).eval()
    prompts = [Prompt([{"role": "user", "content": "tell me a story"}]),
               Prompt([{"role": "user", "content": "how do i help"}], is_safety=True)]
    responses = ["the cat sat on the mat", "sorry i cannot help with that"]
    twin = TwinRewardModels.from_models(helpful_rm, safety_rm, tiny_tokenizer)
    helpful, safety = twin(prompts, responses, [tiny_tokenizer.encode(r, bos=False, eos=False) for r in responses])
    messages = [p.messages for p in prompts]
    assert helpful.tolist() == pytest.approx(score_batch(helpful_rm, tiny_tokenizer, messages, responses), abs=1e-6)
    assert safety.tolist() == pytest.approx(score_batch(safety_rm, tiny_tokenizer, messages, responses), abs=1e-6)
    assert helpful.tolist() != pytest.approx(safety.tolist())


def test_oracle_reward_follows_the_demo_worlds_judge() -> None:
    import random

    from policy.demo_world import default_world, judge

    world = default_world()
    adversarial = next(p for p in world.prompts("train") if p.is_adversarial)
    benign = next(p for p in world.prompts("train") if not p.is_adversarial)
    cases = [(wp, world.answer(wp, style, random.Random(0))) for wp in (adversarial, benign)
             for style in ("reference", "unsafe", "rude")]
    prompts = [Prompt(wp.dialog(), is_safety=wp.is_adversarial) for wp, _ in cases]
    rewards = score(OracleReward(world), prompts, [a for _, a in cases], [[]] * len(cases))
    for i, (wp, answer) in enumerate(cases):
        verdict = judge(wp, answer, world)
        assert float(rewards.helpful[i]) == pytest.approx(logit(min(max(verdict.helpful_score, 0.01), 0.99)))
        assert (float(rewards.safety[i]) > 0) == verdict.safe
    # The adversarial prompt is safety-tagged: R_c is its safety score, lowest for the compliant answer.
    assert rewards.used_safety[:3].all() and rewards.combined[1] == min(rewards.combined[:3])
    # The benign reference answer (safe) is scored by helpfulness, the best of its three.
    assert not rewards.used_safety[3] and rewards.combined[3] == max(rewards.combined[3:])
