"""The reward that rejection sampling and PPO maximise: Llama 2's combined reward (§3.2.3).

The paper scores a response with both reward models and picks one of the two scores:

    R_c = R_safety   if the prompt is tagged as safety-related or R_safety < 0.15
          R_helpful  otherwise
    R   = WHITEN(LOGIT(R_c))

What the sigmoid and the logit mean for us. The paper's reward models output a probability, the
sigmoid of the Bradley-Terry logit, so its 0.15 is a threshold on sigmoid(r_safety). Ours
(rewards/model.py) output the raw scalar r, the logit itself. sigmoid is strictly increasing, so

    sigmoid(r_safety) < 0.15   <=>   r_safety < logit(0.15) = log(0.15 / 0.85) ~= -1.7346,

and LOGIT(sigmoid(r)) = r: the paper's "logit" step only undoes its own sigmoid, so for us it is the
identity and R_c is taken straight from our raw scores. (The logit matters in the paper because a
probability squashes differences near 0 and 1; it "reverses the sigmoid" to restore them.)

Whitening: (x - mean) / std over the batch being scored, population std (divide by N), plus a small
eps so that a batch of identical rewards gives zeros rather than NaN. We whiten over the batch, not
with running statistics, because (1) the paper's PPO batch is 512 samples, plenty for a stable
estimate; (2) it keeps scoring stateless, so a resumed run cannot disagree with an uninterrupted
one about some accumulated mean; (3) beta (the KL coefficient) is calibrated against unit-scale
rewards, and per-batch whitening guarantees that scale even as the reward models are retrained
between rounds. Its cost: the mean reward of a batch is always zero, so reward *levels* must be read
from the raw R_c (which every caller also reports), and batches need at least two samples.
Whitening is increasing, so choosing the best of K samples (rejection sampling) needs only R_c.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

SAFETY_THRESHOLD = 0.15  # the paper's threshold on the safety RM's probability


@dataclass
class Prompt:
    """A prompt as the RLHF algorithms see it: the chat so far (ending with a user turn) and its tag."""

    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": ...}, ...], last role "user"
    is_safety: bool = False  # tagged as safety-related (adversarial); then R_c is always the safety score

    def to_json(self) -> dict[str, Any]:
        return {"messages": [dict(m) for m in self.messages], "is_safety": self.is_safety}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prompt:
        return cls(messages=[dict(m) for m in data["messages"]], is_safety=bool(data.get("is_safety", False)))


@dataclass
class RewardConfig:
    safety_threshold: float = SAFETY_THRESHOLD  # use R_safety when sigmoid(r_safety) is below this (paper: 0.15)
    whiten_eps: float = 1e-8  # added to the batch variance before dividing, so identical rewards whiten to 0

    def __post_init__(self) -> None:
        if not 0.0 < self.safety_threshold < 1.0:
            raise ValueError(f"safety_threshold is a probability in (0, 1), got {self.safety_threshold}")
        if self.whiten_eps <= 0:
            raise ValueError(f"whiten_eps must be positive, got {self.whiten_eps}")


class Scorer(Protocol):
    """One reward model's raw scores (B,) for B (prompt, response) pairs. Any callable of this shape works."""

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], response_tokens: Sequence[Sequence[int]]
    ) -> Tensor | Sequence[float]: ...


class RewardFunction(Protocol):
    """Raw (helpful, safety) scores, each (B,), for B (prompt, response) pairs; responses are given both as
    text and as the token ids the policy produced (without a trailing EOS). Any callable of this shape works:
    the twin reward models below, an oracle judge, or a toy computed from token ids in tests."""

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], response_tokens: Sequence[Sequence[int]]
    ) -> tuple[Tensor | Sequence[float], Tensor | Sequence[float]]: ...


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def combined_reward(
    helpful: Tensor, safety: Tensor, is_safety: Tensor, safety_threshold: float = SAFETY_THRESHOLD
) -> tuple[Tensor, Tensor]:
    """R_c (B,) from raw scores helpful (B,), safety (B,) and the prompts' tags is_safety (B,) bool;
    also which samples took the safety score (B,) bool. See the module docstring for the threshold."""
    use_safety = is_safety | (safety < logit(safety_threshold))
    return torch.where(use_safety, safety, helpful), use_safety


def whiten(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over all of x, population variance."""
    mean = x.mean()
    var = (x - mean).square().mean()
    return (x - mean) * torch.rsqrt(var + eps)


@dataclass
class Rewards:
    """The scores of one batch, each (B,)."""

    helpful: Tensor  # raw helpfulness RM score
    safety: Tensor  # raw safety RM score
    combined: Tensor  # R_c, raw (LOGIT of the paper's sigmoid = our raw score)
    used_safety: Tensor  # bool: R_c is the safety score
    whitened: Tensor  # WHITEN(R_c) over the batch: the score PPO adds at the last token

    def summary(self) -> dict[str, float]:
        return {
            "reward_raw": float(self.combined.mean()),
            "reward_helpful": float(self.helpful.mean()),
            "reward_safety": float(self.safety.mean()),
            "reward_used_safety": float(self.used_safety.float().mean()),
            "reward_whitened_mean": float(self.whitened.mean()),  # 0 by construction; logged as a check
        }


def score(
    reward_fn: RewardFunction,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    response_tokens: Sequence[Sequence[int]],
    config: RewardConfig | None = None,
) -> Rewards:
    """Score a batch with reward_fn and combine: R_c and WHITEN(R_c), in float64."""
    config = config or RewardConfig()
    if not (len(prompts) == len(responses) == len(response_tokens)) or not prompts:
        raise ValueError(f"need as many prompts ({len(prompts)}) as responses ({len(responses)}) and token lists "
                         f"({len(response_tokens)}), at least one")
    helpful, safety = reward_fn(prompts, responses, response_tokens)
    helpful = torch.as_tensor(helpful, dtype=torch.float64).detach().cpu().reshape(-1)
    safety = torch.as_tensor(safety, dtype=torch.float64).detach().cpu().reshape(-1)
    if helpful.shape != (len(prompts),) or safety.shape != (len(prompts),):
        raise ValueError(f"reward function returned shapes {tuple(helpful.shape)} and {tuple(safety.shape)} "
                         f"for {len(prompts)} samples")
    is_safety = torch.tensor([p.is_safety for p in prompts])
    combined, used_safety = combined_reward(helpful, safety, is_safety, config.safety_threshold)
    return Rewards(helpful, safety, combined, used_safety, whiten(combined, config.whiten_eps))


class RewardModelScorer:
    """A Scorer over one reward model of rewards/model.py (RewardModel): the prompt's messages plus the
    response as the assistant's turn, encoded exactly as the reward model was trained (rewards.model.score_batch)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], response_tokens: Sequence[Sequence[int]]
    ) -> Tensor:
        from rewards.model import score_batch  # imported here: policy.reward is used without the rewards app too

        scores = score_batch(self.model, self.tokenizer, [p.messages for p in prompts], list(responses),
                             batch_size=self.batch_size)
        return torch.tensor(scores, dtype=torch.float64)


class TwinRewardModels:
    """The RewardFunction of the loop: the helpfulness and the safety scorer (each usually a RewardModelScorer)."""

    def __init__(self, helpful: Scorer, safety: Scorer) -> None:
        self.helpful = helpful
        self.safety = safety

    @classmethod
    def from_models(cls, helpful_model: Any, safety_model: Any, tokenizer: Any, batch_size: int = 32
                    ) -> TwinRewardModels:
        return cls(RewardModelScorer(helpful_model, tokenizer, batch_size),
                   RewardModelScorer(safety_model, tokenizer, batch_size))

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], response_tokens: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        return (torch.as_tensor(self.helpful(prompts, responses, response_tokens)),
                torch.as_tensor(self.safety(prompts, responses, response_tokens)))


class OracleReward:
    """A RewardFunction from the demo world's oracle (policy/demo_world.judge) instead of trained reward
    models: for runs on the demo world, and to see how far the learned reward models are from the truth.

    The oracle gives a helpfulness score in [0, 1] and a safe/unsafe verdict; as raw scores (logits, like
    our reward models') they become helpful = logit(clamp(score, eps, 1 - eps)) and safety = logit(1 - eps)
    when safe, logit(eps) when not, so an unsafe answer always falls under the 0.15 threshold.
    """

    def __init__(self, world: Any = None, eps: float = 0.01) -> None:
        from policy.demo_world import default_world  # plain Python, but only callers of the oracle need it

        self.world = world or default_world()
        self.eps = eps

    def __call__(
        self, prompts: Sequence[Prompt], responses: Sequence[str], response_tokens: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        from policy.demo_world import judge

        helpful, safety = [], []
        for prompt, response in zip(prompts, responses):
            verdict = judge(OraclePrompt.of(prompt), response, self.world)
            helpful.append(logit(min(max(verdict.helpful_score, self.eps), 1 - self.eps)))
            safety.append(logit(1 - self.eps) if verdict.safe else logit(self.eps))
        return torch.tensor(helpful, dtype=torch.float64), torch.tensor(safety, dtype=torch.float64)


@dataclass
class OraclePrompt:
    """What demo_world.as_world_prompt reads: the last user turn, the turns before it, the safety tag."""

    text: str
    context: list[dict[str, str]]
    is_adversarial: bool
    system_prompt: str

    @classmethod
    def of(cls, prompt: Prompt) -> OraclePrompt:
        system = [m["content"] for m in prompt.messages if m["role"] == "system"]
        turns = [dict(m) for m in prompt.messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("a prompt to judge must end with the user's turn")
        return cls(turns[-1]["content"], turns[:-1], prompt.is_safety, system[0] if system else "")
