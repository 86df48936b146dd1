"""Rejection sampling as Llama 2 ran it (§3.2.3): best of K, pooled across rounds, then SFT.

1. Sample: K responses per prompt from the current policy at temperature T (the paper found the best
   temperature rising to 1.2-1.3 for 10-100 samples once the model had been through RLHF).
2. Score: the combined reward R_c of policy/reward.py. The best of the K is the arg-max of R_c; WHITEN is
   increasing, so the whitened reward would pick the same sample and we do not need it here.
3. Pool: the best sample of every prompt is added to the pool of the lineage, a JSONL file of
   {prompt, response, tokens, reward, round} passed in by the previous round and returned extended. For a
   prompt seen in an earlier round the better of the two is kept: the paper's fix for the regressions it
   saw when each round trained only on its own samples. Rewards of different rounds come from different
   reward models (they are retrained weekly), so by default the earlier round's sample is re-scored with
   this round's reward function before the two are compared (`rescore_pool`).
4. SFT on the whole pool (policy.sft.sft_train), the loss on the response tokens only.

The spread of the K samples is what rejection sampling can gain: the paper's Figure 7 plots the maximum
and the median reward among N samples against N. `max_vs_median` records it for N = 1, 2, 4, ..., K as
the exact expectation over all N-subsets of each prompt's K samples (order statistics, no resampling).

Resumable: the sampling stage writes its scored samples in chunks of `chunk_prompts` prompts, each file
written atomically, and every chunk draws from its own seed, so a restart skips the complete chunks and
produces exactly what an uninterrupted run would. The SFT stage, short next to sampling K responses per
prompt, restarts from its beginning (it is seeded, so it ends the same).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from policy.checkpoints import _atomic_file, load_checkpoint
from policy.generate import generate
from policy.model import Transformer
from policy.reward import Prompt, RewardConfig, RewardFunction, score
from policy.sft import SFTConfig, save_checkpoint, sft_train
from policy.tokenizer import Tokenizer

Progress = Callable[[int, int, Mapping[str, float]], None]  # (steps done, total steps, metrics)


@dataclass
class RejectionSamplingConfig:
    k: int = 8  # samples per prompt; the best one is kept (paper: up to 10-100)
    temperature: float = 1.2  # sampling temperature (paper: 1.2-1.3 best for 10-100 samples)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    max_new_tokens: int = 128  # longest response sampled
    chunk_prompts: int = 16  # prompts per sampling chunk: the unit written to disk and resumed from
    round: int = 1  # this round's number in the lineage, recorded with every sample it adds to the pool
    rescore_pool: bool = True  # re-score earlier rounds' samples with this reward function before comparing
    seed: int = 0  # seeds the sampling of every chunk
    reward: RewardConfig = field(default_factory=RewardConfig)  # combined reward: the safety threshold
    sft: SFTConfig = field(default_factory=SFTConfig)  # fine-tuning on the pool

    def __post_init__(self) -> None:
        if isinstance(self.reward, Mapping):  # from JSON
            self.reward = RewardConfig(**self.reward)
        if isinstance(self.sft, Mapping):
            self.sft = SFTConfig(**self.sft)
        if self.k < 1:
            raise ValueError(f"k (samples per prompt) must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive (0 would draw the same sample K times), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.chunk_prompts < 1:
            raise ValueError("need 0 < top_p <= 1, max_new_tokens >= 1 and chunk_prompts >= 1")


@dataclass
class RejectionSamplingResult:
    pool_path: Path  # the lineage's pool, extended with this round's best samples
    policy_dir: Path  # the fine-tuned policy: Meta format + tokenizer.model + training.json
    metrics: dict[str, Any]


def rejection_sampling_round(
    policy: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    config: RejectionSamplingConfig,
    out_dir: str | os.PathLike[str],
    *,
    pool_in: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> RejectionSamplingResult:
    """One round: sample and score (resumable), pool with the lineage's earlier best, SFT `policy` in place.

    out_dir receives config.json, samples/chunk_NNNNN.jsonl, pool.jsonl, policy/ and result.json. Calling
    again with the same arguments resumes; once result.json exists it returns that result (loading the
    fine-tuned weights into `policy`).
    """
    if not prompts:
        raise ValueError("no prompts to sample")
    out = Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    earlier = _read_pool(pool_in) if pool_in else []  # read first: a bad pool fails before hours of sampling
    run_record = {"config": json.loads(json.dumps(asdict(config))),
                  "prompts_sha256": _sha256(p.to_json() for p in prompts),
                  "pool_in": str(pool_in) if pool_in else None, "pool_in_sha256": _sha256(earlier)}
    _check_or_write_config(out / "config.json", run_record)
    if (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        finished = load_checkpoint(out / "policy", dtype=policy.output.weight.dtype)
        policy.load_state_dict(finished.state_dict())
        return RejectionSamplingResult(Path(result["pool_path"]), Path(result["policy_dir"]), result["metrics"])

    # 1-2. Sample K per prompt and score, chunk by chunk; a complete chunk on disk is never redone.
    n_chunks = math.ceil(len(prompts) / config.chunk_prompts)
    pool_size_estimate = len({_prompt_key(p.to_json()) for p in prompts} | {_prompt_key(e["prompt"]) for e in earlier})
    sft_steps_estimate = (config.sft.max_steps
                          or math.ceil(pool_size_estimate / config.sft.batch_size) * config.sft.epochs)
    scored: list[dict[str, Any]] = []
    for c in range(n_chunks):
        path = out / "samples" / f"chunk_{c:05d}.jsonl"
        if not path.exists():
            lo = c * config.chunk_prompts
            rows = _sample_chunk(policy, tokenizer, prompts[lo : lo + config.chunk_prompts], lo, reward_fn, config,
                                 seed=_seed(config.seed, c))
            with _atomic_file(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        scored += [json.loads(line) for line in path.read_text().splitlines()]
        if progress is not None:
            progress(c + 1, n_chunks + sft_steps_estimate, {"prompts_sampled": float(len(scored))})

    # 3. Best of K, pooled with the best of earlier rounds.
    best = [max(row["samples"], key=lambda s: s["reward"]) for row in scored]
    pool, pool_stats = _merge_pool(earlier, scored, best, tokenizer, reward_fn, config)
    pool_path = out / "pool.jsonl"
    with _atomic_file(pool_path) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in pool))

    # 4. SFT on the pool: the prompt's turns, then the kept response as the assistant's answer.
    dialogs = [[*entry["prompt"]["messages"], {"role": "assistant", "content": entry["response"]}] for entry in pool]

    def sft_progress(step: int, total: int, metrics: Mapping[str, float]) -> None:
        if progress is not None:
            progress(n_chunks + step, n_chunks + total, metrics)

    sft_metrics = sft_train(policy, tokenizer, dialogs, config.sft, sft_progress)

    rewards_all = [s["reward"] for row in scored for s in row["samples"]]
    metrics: dict[str, Any] = {
        "prompts": len(scored),
        "samples": len(rewards_all),
        "reward_mean": sum(rewards_all) / len(rewards_all),
        "reward_best_mean": sum(b["reward"] for b in best) / len(best),
        "best_eos_fraction": sum(b["eos"] for b in best) / len(best),
        "max_vs_median": max_vs_median([[s["reward"] for s in row["samples"]] for row in scored]),
        **pool_stats,
        **{f"sft_{k}": v for k, v in sft_metrics.items()},
    }
    tokenizer_path = out / "tokenizer.model"
    with _atomic_file(tokenizer_path) as tmp:
        tmp.write_bytes(tokenizer.sp.serialized_model_proto())
    policy_dir = save_checkpoint(policy, out / "policy", tokenizer_path=tokenizer_path, config=config,
                                 extra={"algorithm": "rejection_sampling", "metrics": metrics})
    with _atomic_file(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"pool_path": str(pool_path), "policy_dir": str(policy_dir), "metrics": metrics},
                                  indent=2))
    return RejectionSamplingResult(pool_path, policy_dir, metrics)


def _sample_chunk(
    policy: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    first_index: int,
    reward_fn: RewardFunction,
    config: RejectionSamplingConfig,
    *,
    seed: int,
) -> list[dict[str, Any]]:
    """K scored samples for each prompt of a chunk: one row per prompt."""
    prompt_tokens = [tokenizer.encode_dialog(p.messages) for p in prompts]
    out = generate(policy, prompt_tokens, config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                   n=config.k, eos_id=tokenizer.eos_id, seed=seed)
    # Samples of prompt p are p*K .. p*K + K-1. The reward models read the answer without its closing EOS.
    eos = [bool(t) and t[-1] == tokenizer.eos_id for t in out.tokens]
    bare = [t[:-1] if e else t for t, e in zip(out.tokens, eos)]
    texts = [tokenizer.decode(t) for t in bare]
    rewards = score(reward_fn, [prompts[i] for i in out.prompt_index], texts, bare, config.reward)
    rows = []
    for p, prompt in enumerate(prompts):
        samples = [
            {"response": texts[i], "tokens": bare[i], "eos": eos[i], "helpful": float(rewards.helpful[i]),
             "safety": float(rewards.safety[i]), "reward": float(rewards.combined[i])}
            for i in range(p * config.k, (p + 1) * config.k)
        ]  # fmt: skip
        rows.append({"index": first_index + p, "prompt": prompt.to_json(), "samples": samples})
    return rows


def _merge_pool(
    earlier: list[dict[str, Any]],
    scored: list[dict[str, Any]],
    best: list[dict[str, Any]],
    tokenizer: Tokenizer,
    reward_fn: RewardFunction,
    config: RejectionSamplingConfig,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The pool after this round: one entry per prompt, the better of the earlier entry and this round's best.
    Earlier entries of prompts this round did not sample are kept as they are. Ties keep the earlier entry."""
    pool = {_prompt_key(e["prompt"]): e for e in earlier}
    this_round = [(row["prompt"], b) for row, b in zip(scored, best)]
    seen = [(prompt, pool[_prompt_key(prompt)]) for prompt, _ in this_round if _prompt_key(prompt) in pool]
    if seen and config.rescore_pool:
        old_prompts = [Prompt.from_json(p) for p, _ in seen]
        old_tokens = [e.get("tokens") or tokenizer.encode(e["response"], bos=False, eos=False) for _, e in seen]
        rescored = score(reward_fn, old_prompts, [e["response"] for _, e in seen], old_tokens, config.reward).combined
        for (_, entry), reward in zip(seen, rescored.tolist()):
            entry["reward"] = reward
    replaced = kept = 0
    for prompt, b in this_round:
        key = _prompt_key(prompt)
        if key in pool:
            if b["reward"] <= pool[key]["reward"]:
                kept += 1
                continue
            replaced += 1
        pool[key] = {"prompt": prompt, "response": b["response"], "tokens": b["tokens"], "reward": b["reward"],
                     "round": config.round}
    entries = list(pool.values())
    return entries, {"pool_size": len(entries), "pool_new_prompts": len(this_round) - len(seen),
                     "pool_replaced": replaced, "pool_kept_earlier": kept}


def max_vs_median(rewards_per_prompt: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """The paper's Figure 7: for N = 1, 2, 4, ..., K (and K), the expected maximum and median reward among N
    samples, averaged over prompts. Exact over all N-subsets of a prompt's K samples: with the K rewards
    sorted, v_(1) <= ... <= v_(K), the j-th smallest of a random N-subset is v_(i) with probability
    C(i-1, j-1) C(K-i, N-j) / C(K, N). The median of an even N is the mean of its two middle values."""
    K = len(rewards_per_prompt[0])
    if K < 1 or any(len(r) != K for r in rewards_per_prompt):
        raise ValueError("every prompt needs the same number K >= 1 of samples")
    sizes = sorted({2**e for e in range(K.bit_length()) if 2**e <= K} | {K})

    def expected_order_stat(v: list[float], j: int, n: int) -> float:
        weights = (math.comb(i - 1, j - 1) * math.comb(K - i, n - j) for i in range(1, K + 1))
        return sum(value * w for value, w in zip(v, weights)) / math.comb(K, n)

    rows = []
    for n in sizes:
        maxes, medians = [], []
        for rewards in rewards_per_prompt:
            v = sorted(rewards)
            maxes.append(expected_order_stat(v, n, n))
            middle = [(n + 1) // 2] if n % 2 else [n // 2, n // 2 + 1]
            medians.append(sum(expected_order_stat(v, j, n) for j in middle) / len(middle))
        rows.append({"n": n, "max": sum(maxes) / len(maxes), "median": sum(medians) / len(medians)})
    return rows


def _read_pool(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        missing = {"prompt", "response", "reward", "round"} - set(entry)
        if missing:
            raise ValueError(f"{path}:{number}: pool entry lacks {', '.join(sorted(missing))}")
        entry["prompt"] = Prompt.from_json(entry["prompt"]).to_json()
        entries.append(entry)
    return entries


def _prompt_key(prompt: Mapping[str, Any]) -> str:
    """Prompts are the same when their turns are; the safety tag follows the latest round."""
    return json.dumps(prompt["messages"], sort_keys=True)


def _sha256(items: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(items), sort_keys=True).encode()).hexdigest()


def _seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:rejection-sampling:{chunk}".encode()).digest()[:8], "little") >> 1


def _check_or_write_config(path: Path, record: dict[str, Any]) -> None:
    """A resumed run must be the same run: same config, prompts and input pool."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != record:
            changed = sorted(k for k in record if saved.get(k) != record[k])
            raise ValueError(f"cannot resume {path.parent}: {', '.join(changed)} differ from the run there")
        return
    with _atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
