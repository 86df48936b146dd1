"""The demo policy's typed config, torch-free: the web process queues a build with it, the worker and
`manage.py policy_demo_build` train with it (policy.demo_policy), and it is saved beside both
checkpoints and on the build's row."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class DemoBuildConfig:
    base_name: str = "demo-base"  # checkpoint names, also their directory names under out_root
    sft_name: str = "demo-sft"
    vocab_size: int = 1024  # SentencePiece BPE pieces
    dim: int = 192  # model width
    n_layers: int = 4
    n_heads: int = 6  # head_dim 32
    n_kv_heads: int = 3  # grouped-query attention, as the 70B model has
    multiple_of: int = 64  # FFN hidden size rounds up to this (512 at dim 192)
    max_seq_len: int = 256  # context: the longest world dialogue is about 130 tokens
    base_steps: int = 400  # optimizer steps of demo-base
    base_lr: float = 3e-3
    base_dialogs: int = 8000  # sloppy-mix dialogues drawn for demo-base
    knowledge_repeats: int = 2  # copies of each fact statement in demo-base's data
    sft_steps: int = 150  # further steps of demo-sft on clean answers
    sft_lr: float = 1e-3
    sft_dialogs: int = 4000
    batch_size: int = 32
    warmup_steps: int = 20
    eval_prompts: int = 64  # held-out prompts for the win rate; 0 skips the evaluation
    eval_max_new_tokens: int = 64
    sft_temperature: float = 0.7  # the arms the win rate compares (the default sampling arms)
    base_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoBuildConfig:
        """The config a build row or training.json recorded; unknown fields are refused, missing ones default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DemoBuildConfig field(s): {', '.join(unknown)}")
        return cls(**data)
