"""policy.ppo: the math against hand-written float64 formulas and loops, a tiny end-to-end run on a toy
reward, bit-identical resume after an interrupt, and the divergence guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from policy import ppo
from policy.generate import generate
from policy.ppo import PPOConfig, PPODiverged, ppo_train
from policy.tokenizer import Tokenizer
from tests.policy.rl_helpers import (TokenFractionReward, one_cpu_thread, prompts, tiny_policy,  # noqa: F401
                                    tiny_tokenizer)

# The toy task: reward = 4 x the fraction of response tokens among ids 3..42 (12.5% of the vocabulary).
TARGETS = range(3, 43)


def toy_config(**overrides) -> PPOConfig:
    base = dict(n_iterations=4, batch_size=8, mini_batch_size=4, max_new_tokens=8, lr=1e-2, value_lr=1e-2,
                kl_coef=0.05, checkpoint_every=2, eval_every=0)
    return PPOConfig(**{**base, **overrides})


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the math ------------------------------------------------------------------------------------------


def test_gae_matches_a_float64_reference_loop() -> None:
    torch.manual_seed(0)
    B, R, gamma, lam = 3, 6, 0.9, 0.8
    lengths = [6, 2, 4]
    rewards, values = torch.randn(B, R, dtype=torch.float64), torch.randn(B, R, dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        expected = [0.0] * n
        for t in range(n):  # the definition, not the recursion: A_t = sum_l (gamma lam)^l delta_{t+l}
            deltas = [r[k] + gamma * (v[k + 1] if k + 1 < n else 0.0) - v[k] for k in range(t, n)]
            expected[t] = sum((gamma * lam) ** l * d for l, d in enumerate(deltas))
        assert advantages[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert returns[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expected, v)], abs=1e-12)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_per_token_rewards_put_the_kl_penalty_everywhere_and_the_score_at_the_end() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.9, -4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([2.0, -1.0], dtype=torch.float64)
    rewards, kl = ppo.per_token_rewards(logprobs, ref, scores, mask, kl_coef=0.1)
    expected = [[-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0], [-0.1 * -0.1, -0.1 * 0.2 - 1.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.1, 0.2, 0.0]], dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_clipped_objective_and_value_loss_match_hand_formulas() -> None:
    old = [-1.0, -1.0, -2.0, -0.5]
    new = [-0.5, -1.3, -2.05, -3.0]  # ratios e^0.5 (clipped up), e^-0.3 (clipped down), e^-0.05, padding
    adv = [1.0, -2.0, 0.5, 9.0]
    mask = [1.0, 1.0, 1.0, 0.0]
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss, stats = ppo.policy_loss(t(new), t(old), t(adv), t(mask), cliprange=0.2)
    terms, k3, clipped = [], [], []
    for o, n, a in zip(old[:3], new[:3], adv[:3]):
        r = math.exp(n - o)
        terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
        k3.append((r - 1) - (n - o))
        clipped.append(abs(r - 1) > 0.2)
    assert float(loss) == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert float(stats["approx_kl"]) == pytest.approx(sum(k3) / 3, abs=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(sum(clipped) / 3)
    # Token 0: A > 0 and r = 1.65 > 1.2, the clipped term -1.2 is the max; token 1: A < 0, r = 0.74 < 0.8.
    assert terms[0] == pytest.approx(-1.2) and terms[1] == pytest.approx(2.0 * 0.8)

    values, old_values, returns = [0.5, -1.0, 2.0, 7.0], [0.0, -0.9, 1.0, 0.0], [1.0, -0.5, 1.1, 0.0]
    vloss, _ = ppo.value_loss(t(values), t(old_values), t(returns), t(mask), cliprange_value=0.2)
    hand = []
    for v, ov, g in zip(values[:3], old_values[:3], returns[:3]):
        vc = ov + min(max(v - ov, -0.2), 0.2)
        hand.append(max((v - g) ** 2, (vc - g) ** 2))
    assert float(vloss) == pytest.approx(0.5 * sum(hand) / 3, abs=1e-12)


def test_response_logprobs_are_the_full_forwards(tiny_tokenizer: Tokenizer) -> None:
    """Recomputed old log-probs: the full forward of each sample alone; close to generate's cached ones."""
    policy = tiny_policy(tiny_tokenizer.n_words)
    prompt_tokens = [tiny_tokenizer.encode_dialog(p.messages) for p in prompts(3)]
    out = generate(policy, prompt_tokens, 6, eos_id=tiny_tokenizer.eos_id, seed=1)
    rollout = ppo.make_rollout(prompt_tokens, out.tokens, tiny_tokenizer.pad_id)
    with torch.no_grad():
        logprobs, entropy = ppo.response_logprobs(policy, rollout, torch.arange(3))
        for b, (p, r) in enumerate(zip(prompt_tokens, out.tokens)):
            logits = policy(torch.tensor([p + r]))[0, len(p) - 1 : -1].double()  # (len r, V)
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            probs = logits.softmax(-1)
            torch.testing.assert_close(logprobs[b, : len(r)].double(), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[b, : len(r)].double(), -(probs * probs.log()).sum(-1), atol=1e-4, rtol=0)
            torch.testing.assert_close(logprobs[b, : len(r)], torch.tensor(out.logprobs[b]), atol=1e-4, rtol=0)
            assert rollout.mask[b].tolist() == [1.0] * len(r) + [0.0] * (rollout.mask.shape[1] - len(r))


def test_batches_cover_every_prompt_once_per_epoch() -> None:
    seen = [i for it in range(1, 6) for i in ppo._batch_indices(10, 4, it, seed=3)]  # 20 draws = 2 epochs
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert ppo._batch_indices(10, 4, 2, seed=3) == ppo._batch_indices(10, 4, 2, seed=3)


# --- end to end ----------------------------------------------------------------------------------------


def test_ppo_increases_a_toy_reward_with_bounded_kl(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    reward_fn = TokenFractionReward(TARGETS)
    config = toy_config(n_iterations=16, batch_size=16, mini_batch_size=4, max_new_tokens=10, kl_coef=0.2,
                        checkpoint_every=16)
    seen = []
    result = ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(16), reward_fn, config, tmp_path,
                       progress=lambda i, n, m: seen.append((i, n)))
    rewards = [m["reward_raw"] for m in result.metrics]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # Chance level is 0.5; the policy learns to say target tokens (runs with other seeds gain 0.6 to 1.1).
    assert last > first + 0.4, rewards
    assert result.metrics[0]["kl"] == 0.0  # pi == pi_0 before the first step, exactly
    assert 0.5 < max(m["kl"] for m in result.metrics) < 15.0  # it moved, and the penalty keeps it near pi_0
    assert result.metrics[-1]["entropy"] < result.metrics[0]["entropy"]
    assert seen == [(i, 16) for i in range(1, 17)]
    for key in ("reward_whitened_mean", "approx_kl", "clipfrac", "value_loss", "pg_loss", "response_length",
                "time_generation", "time_scoring", "time_update"):
        assert all(math.isfinite(m[key]) for m in result.metrics), key
    # The exported policy is the trained one, as a Meta checkpoint with the tokenizer beside it.
    from policy.checkpoints import load_checkpoint

    exported = load_checkpoint(result.policy_dir)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state_dicts_equal(exported.state_dict(), state["policy"])
    assert (result.policy_dir / "tokenizer.model").is_file()
    assert json.loads((result.policy_dir / "training.json").read_text())["config"]["lr"] == 1e-2


def test_resume_after_interrupt_ends_identical(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = toy_config(n_iterations=5, checkpoint_every=2, eval_every=2, patience=10, keep_best=False)
    train, held_out = prompts(12), prompts(4)

    def run(out: Path, progress=None):
        return ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, train, TokenFractionReward(TARGETS),
                         config, out, eval_prompts=held_out, progress=progress)

    straight = run(tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def crash_at_3(i, n, m):
        if i == 3:  # iteration 3 done but not checkpointed: the restart must redo it from iteration 2
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", crash_at_3)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["loop"]["iteration"] == 2
    resumed = run(tmp_path / "resumed")

    a = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    for part in ("policy", "value_model"):
        assert state_dicts_equal(a[part], b[part]), part
    assert a["policy_opt"]["state"][0]["exp_avg"].equal(b["policy_opt"]["state"][0]["exp_avg"])
    no_time = lambda ms: [{k: v for k, v in m.items() if not k.startswith("time_")} for m in ms]  # noqa: E731
    assert no_time(straight.metrics) == no_time(resumed.metrics)
    assert "eval_reward" in straight.metrics[1] and resumed.iterations == 5
    assert not state_dicts_equal(a["policy"], tiny_policy(tiny_tokenizer.n_words).state_dict())  # it did train


def test_resume_refuses_another_config_initial_policy_or_prompts(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    reward_fn = TokenFractionReward(TARGETS)
    ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(8), reward_fn, toy_config(n_iterations=2),
              tmp_path)
    with pytest.raises(ValueError, match="kl_coef"):
        ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(8), reward_fn,
                  toy_config(n_iterations=2, kl_coef=0.2), tmp_path)
    with pytest.raises(ValueError, match="not the initial policy"):
        ppo_train(tiny_policy(tiny_tokenizer.n_words, seed=1), tiny_tokenizer, prompts(8), reward_fn,
                  toy_config(n_iterations=2), tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(9), reward_fn,
                  toy_config(n_iterations=2), tmp_path)
    with pytest.raises(FileExistsError):
        ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(8), reward_fn,
                  toy_config(n_iterations=2), tmp_path, resume=False)


# --- guards and early stopping -------------------------------------------------------------------------


def test_nan_reward_raises_and_leaves_the_last_good_state(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    inner = TokenFractionReward(TARGETS)

    def reward_fn(prompts_, responses, tokens):
        helpful, safety = inner(prompts_, responses, tokens)
        if inner.calls == 3:
            helpful[1] = float("nan")
        return helpful, safety

    with pytest.raises(PPODiverged, match="non-finite score") as caught:
        ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(8), reward_fn,
                  toy_config(n_iterations=5, checkpoint_every=1), tmp_path)
    assert (caught.value.iteration, caught.value.last_checkpoint) == (3, 2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["loop"]["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in state["policy"].values())
    assert not list(tmp_path.glob(".*.tmp"))  # no torn temporary file left behind


def test_runaway_kl_raises(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(PPODiverged, match="exceeds max_kl") as caught:
        ppo_train(tiny_policy(tiny_tokenizer.n_words), tiny_tokenizer, prompts(8), TokenFractionReward(TARGETS),
                  toy_config(n_iterations=5, max_kl=1e-6), tmp_path)
    # Iteration 1 samples from pi == pi_0 (KL exactly 0); its update moves pi, iteration 2 trips the guard.
    assert caught.value.iteration == 2 and caught.value.last_checkpoint is None


def test_early_stopping_on_held_out_reward_keeps_the_best(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A reward that no policy can improve: the held-out mean never beats iteration 0's, so the run stops
    after `patience` evaluations and returns the initial policy, the best evaluated one."""
    constant = lambda p, r, t: (torch.ones(len(r)), torch.ones(len(r)))  # noqa: E731
    initial = tiny_policy(tiny_tokenizer.n_words).state_dict()
    policy = tiny_policy(tiny_tokenizer.n_words)
    result = ppo_train(policy, tiny_tokenizer, prompts(8), constant,
                       toy_config(n_iterations=10, eval_every=1, patience=2), tmp_path, eval_prompts=prompts(4))
    assert (result.iterations, result.stopped_early, result.best_iteration) == (2, True, 0)
    assert state_dicts_equal(policy.state_dict(), initial)
    assert not state_dicts_equal(torch.load(tmp_path / "state.pt", weights_only=True)["policy"], initial)


@pytest.mark.parametrize("bad", [dict(batch_size=1), dict(batch_size=8, mini_batch_size=3), dict(gamma=1.5),
                                 dict(n_iterations=0), dict(cliprange=0.0)])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        PPOConfig(**bad)
