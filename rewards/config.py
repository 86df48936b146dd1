"""Typed configuration of reward-model training: the data mix and the optimisation recipe.

Defaults follow the Llama 2 paper (section 3.2.2): one epoch, AdamW, peak LR 1e-5, cosine decay to 10%
of the peak after a 3% warm-up of at least 5 steps, gradient clipping at 1.0, the "small" margin. The
whole config is saved next to every checkpoint and final model it produced, so a run can be
reproduced from its config and its data manifest.

No Django, no torch: the web process may read and validate these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

KINDS = ("helpfulness", "safety")
MARGIN_SCALES = ("none", "small", "large", "row")


@dataclass
class MixConfig:
    """How the training rows of each twin are drawn from the preference rows (rewards.data.build_mix)."""

    other_ratio: float = 1.0  # helpfulness RM: rows sampled from safety + imported data, per helpfulness row
    helpfulness_fraction: float = 0.1  # safety RM: share of helpfulness rows in the final mix (the paper's 90/10)
    min_train_pairs: int = 8  # fewer training pairs than this is an error, not a silent useless run
    exclude_unsafe_chosen: bool = True  # drop pairs whose chosen response is unsafe and the other safe

    def __post_init__(self) -> None:
        if self.other_ratio < 0:
            raise ValueError("mix.other_ratio must be >= 0")
        if not 0 <= self.helpfulness_fraction < 1:
            raise ValueError("mix.helpfulness_fraction must be in [0, 1)")
        if self.min_train_pairs < 1:
            raise ValueError("mix.min_train_pairs must be >= 1")


@dataclass
class RewardTrainConfig:
    """Everything a reward-model run needs besides its rows and output folder."""

    kind: str = "helpfulness"  # which twin: "helpfulness" or "safety"; picks the data mix
    base_checkpoint: str | None = None  # policy checkpoint folder (Meta or HF) the RM starts from (the chat model)
    tokenizer_path: str | None = None  # tokenizer.model; None: the one in base_checkpoint or its parent
    model_args: dict[str, Any] | None = None  # random init with these ModelArgs when there is no base_checkpoint
    head_bias: bool = True  # the scalar head nn.Linear(dim, 1) has a bias
    max_seq_len: int = 1024  # tokens per sequence; longer ones lose context tokens from the left
    pack_pairs: bool = True  # one row per pair, shared prefix run once (exact); False: chosen, rejected as 2 rows
    micro_batch_size: int = 8  # pairs per forward/backward on one process
    grad_accum_steps: int = 1  # micro-batches per optimizer step on one process
    epochs: int = 1  # passes over the mix (the paper: 1, more overfits)
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_ratio: float = 0.03  # share of the steps spent on linear warm-up ...
    min_warmup_steps: int = 5  # ... but at least this many
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (norms and biases never decay)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    margin: str = "small"  # margin by strength: "none", "small" (1, 2/3, 1/3, 0), "large" (3, 2, 1, 0), "row"
    center_coef: float = 0.0  # reward-centering penalty coef * (r_chosen + r_rejected)^2; 0 disables it
    seed: int = 0  # data order, sampling in the mix, head initialisation
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 2  # newest resumable checkpoints kept on disk
    eval_batch_size: int = 32  # sequences per forward pass in evaluation
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mix, dict):
            self.mix = MixConfig(**self.mix)
        self.adam_betas = tuple(self.adam_betas)  # JSON gives a list
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.margin not in MARGIN_SCALES:
            raise ValueError(f"margin must be one of {', '.join(MARGIN_SCALES)}, not {self.margin!r}")
        for name in ("max_seq_len", "micro_batch_size", "grad_accum_steps", "epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_seq_len < 8:
            raise ValueError("max_seq_len must be >= 8 tokens")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= warmup_ratio < 1")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.min_warmup_steps < 0:
            raise ValueError("need checkpoint_every >= 0, keep_checkpoints >= 1, min_warmup_steps >= 0")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.center_coef < 0:
            raise ValueError("grad_clip, weight_decay and center_coef must be >= 0")
        if self.base_checkpoint is None and self.model_args is None:
            raise ValueError("give base_checkpoint (a policy checkpoint) or model_args (random init)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardTrainConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown reward config keys: {', '.join(unknown)}")
        mix = data.get("mix", {})
        if isinstance(mix, dict):
            mix_known = {f.name for f in fields(MixConfig)}
            if unknown := sorted(set(mix) - mix_known):
                raise ValueError(f"unknown reward config keys: {', '.join('mix.' + k for k in unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> RewardTrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # Fields that change nothing about the weights a run produces: a run may resume with other values.
    RESUME_FREE = ("checkpoint_every", "keep_checkpoints", "eval_batch_size", "device")

    def resume_key(self) -> dict[str, Any]:
        """The part of the config a checkpoint must match to be resumed from."""
        key = {k: v for k, v in self.to_dict().items() if k not in self.RESUME_FREE}
        return json.loads(json.dumps(key))  # as a checkpoint's JSON holds it (tuples become lists)
