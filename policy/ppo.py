"""PPO as Llama 2 ran it (§3.2.3), in one file: rollout, reward, GAE, clipped updates, early stopping.

Each iteration:

1. Rollout: `batch_size` prompts, one response each, sampled by policy.generate from the policy itself
   (temperature 1, no top-k/top-p: the ratio and the KL below are those of pi, so the samples must be too).
2. Log-probs: one full forward of the policy, of the frozen reference pi_0 (a copy of the initial
   policy) and of the value model over prompt + response. generate() also returns log-probs, but from
   the cached inference path (bf16 autocast on CUDA): they differ from the training forward by rounding,
   and using them as the "old" log-probs would make the ratio of the very first mini-batch differ from 1
   and clip samples that were never updated. Recomputed with the training forward, in the training dtype
   (the model's own on CPU; bf16 autocast on CUDA unless `bf16=False`, logits and values in float32),
   ratio == 1 exactly before the first step.
3. Reward: R_c from the two reward models, WHITEN(LOGIT(R_c)) over the batch (policy/reward.py), added at
   the last response token; every token also gets -beta * (log pi - log pi_0), the per-token KL penalty.
4. GAE(gamma, lambda) over the response tokens, advantages whitened over the batch's tokens.
5. Update: `ppo_epochs` passes of shuffled mini-batches, one optimizer step per mini-batch for the policy
   (clipped surrogate, eps 0.2) and one for the value model (clipped value loss), AdamW (0.9, 0.95,
   eps 1e-5, weight decay 0.1), gradient norm clipped to 1.0, constant learning rate.

Value model: a separate copy of the initial policy's backbone with a scalar head (the LM head dropped),
not a head on the policy's hidden states. A shared trunk would let the value loss, whose scale is
unrelated to the policy's, push the policy's features around, and would force one learning rate on
both; a separate model is what InstructGPT and TRL do. It costs a second backbone in memory and time,
which tiny models afford and large ones pay anyway for the reference.

Learning rate: the paper's 1e-6 is for 7B-70B models already fine-tuned. Our default 1e-4 (value 1e-4)
suits the tiny demo models (dim 64-512): at 1e-6 they would not move in any number of iterations we
can afford on a CPU. Set it to 1e-6 for real checkpoints.

Guards: anything non-finite (rewards, log-probs, losses, gradient norms) or a mean sequence KL above
`max_kl` raises PPODiverged(iteration, reason) before any optimizer step of the bad mini-batch; the
state on disk (`out_dir/state.pt`, written every `checkpoint_every` iterations, atomically) is the last
good one. `ppo_train(..., resume=True)` continues from it and ends bit-identical to a run that was never
interrupted (same device, fixed seed): every random draw of iteration i comes from generators seeded by
(seed, i), and optimizer moments, early-stopping state and metrics are in the state file.

Shape letters: B samples in the batch, L prompt + response tokens (right-padded), R response tokens
(right-padded), V vocab.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from policy.checkpoints import _atomic_file
from policy.generate import generate
from policy.model import Transformer
from policy.reward import Prompt, RewardConfig, RewardFunction, score
from policy.sft import save_checkpoint
from policy.tokenizer import Tokenizer

Progress = Callable[[int, int, Mapping[str, float]], None]  # (iterations done, total, metrics of the last one)
STATE_FILE = "state.pt"
BEST_FILE = "best_policy.pt"


@dataclass
class PPOConfig:
    n_iterations: int = 200  # PPO iterations (the paper: 200-400)
    batch_size: int = 64  # prompts per iteration, one response each (paper: 512)
    mini_batch_size: int = 8  # samples per optimizer step (paper: 64)
    ppo_epochs: int = 1  # passes over each batch (paper: one step per mini-batch, i.e. 1)
    max_new_tokens: int = 128  # longest response sampled
    kl_coef: float = 0.01  # beta, the per-token KL penalty (paper: 0.01; 0.005 for 34B/70B)
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # PPO's clip on the probability ratio (paper: 0.2)
    cliprange_value: float = 0.2  # clip on how far the value prediction moves from the rollout's
    lr: float = 1e-4  # policy learning rate, constant (paper: 1e-6 for 7B-70B; see the module docstring)
    value_lr: float = 1e-4  # value model learning rate, constant
    weight_decay: float = 0.1  # AdamW, matrices only (paper: 0.1)
    beta1: float = 0.9  # AdamW (paper: 0.9)
    beta2: float = 0.95  # AdamW (paper: 0.95)
    adam_eps: float = 1e-5  # AdamW (paper: 1e-5)
    max_grad_norm: float = 1.0  # gradient norm clip, each model (paper: 1.0)
    whiten_advantages: bool = True  # normalise advantages over the batch's response tokens
    max_kl: float = 50.0  # mean per-sequence KL(pi || pi_0) in nats above which the run is declared diverged
    eval_every: int = 10  # iterations between held-out evaluations (0: never; needs eval prompts)
    patience: int = 3  # stop after this many evaluations without improvement
    min_improvement: float = 0.0  # an evaluation improves only if it beats the best by more than this
    keep_best: bool = True  # with held-out prompts: the returned policy is the best evaluated one
    checkpoint_every: int = 10  # iterations between training-state checkpoints (the last one always)
    bf16: bool = True  # on CUDA, bf16 autocast for every training-side forward (as policy.sft); no effect on CPU
    seed: int = 0  # seeds every draw: prompt order, sampling, mini-batch order
    reward: RewardConfig = field(default_factory=RewardConfig)  # combined reward: safety threshold, whitening

    def __post_init__(self) -> None:
        if isinstance(self.reward, Mapping):  # from JSON
            self.reward = RewardConfig(**self.reward)
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2: rewards are whitened over the batch")
        if self.mini_batch_size < 1 or self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}")
        for name in ("n_iterations", "ppo_epochs", "max_new_tokens", "checkpoint_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.eval_every < 0 or self.kl_coef < 0 or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ValueError("eval_every and kl_coef must be >= 0, the clip ranges > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must lie in [0, 1]")


class PPODiverged(RuntimeError):
    """The run went bad at `iteration`; the last good training state is the one in out_dir."""

    def __init__(self, iteration: int, reason: str, last_checkpoint: int | None) -> None:
        self.iteration, self.reason, self.last_checkpoint = iteration, reason, last_checkpoint
        kept = f"iteration {last_checkpoint}" if last_checkpoint is not None else "none yet"
        super().__init__(f"PPO diverged at iteration {iteration}: {reason} (last good checkpoint: {kept})")


@dataclass
class PPOResult:
    policy_dir: Path  # Meta-format checkpoint of the returned policy (+ tokenizer.model, training.json)
    iterations: int  # iterations run
    stopped_early: bool  # held-out reward stopped improving
    best_iteration: int | None  # iteration of the best held-out evaluation (None without held-out prompts)
    metrics: list[dict[str, float]]  # one dict per iteration


class ValueModel(nn.Module):
    """V(s_t): a transformer backbone (a copy of the policy's, LM head dropped) and a scalar head."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.output = None  # hidden_states() never uses it; (dim x V) weights we need not train
        # Zero init: every state starts at value 0, the mean of the whitened rewards.
        self.value_head = nn.Linear(backbone.args.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Values (B, L) in float32 for tokens (B, L)."""
        return self.value_head(self.backbone.hidden_states(tokens)).squeeze(-1).float()


# --- the math, on tensors ------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the entries where mask is 1 (population variance); masked entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def per_token_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, kl_coef: float
                      ) -> tuple[Tensor, Tensor]:
    """Rewards (B, R): -kl_coef * kl per token, plus the sequence's score (B,) at its last token; and kl (B, R).

    kl = log pi(a_t|s_t) - log pi_0(a_t|s_t), the per-token estimate whose expectation under pi is
    KL(pi || pi_0); padding (mask 0) gets neither.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded responses: advantages and returns, (B, R).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lam A_{t+1}; the state after the last
    token is terminal (value 0). Padding holds rewards and values of 0, so it contributes nothing.
    """
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, to minimise: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)),
    r = pi / pi_old; with approx_kl (Schulman's k3: (r - 1) - log r) and the fraction of clipped tokens."""
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
        }
    return pg_loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean of max((V - G)^2, (V_clipped - G)^2), V_clipped within
    cliprange_value of the rollout's value."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.maximum((values - returns).square(), (clipped - returns).square())
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(((values - returns).square() < (clipped - returns).square()).float(), mask)}
    return 0.5 * masked_mean(losses, mask), stats


# --- rollouts ------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    tokens: Tensor  # (B, L) prompt + response, right-padded
    positions: Tensor  # (B, R) index into L of the logits that predict response token j: prompt_len - 1 + j
    mask: Tensor  # (B, R) 1.0 on response tokens, 0.0 on padding
    response_ids: Tensor  # (B, R) the response tokens


def make_rollout(prompt_tokens: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    B = len(responses)
    L = max(len(p) + len(r) for p, r in zip(prompt_tokens, responses))
    R = max(len(r) for r in responses)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_tokens, responses)):
        tokens[b, : len(p) + len(r)] = torch.tensor([*p, *r])
        positions[b] = torch.arange(R) + len(p) - 1
        mask[b, : len(r)] = 1.0
        response_ids[b, : len(r)] = torch.tensor(r)
    positions.clamp_(max=L - 1)  # padding positions: any valid index, masked out
    return Rollout(tokens, positions, mask, response_ids)


def response_logprobs(model: Transformer, rollout: Rollout, rows: Tensor) -> tuple[Tensor, Tensor]:
    """log pi(response token) (b, R) and the entropy of pi at each response position (b, R), for rows of the
    rollout. The LM head runs only at response positions: (b, R, V) logits, never (b, L, V)."""
    tokens, positions = rollout.tokens[rows], rollout.positions[rows]
    h = model.hidden_states(tokens)  # (b, L, dim)
    h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))  # (b, R, dim)
    logits = model.output(h).float()  # (b, R, V)
    logz = logits.logsumexp(-1)  # (b, R)
    logprobs = logits.gather(-1, rollout.response_ids[rows][..., None]).squeeze(-1) - logz
    entropy = logz - (logits.softmax(-1) * logits).sum(-1)
    return logprobs, entropy


def response_values(value_model: ValueModel, rollout: Rollout, rows: Tensor) -> Tensor:
    """V of the state before each response token, (b, R)."""
    return value_model(rollout.tokens[rows]).gather(1, rollout.positions[rows])


# --- the loop ------------------------------------------------------------------------------------------


def ppo_train(
    policy: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    config: PPOConfig,
    out_dir: str | os.PathLike[str],
    *,
    eval_prompts: Sequence[Prompt] = (),
    progress: Progress | None = None,
    resume: bool = True,
) -> PPOResult:
    """Train `policy` in place with PPO against reward_fn; the reference pi_0 is a frozen copy of `policy`
    as passed in, so a resumed run must be given the same initial policy (checked by a fingerprint).

    out_dir receives config.json, state.pt (the training state), metrics.jsonl, best_policy.pt (with
    held-out prompts) and, at the end, policy/ (a Meta-format checkpoint with tokenizer.model and
    training.json). With resume=True an existing state.pt is continued; with False it is an error.
    Raises PPODiverged when the guards trip.
    """
    if not prompts:
        raise ValueError("no training prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = policy.output.weight.device
    config_json = json.loads(json.dumps(asdict(config)))

    # pi_0, frozen; the value model, a copy of the same initial weights with a scalar head.
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = ValueModel(copy.deepcopy(policy)).to(device)
    reference_fingerprint = _fingerprint(reference)
    prompts_fingerprint = hashlib.sha256(json.dumps([[p.to_json() for p in prompts],
                                                     [p.to_json() for p in eval_prompts]]).encode()).hexdigest()
    policy_opt = _adamw(policy, config.lr, config)
    value_opt = _adamw(value_model, config.value_lr, config)
    state: dict[str, Any] = {
        "iteration": 0, "metrics": [], "best_eval": None, "best_iteration": None, "evals_since_best": 0,
        "stopped_early": False,
    }  # fmt: skip

    state_path = out / STATE_FILE
    if state_path.exists():
        if not resume:
            raise FileExistsError(f"{state_path} exists; pass resume=True to continue it or use a fresh out_dir")
        # On the CPU: load_state_dict copies onto the parameters' device, and the RNG state must stay a CPU tensor.
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved["config"] != config_json:
            changed = sorted(k for k in config_json if saved["config"].get(k) != config_json[k])
            raise ValueError(f"cannot resume {out}: the config differs in {', '.join(changed)}")
        if saved["reference_fingerprint"] != reference_fingerprint:
            raise ValueError(f"cannot resume {out}: the policy passed in is not the initial policy of that run")
        if saved["prompts_fingerprint"] != prompts_fingerprint:
            raise ValueError(f"cannot resume {out}: the training or held-out prompts are not those of that run")
        policy.load_state_dict(saved["policy"])
        value_model.load_state_dict(saved["value_model"])
        policy_opt.load_state_dict(saved["policy_opt"])
        value_opt.load_state_dict(saved["value_opt"])
        torch.set_rng_state(saved["rng_cpu"])
        state = saved["loop"]
    else:
        with _atomic_file(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config_json, indent=2))
    last_checkpoint = state["iteration"] if state_path.exists() else None

    def save_state() -> None:
        nonlocal last_checkpoint
        payload = {
            "config": config_json, "reference_fingerprint": reference_fingerprint,
            "prompts_fingerprint": prompts_fingerprint, "loop": state,
            "policy": policy.state_dict(), "value_model": value_model.state_dict(),
            "policy_opt": policy_opt.state_dict(), "value_opt": value_opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }  # fmt: skip
        with _atomic_file(state_path) as tmp, tmp.open("wb") as f:
            torch.save(payload, f)
        with _atomic_file(out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(m) + "\n" for m in state["metrics"]))
        last_checkpoint = state["iteration"]

    def evaluate(iteration: int) -> dict[str, float]:
        """Mean raw R_c on the held-out prompts, the same draws every time (seeded), and early-stopping."""
        _, rewards, _ = _sample_and_score(policy, tokenizer, eval_prompts, reward_fn, config,
                                          seed=_seed(config.seed, "eval"))
        mean = float(rewards.combined.mean())
        if state["best_eval"] is None or mean > state["best_eval"] + config.min_improvement:
            state.update(best_eval=mean, best_iteration=iteration, evals_since_best=0)
            if config.keep_best:
                with _atomic_file(out / BEST_FILE) as tmp, tmp.open("wb") as f:
                    torch.save({"iteration": iteration, "policy": policy.state_dict()}, f)
        else:
            state["evals_since_best"] += 1
        state["stopped_early"] = state["evals_since_best"] >= config.patience
        return {"eval_reward": mean, "eval_best": state["best_eval"]}

    evaluating = bool(eval_prompts) and config.eval_every > 0
    if evaluating and state["iteration"] == 0 and state["best_eval"] is None:
        evaluate(0)  # the baseline every later evaluation must beat

    while state["iteration"] < config.n_iterations and not state["stopped_early"]:
        iteration = state["iteration"] + 1
        metrics = _iteration(policy, reference, value_model, policy_opt, value_opt, tokenizer, prompts,
                             reward_fn, config, iteration, last_checkpoint)
        if evaluating and (iteration % config.eval_every == 0 or iteration == config.n_iterations):
            metrics.update(evaluate(iteration))
        state["iteration"] = iteration
        state["metrics"].append(metrics)
        if (iteration % config.checkpoint_every == 0 or iteration == config.n_iterations
                or state["stopped_early"]):
            save_state()
        if progress is not None:
            progress(iteration, config.n_iterations, metrics)

    if state["iteration"] > 0 and last_checkpoint != state["iteration"]:
        save_state()
    if evaluating and config.keep_best and state["best_iteration"] is not None:
        best = torch.load(out / BEST_FILE, map_location="cpu", weights_only=True)
        if best["iteration"] != state["best_iteration"]:
            raise RuntimeError(f"{out / BEST_FILE} holds iteration {best['iteration']}, the state says "
                               f"{state['best_iteration']}")
        policy.load_state_dict(best["policy"])
    policy_dir = _export(policy, tokenizer, out, config, state)
    return PPOResult(policy_dir, state["iteration"], state["stopped_early"], state["best_iteration"],
                     state["metrics"])


def _iteration(
    policy: Transformer,
    reference: Transformer,
    value_model: ValueModel,
    policy_opt: torch.optim.Optimizer,
    value_opt: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    config: PPOConfig,
    iteration: int,
    last_checkpoint: int | None,
) -> dict[str, float]:
    """One PPO iteration: rollout, scoring, GAE, update. Returns its metrics."""
    device = policy.output.weight.device
    timings: dict[str, float] = {}

    def diverged(reason: str) -> PPODiverged:
        return PPODiverged(iteration, reason, last_checkpoint)

    # 1. Rollout and reward.
    batch_prompts = [prompts[i] for i in _batch_indices(len(prompts), config.batch_size, iteration, config.seed)]
    (prompt_tokens, responses), rewards, timings = _sample_and_score(
        policy, tokenizer, batch_prompts, reward_fn, config, seed=_seed(config.seed, "rollout", iteration))
    if not torch.isfinite(rewards.combined).all():
        raise diverged("the reward function returned a non-finite score")
    rollout = make_rollout(prompt_tokens, responses, tokenizer.pad_id)
    rollout = Rollout(*(t.to(device) for t in (rollout.tokens, rollout.positions, rollout.mask, rollout.response_ids)))
    mask = rollout.mask

    # 2. Old log-probs, reference log-probs and values, one full forward each, in mini-batch chunks.
    start = time.perf_counter()
    B, mb = config.batch_size, config.mini_batch_size
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        chunks = [torch.arange(i, min(i + mb, B), device=device) for i in range(0, B, mb)]
        old_logprobs = torch.cat([response_logprobs(policy, rollout, rows)[0] for rows in chunks])  # (B, R)
        ref_logprobs = torch.cat([response_logprobs(reference, rollout, rows)[0] for rows in chunks])
        old_values = torch.cat([response_values(value_model, rollout, rows) for rows in chunks]) * mask
        if not (torch.isfinite(old_logprobs).all() and torch.isfinite(old_values).all()):
            raise diverged("non-finite log-probs or values in the rollout")
        scores = rewards.whitened.to(device=device, dtype=torch.float32)
        token_rewards, kl = per_token_rewards(old_logprobs, ref_logprobs, scores, mask, config.kl_coef)
        seq_kl = float(kl.sum(1).mean())
        if seq_kl > config.max_kl:
            raise diverged(f"KL(pi || pi_0) = {seq_kl:.3f} nats per sequence exceeds max_kl {config.max_kl}")
        advantages, returns = gae(token_rewards, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    timings["time_forward"] = time.perf_counter() - start

    # 3. PPO epochs over shuffled mini-batches: one policy step and one value step each.
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(_seed(config.seed, "minibatch", iteration))
    stats: dict[str, list[float]] = {k: [] for k in
                                     ("pg_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac")}
    policy.train()
    value_model.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(device)
        for lo in range(0, B, mb):
            rows = order[lo : lo + mb]
            m = mask[rows]
            with autocast:  # the same forward as the old log-probs': the ratio is exactly 1 before the first step
                logprobs, entropy = response_logprobs(policy, rollout, rows)
                values = response_values(value_model, rollout, rows)
            pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, config.cliprange)
            vf_loss, vf_stats = value_loss(values, old_values[rows], returns[rows], m, config.cliprange_value)
            if not (torch.isfinite(pg_loss) and torch.isfinite(vf_loss)):
                raise diverged(f"non-finite loss (pg_loss {float(pg_loss)}, value_loss {float(vf_loss)})")
            for model, opt, loss in ((policy, policy_opt, pg_loss), (value_model, value_opt, vf_loss)):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise diverged("non-finite gradient norm")
                opt.step()
            for k, v in {"pg_loss": pg_loss, "value_loss": vf_loss, "entropy": masked_mean(entropy, m),
                         **pg_stats, **vf_stats}.items():
                stats[k].append(float(v.detach()))
    policy.eval()
    value_model.eval()
    timings["time_update"] = time.perf_counter() - start

    lengths = mask.sum(1)
    return {
        "iteration": iteration,
        **rewards.summary(),
        "kl": seq_kl,  # mean over sequences of sum_t (log pi - log pi_0)
        "kl_penalty": float(-config.kl_coef * kl.sum(1).mean()),
        "non_score_reward": float((token_rewards.sum(1) - scores).mean()),
        "returns": masked_mean(returns, mask).item(),
        "values": masked_mean(old_values, mask).item(),
        **{k: sum(v) / len(v) for k, v in stats.items()},
        "response_length": float(lengths.mean()),
        "eos_fraction": float(sum(1 for r in responses if r and r[-1] == tokenizer.eos_id) / B),
        **timings,
    }


def _sample_and_score(
    policy: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    config: PPOConfig,
    *,
    seed: int,
) -> tuple[tuple[list[list[int]], list[list[int]]], Any, dict[str, float]]:
    """Sample one response per prompt from the policy itself and score it. Returns (prompt tokens, response
    tokens), the Rewards, and the seconds spent in generation and scoring."""
    start = time.perf_counter()
    prompt_tokens = [tokenizer.encode_dialog(p.messages) for p in prompts]
    out = generate(policy, prompt_tokens, config.max_new_tokens, temperature=1.0, eos_id=tokenizer.eos_id, seed=seed)
    t_generation = time.perf_counter() - start
    start = time.perf_counter()
    # The reward models read the answer without its closing EOS; the policy is scored on what it said.
    bare = [r[:-1] if r and r[-1] == tokenizer.eos_id else r for r in out.tokens]
    texts = [tokenizer.decode(r) for r in bare]
    rewards = score(reward_fn, prompts, texts, bare, config.reward)
    timings = {"time_generation": t_generation, "time_scoring": time.perf_counter() - start}
    return (prompt_tokens, out.tokens), rewards, timings


def _batch_indices(n_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Prompts of an iteration: the stream of per-epoch shuffles of all prompts, cut in batch_size pieces.
    A function of (iteration, seed) alone, so a resumed run draws the same prompts."""
    begin, end = (iteration - 1) * batch_size, iteration * batch_size
    indices: list[int] = []
    for epoch in range(begin // n_prompts, (end - 1) // n_prompts + 1):
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(_seed(seed, "prompts", epoch)))
        lo, hi = max(begin - epoch * n_prompts, 0), min(end - epoch * n_prompts, n_prompts)
        indices += perm[lo:hi].tolist()
    return indices


def _seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed for one purpose and index, independent of every other."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()[:8], "little") >> 1


def _adamw(model: nn.Module, lr: float, config: PPOConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying RMSNorm gains and the value bias toward 0 is not regularisation.
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: on CPU some 9x faster than the per-tensor loop, which dominated a small model's update.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(config.beta1, config.beta2), eps=config.adam_eps, fused=fused,
    )  # fmt: skip


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _export(policy: Transformer, tokenizer: Tokenizer, out: Path, config: PPOConfig, state: dict[str, Any]) -> Path:
    """The returned policy as a complete checkpoint directory, out/policy (replaced atomically)."""
    tokenizer_path = out / "tokenizer.model"
    with _atomic_file(tokenizer_path) as tmp:
        tmp.write_bytes(tokenizer.sp.serialized_model_proto())
    last = state["metrics"][-1] if state["metrics"] else {}
    extra = {
        "algorithm": "ppo", "iterations": state["iteration"], "stopped_early": state["stopped_early"],
        "best_iteration": state["best_iteration"], "best_eval_reward": state["best_eval"],
        "last_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)},
    }  # fmt: skip
    return save_checkpoint(policy, out / "policy", tokenizer_path=tokenizer_path, config=config, extra=extra)
