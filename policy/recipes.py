"""Which training recipe a model gets by its size: the one place launch defaults come from.

Plain Python (no Django, no torch): the admin, the API, the commands and the workers all resolve a
launch's config here, as `dataclass defaults <- recipe of the model's scale <- the user's values`, and
store the result on the run or round, so what ran is always on the record.

Two scales, split at 1B parameters:

- "paper": Llama 2's published recipe (arXiv 2307.09288, sections 3.1-3.2), for 7B-70B chat models.
  Reward models: peak LR 1e-5, one epoch (rewards.config's own defaults). Rounds: SFT LR 2e-5, PPO at
  LR 1e-6, beta 0.01, batch 512 / mini-batch 64, 200 iterations.
- "small": models under 1B parameters, which is every model the embedded default and the test suite run
  (the demo policy has about 2M). The paper's learning rates barely move them: a reward model at 1e-5
  stays at chance after one epoch of a few hundred pairs. The values below are the best of the recipe
  search on the demo world (docs/benchmarks.md, "The loop on the demo world"): reward models at LR 5e-4
  for two epochs; one best-of-16 rejection-sampling round at T 1.2 on the batch's prompts with SFT at
  LR 3e-4 for 3 epochs; PPO at beta 0.1 and LR 5e-5, because at the paper's beta 0.01 our 70%-accurate
  reward models were hacked (the policy padded answers with filler the reward models liked: 11% oracle
  wins against its parent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SMALL_MODEL_MAX_PARAMS = 1_000_000_000

REWARD_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},  # rewards.config.RewardTrainConfig's defaults are the paper's
    "small": {"lr": 5e-4, "epochs": 2, "micro_batch_size": 16},
}

ROUND_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "sft": {"lr": 2e-5, "epochs": 2, "batch_size": 64},
        "ppo": {"n_iterations": 200, "batch_size": 512, "mini_batch_size": 64, "kl_coef": 0.01, "lr": 1e-6,
                "value_lr": 1e-5, "max_new_tokens": 512, "eval_every": 20, "patience": 3, "checkpoint_every": 10},
        "rejection_sampling": {"k": 16, "max_new_tokens": 512},
        "evaluation": {"max_new_tokens": 512},
        "next_batch": {"max_new_tokens": 512},
        "gatt": {"max_new_tokens": 512},  # Llama 2-Chat's replies; the paper gives no dialogue counts
        "context_distillation": {"max_new_tokens": 512},
    },
    "small": {},  # policy.round_config.RoundConfig's defaults are the small-model recipe
}


# A round launched without stages runs these. PPO is left out under 1B parameters: on the demo world it has
# not earned its place (beta 0.1: a draw against its rejection-sampling parent in four runs; beta 0.01:
# reward hacking), and it doubles a round's time. Ask for it by name ("ppo") to run it.
ROUND_STAGES: dict[str, list[str]] = {
    "paper": ["rejection_sampling", "sft", "ppo"],
    "small": ["rejection_sampling", "sft"],
}


def parameter_count(params: Mapping[str, Any]) -> int:
    """Parameters of a Llama model from its ModelArgs-shaped params (params.json): embeddings and output,
    attention with grouped-query heads, SwiGLU feed-forward (hidden size as policy.model computes it)."""
    dim, n_layers = int(params["dim"]), int(params["n_layers"])
    vocab = int(params.get("vocab_size") or 32000)
    n_heads = int(params.get("n_heads") or 1)
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
    multiple_of = int(params.get("multiple_of") or 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    head_dim = dim // n_heads
    attention = 2 * dim * dim + 2 * dim * n_kv_heads * head_dim  # wq, wo; wk, wv
    return 2 * vocab * dim + n_layers * (attention + 3 * dim * hidden + 2 * dim) + dim


def scale_of(params: Mapping[str, Any] | None) -> str:
    """"small" or "paper"; a model whose size is unknown gets the paper's (cautious) recipe."""
    try:
        return "small" if parameter_count(params or {}) < SMALL_MODEL_MAX_PARAMS else "paper"
    except (KeyError, TypeError, ValueError):
        return "paper"


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`, sections (dicts) merged one level deep, as configs nest."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
