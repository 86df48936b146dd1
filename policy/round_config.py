"""The typed config of an RLHF round, validated once where it enters (admin, API, command).

Plain Python: no Django, no torch, so the web process validates a round before anything is created
and the worker turns the same dataclass into policy.rejection_sampling's, policy.ppo's, policy.gatt's and
policy.context_distillation's configs (`RoundConfig.rejection_sampling_config()`, `ppo_config()`,
`gatt_config()`, `context_distillation_config()`, imported lazily there). Every range
checked here is at least as strict as those modules' own checks, so a config accepted at launch is
never refused later by the worker (tests/policy/test_rounds.py pins that).

Errors name the field by its dotted path ("ppo.kl_coef", "rejection_sampling.k"), which the services
turn into "config.ppo.kl_coef" for the form, the API's 400 and the command line.

The defaults below are the small-model recipe (every model under 1B parameters, the demo policy
included); a launch resolves a user's partial config with `RoundConfig.for_policy(data, params)`, which
puts the paper's values under it for larger policies (policy/recipes.py says why).
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_NEW_TOKENS = 4096
MAX_TEMPERATURE = 5.0


class ConfigError(ValueError):
    """A config value that cannot be used: `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


@dataclass
class RejectionSamplingSection:
    k: int = 16  # samples per prompt, the best one kept (paper: 10-100)
    temperature: float = 1.2  # sampling temperature (paper: 1.2-1.3 best for 10-100 samples)
    top_p: float = 1.0  # nucleus sampling (1: off)
    max_new_tokens: int = 48  # longest response sampled
    chunk_prompts: int = 64  # prompts per resumable chunk
    rescore_pool: bool = True  # re-score the lineage's earlier best with this round's reward models

    def validate(self, p: str) -> None:
        _check(1 <= self.k <= 1024, f"{p}.k", "K (samples per prompt) must be between 1 and 1024.")
        _check(0 < self.temperature <= MAX_TEMPERATURE, f"{p}.temperature",
               f"T must be above 0 (0 would draw the same sample K times) and at most {MAX_TEMPERATURE}.")
        _check(0 < self.top_p <= 1, f"{p}.top_p", "top_p must be in (0, 1].")
        _check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"Between 1 and {MAX_NEW_TOKENS}.")
        _check(self.chunk_prompts >= 1, f"{p}.chunk_prompts", "At least 1.")


@dataclass
class SFTSection:
    lr: float = 3e-4  # peak learning rate, cosine to 0 (Llama 2 SFT: 2e-5 for 7B+; tiny models need more)
    epochs: int = 3  # passes over the pool when max_steps is 0
    max_steps: int = 0  # > 0: exactly this many optimizer steps
    batch_size: int = 16  # sequences per optimizer step
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping

    def validate(self, p: str) -> None:
        _check(0 < self.lr <= 1, f"{p}.lr", "The learning rate must be in (0, 1].")
        _check(self.epochs >= 1, f"{p}.epochs", "At least 1.")
        _check(self.max_steps >= 0, f"{p}.max_steps", "0 (use epochs) or more.")
        _check(self.batch_size >= 1, f"{p}.batch_size", "At least 1.")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "0 or more.")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "0 or more.")
        _check(self.grad_clip >= 0, f"{p}.grad_clip", "0 (off) or more.")


@dataclass
class PPOSection:
    n_iterations: int = 30  # PPO iterations (paper: 200-400)
    batch_size: int = 32  # prompts per iteration (paper: 512)
    mini_batch_size: int = 8  # samples per optimizer step (paper: 64); must divide batch_size
    ppo_epochs: int = 1  # passes over each batch (paper: 1)
    max_new_tokens: int = 48
    kl_coef: float = 0.1  # beta, the per-token KL penalty (paper: 0.01 for 7B-13B; small models hack it, see recipes)
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2  # (paper: 0.2)
    cliprange_value: float = 0.2
    lr: float = 5e-5  # constant (paper: 1e-6 for 7B-70B)
    value_lr: float = 1e-4
    weight_decay: float = 0.1  # (paper: 0.1)
    max_grad_norm: float = 1.0  # (paper: 1.0)
    max_kl: float = 50.0  # mean per-sequence KL above which the round fails as diverged
    eval_every: int = 5  # iterations between held-out evaluations (0: never)
    patience: int = 4  # evaluations without improvement before stopping early
    checkpoint_every: int = 5  # iterations between resumable training states

    def validate(self, p: str) -> None:
        for name in ("n_iterations", "ppo_epochs", "max_new_tokens", "checkpoint_every", "patience", "mini_batch_size"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "At least 1.")
        _check(self.batch_size >= 2, f"{p}.batch_size", "At least 2: rewards are whitened over the batch.")
        _check(self.batch_size % self.mini_batch_size == 0, f"{p}.mini_batch_size",
               f"Must divide batch_size ({self.batch_size}).")
        _check(self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"At most {MAX_NEW_TOKENS}.")
        _check(self.kl_coef >= 0, f"{p}.kl_coef", "beta (the KL coefficient) cannot be negative.")
        _check(0 <= self.gamma <= 1, f"{p}.gamma", "In [0, 1].")
        _check(0 <= self.lam <= 1, f"{p}.lam", "In [0, 1].")
        _check(self.cliprange > 0, f"{p}.cliprange", "Must be positive.")
        _check(self.cliprange_value > 0, f"{p}.cliprange_value", "Must be positive.")
        _check(0 < self.lr <= 1, f"{p}.lr", "The learning rate must be in (0, 1].")
        _check(0 < self.value_lr <= 1, f"{p}.value_lr", "The learning rate must be in (0, 1].")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "0 or more.")
        _check(self.max_grad_norm > 0, f"{p}.max_grad_norm", "Must be positive.")
        _check(self.max_kl > 0, f"{p}.max_kl", "Must be positive.")
        _check(self.eval_every >= 0, f"{p}.eval_every", "0 (never) or more.")


@dataclass
class NextBatchSection:
    prompts: int = 32  # prompts the new checkpoint and its parent answer for the next batch (0: none)
    new_temperature: float = 0.7  # the new checkpoint's arm
    parent_temperature: float = 1.0  # the parent's arm
    max_new_tokens: int = 64

    def validate(self, p: str) -> None:
        _check(self.prompts >= 0, f"{p}.prompts", "0 (no next-batch comparisons) or more.")
        for name in ("new_temperature", "parent_temperature"):
            _check(0 <= getattr(self, name) <= MAX_TEMPERATURE, f"{p}.{name}", f"Between 0 and {MAX_TEMPERATURE}.")
        _check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"Between 1 and {MAX_NEW_TOKENS}.")


@dataclass
class EvaluationSection:
    """The round's own check: the new checkpoint against its parent on prompts the round never trained on."""

    prompts: int = 200  # at most this many held-out prompts are answered by both checkpoints (0: no evaluation)
    min_prompts: int = 20  # fewer held-out prompts than this is refused at launch (a CI over 5 prompts says nothing)
    temperature: float = 0.7  # both checkpoints sample at this temperature, top_p, seed and length
    top_p: float = 0.9
    max_new_tokens: int = 48
    human_comparisons: int = 0  # this many of the pairs also go to people as comparisons (the paper's human evaluation)

    def validate(self, p: str) -> None:
        _check(self.prompts >= 0, f"{p}.prompts", "0 (no evaluation) or more.")
        _check(self.min_prompts >= 1, f"{p}.min_prompts", "At least 1.")
        _check(0 < self.temperature <= MAX_TEMPERATURE, f"{p}.temperature", f"Above 0 and at most {MAX_TEMPERATURE}.")
        _check(0 < self.top_p <= 1, f"{p}.top_p", "top_p must be in (0, 1].")
        _check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"Between 1 and {MAX_NEW_TOKENS}.")
        _check(0 <= self.human_comparisons <= self.prompts, f"{p}.human_comparisons",
               f"Between 0 and evaluation.prompts ({self.prompts}).")


@dataclass
class GAttSection:
    """Ghost Attention (Llama 2 §3.3): multi-turn dialogues sampled with the instruction on every user turn,
    then SFT (the round's sft section) with it only in the first turn and the loss on the last reply only."""

    instruction: str = "pirate"  # a checkable instruction (policy/gatt_check.py: pirate, one_sentence) or "random"
    dialogues: int = 64  # synthetic dialogues, their user turns drawn from the round's training prompts
    turns: int = 4  # user turns per dialogue (fewer where the model's context ends first)
    attempts: int = 4  # replies sampled per turn; the first that follows the instruction is kept ("random": 1)
    keep_unfollowed: bool = False  # also train on dialogues where some reply missed the instruction
    plain_fraction: float = 0.5  # share of dialogues sampled and trained with no instruction at all: the contrast
    #   that teaches "follow it when it is there" rather than "always" (the paper mixed GAtt data into its other data)
    temperature: float = 0.7  # sampling of the replies
    top_p: float = 0.9
    max_new_tokens: int = 48
    shorten_probability: float = 0.5  # how often the training system message is the short form (paper: half)
    all_turns: bool = False  # also one sample per earlier prefix of each dialogue (paper: the whole dialogue)
    max_constraints: int = 2  # "random": constraints combined per instruction (paper: at random)
    chunk_dialogues: int = 16  # dialogues per resumable sampling chunk

    def validate(self, p: str) -> None:
        from policy.gatt_check import INSTRUCTIONS, RANDOM

        _check(self.instruction in (*INSTRUCTIONS, RANDOM), f"{p}.instruction",
               f"One of {', '.join((*INSTRUCTIONS, RANDOM))}.")
        for name in ("dialogues", "turns", "attempts", "chunk_dialogues"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "At least 1.")
        _check(self.turns <= 64, f"{p}.turns", "At most 64.")
        _check(self.attempts <= 64, f"{p}.attempts", "At most 64.")
        _check(0 < self.temperature <= MAX_TEMPERATURE, f"{p}.temperature", f"Above 0 and at most {MAX_TEMPERATURE}.")
        _check(0 < self.top_p <= 1, f"{p}.top_p", "top_p must be in (0, 1].")
        _check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"Between 1 and {MAX_NEW_TOKENS}.")
        _check(0 <= self.shorten_probability <= 1, f"{p}.shorten_probability", "In [0, 1].")
        _check(0 <= self.plain_fraction < 1, f"{p}.plain_fraction",
               "In [0, 1): some dialogues must carry the instruction.")
        _check(1 <= self.max_constraints <= 4, f"{p}.max_constraints", "Between 1 and 4 (policy.gatt's kinds).")


@dataclass
class ContextDistillationSection:
    """Safety context distillation (Llama 2 §4.2.4): the round's adversarial training prompts answered with
    and without the safety preprompt, the preprompted answer kept where the safety RM scores it higher, then
    SFT (the round's sft section) on it without the preprompt."""

    preprompt: str = "You are a safe and responsible assistant."  # the paper's generic safety preprompt
    answer_templates: bool = True  # add the answer template of the prompt's risk category (the paper's targeted form)
    margin: float = 0.0  # keep an answer only if its safety score beats the plain answer's by more than this
    temperature: float = 0.7  # sampling of both answers
    top_p: float = 0.9
    max_new_tokens: int = 48

    def validate(self, p: str) -> None:
        _check(0 < len(self.preprompt.strip()) <= 2000, f"{p}.preprompt", "Between 1 and 2000 characters.")
        _check(self.margin >= 0, f"{p}.margin", "0 or more.")
        _check(0 < self.temperature <= MAX_TEMPERATURE, f"{p}.temperature", f"Above 0 and at most {MAX_TEMPERATURE}.")
        _check(0 < self.top_p <= 1, f"{p}.top_p", "top_p must be in (0, 1].")
        _check(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"{p}.max_new_tokens", f"Between 1 and {MAX_NEW_TOKENS}.")


@dataclass
class RoundConfig:
    """Everything a round needs besides its checkpoint, reward models and prompts."""

    safety_threshold: float = 0.15  # R_c = R_safety when sigmoid(r_safety) is below this (paper: 0.15)
    eval_fraction: float = 0.2  # share of the prompts held out: PPO's early stopping and the round's evaluation
    seed: int = 0  # seeds sampling, data order, the held-out split
    rejection_sampling: RejectionSamplingSection = field(default_factory=RejectionSamplingSection)
    sft: SFTSection = field(default_factory=SFTSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    next_batch: NextBatchSection = field(default_factory=NextBatchSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    gatt: GAttSection = field(default_factory=GAttSection)
    context_distillation: ContextDistillationSection = field(default_factory=ContextDistillationSection)

    def validate(self) -> RoundConfig:
        _check(0 < self.safety_threshold < 1, "safety_threshold", "A probability in (0, 1).")
        _check(0 <= self.eval_fraction < 1, "eval_fraction", "In [0, 1).")
        _check(0 <= self.seed < 2**63, "seed", "A non-negative whole number below 2^63.")
        for name in ("rejection_sampling", "sft", "ppo", "next_batch", "evaluation", "gatt", "context_distillation"):
            getattr(self, name).validate(name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_policy(cls, data: Any, params: Any) -> RoundConfig:
        """The config a launch on a policy with these ModelArgs params runs: the recipe of the policy's
        scale (policy/recipes.py), then the user's values over it. ConfigError names a bad field."""
        from policy.recipes import ROUND_RECIPES, merged, scale_of

        if data is not None and not isinstance(data, dict):
            raise ConfigError("config", "Must be a JSON object.")
        return cls.from_dict(merged(ROUND_RECIPES[scale_of(params)], data or {}))

    @classmethod
    def from_dict(cls, data: Any) -> RoundConfig:
        """A validated config from JSON-like data; missing fields take their defaults. ConfigError names
        the first bad field (unknown names, wrong types, out of range)."""
        return _build(cls, {} if data is None else data, "").validate()

    # The worker's view: the torch modules' own configs (imported lazily; they need torch).
    def rejection_sampling_config(self, round_number: int, device: str = "auto"):
        from policy.rejection_sampling import RejectionSamplingConfig
        from policy.reward import RewardConfig

        rs = self.rejection_sampling
        return RejectionSamplingConfig(
            k=rs.k, temperature=rs.temperature, top_p=rs.top_p, max_new_tokens=rs.max_new_tokens,
            chunk_prompts=rs.chunk_prompts, round=round_number, rescore_pool=rs.rescore_pool, seed=self.seed,
            reward=RewardConfig(safety_threshold=self.safety_threshold), sft=self.sft_config(device),
        )  # fmt: skip

    def sft_config(self, device: str = "auto"):
        from policy.sft import SFTConfig

        s = self.sft
        return SFTConfig(lr=s.lr, epochs=s.epochs, max_steps=s.max_steps, batch_size=s.batch_size,
                         warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                         seed=self.seed, device=device)

    def ppo_config(self):
        from policy.ppo import PPOConfig
        from policy.reward import RewardConfig

        p = self.ppo
        return PPOConfig(
            n_iterations=p.n_iterations, batch_size=p.batch_size, mini_batch_size=p.mini_batch_size,
            ppo_epochs=p.ppo_epochs, max_new_tokens=p.max_new_tokens, kl_coef=p.kl_coef, gamma=p.gamma, lam=p.lam,
            cliprange=p.cliprange, cliprange_value=p.cliprange_value, lr=p.lr, value_lr=p.value_lr,
            weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, max_kl=p.max_kl, eval_every=p.eval_every,
            patience=p.patience, checkpoint_every=p.checkpoint_every, seed=self.seed,
            reward=RewardConfig(safety_threshold=self.safety_threshold),
        )  # fmt: skip


    def gatt_config(self):
        from policy.gatt import GAttConfig

        g = self.gatt
        return GAttConfig(max_constraints=g.max_constraints, shorten_probability=g.shorten_probability,
                          all_turns=g.all_turns, seed=self.seed)

    def context_distillation_config(self, answer_template: str | None = None):
        """policy.context_distillation's config; answer_template None: the paper's generic template (or none,
        when answer_templates is off)."""
        from policy.context_distillation import ANSWER_TEMPLATE, ContextDistillationConfig

        c = self.context_distillation
        template = answer_template if answer_template is not None else ANSWER_TEMPLATE
        return ContextDistillationConfig(preprompt=c.preprompt, answer_template=template if c.answer_templates else "",
                                         margin=c.margin)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", "Must be a JSON object.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(where, f"Unknown field; known: {', '.join(known)}.")
    values = {}
    for name, f in known.items():
        where = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        values[name] = _coerce(hints[name], data[name], where)
    return cls(**values)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        return _build(kind, value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, "Must be true or false.")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(where, "Must be a string.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(where, "Must be a whole number.")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, "Must be a number.")
        if not math.isfinite(value):
            raise ConfigError(where, "Must be a finite number.")
        return float(value)
    raise ConfigError(where, f"Unsupported type {kind!r}.")  # pragma: no cover - every field is one of the above


def default_config() -> dict[str, Any]:
    return RoundConfig().to_dict()

