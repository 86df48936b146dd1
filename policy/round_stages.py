"""Ghost Attention and safety context distillation as stages of an RLHF round (policy/round_runner.py runs
them in the round's folder; policy/rounds.py says where they sit in the stage order and why).

Each stage makes its data from the policy as it stands, fine-tunes the policy in place on it
(policy.sft.sft_train with the round's sft section) and writes, atomically, under its folder:

    gatt/                             context_distillation/
      config.json  what it ran with     config.json
      samples/chunk_NNNNN.jsonl         samples.jsonl  both answers of every adversarial prompt, their
                   sampled dialogues,                  safety scores, kept or not
                   one file per chunk
      train.jsonl  the training data    train.jsonl
      policy/      the fine-tuned policy  policy/
      result.json  written last         result.json

A rerun with the same inputs reads a finished stage back (result.json, and the weights of policy/) instead
of redoing it, skips the sampled chunks already on disk, and refuses to resume a folder whose config.json
differs. The metrics name train.jsonl and its sha256, which the round puts into its checkpoint's lineage.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from policy.checkpoints import _atomic_file, load_checkpoint
from policy.context_distillation import (ANSWER_TEMPLATE, RISK_TEMPLATES, DistilledSample, distill_candidates,
                                         policy_answer_fn, select)
from policy.gatt import Instruction, build_gatt_samples, sample_dialogues, sample_instruction
from policy.gatt_check import INSTRUCTIONS, RANDOM, follows_instruction
from policy.model import Transformer
from policy.rejection_sampling import _check_or_write_config
from policy.reward import Prompt, Scorer
from policy.round_config import RoundConfig
from policy.sft import dialog_sample, save_checkpoint, sft_train
from policy.tokenizer import Tokenizer

Progress = Callable[[int, int, Mapping[str, float]], None]  # (steps done, total steps, metrics)

# The demo world's harm categories (policy/demo_world.py) in the paper's risk categories.
DEMO_RISK_CATEGORIES = {"steal": "illicit_and_criminal", "break_in": "illicit_and_criminal",
                        "hack": "illicit_and_criminal", "weapon": "illicit_and_criminal",
                        "hurt": "hateful_and_harmful", "insult": "hateful_and_harmful"}  # fmt: skip


def gatt_stage(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[Prompt], config: RoundConfig,
               out_dir: Path, *, device: str = "auto", progress: Progress | None = None) -> dict[str, Any]:
    """Ghost Attention on the round's prompts: sample, keep the dialogues that followed (and the plain ones, the
    contrast), SFT `policy` in place."""
    g, out = config.gatt, Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    _check_or_write_config(out / "config.json", _record(config, "gatt", prompts))
    if (out / "result.json").is_file():
        return _read_back(policy, out)

    # 1. The synthetic dialogues: user turns drawn from the round's prompts, one instruction per dialogue, none
    #    for a plain_fraction of them (the contrast: without it the model learns to follow the instruction always).
    rng = random.Random(config.seed)
    pool = [users for users in ([m["content"] for m in p.messages if m["role"] == "user"] for p in prompts) if users]
    if not pool:
        raise ValueError("GAtt needs prompts with a user turn, and the round has none")
    user_turns = []
    for _ in range(g.dialogues):
        users: list[str] = []
        while len(users) < g.turns:
            users += pool[rng.randrange(len(pool))]
        user_turns.append(users[: g.turns])
    gatt_config = config.gatt_config()
    instructions = [None if rng.random() < g.plain_fraction else _instruction(g.instruction, rng, gatt_config)
                    for _ in range(g.dialogues)]
    check = None if g.instruction == RANDOM else (lambda reply: follows_instruction(g.instruction, reply))

    # 2. Sampling with the instruction on every user turn, chunk by chunk; a chunk on disk is never redone.
    n_chunks = math.ceil(g.dialogues / g.chunk_dialogues)
    sft_estimate = _sft_steps(config, g.dialogues * (g.turns if g.all_turns else 1))
    rows: list[dict[str, Any]] = []
    for c in range(n_chunks):
        path = out / "samples" / f"chunk_{c:05d}.jsonl"
        lo, hi = c * g.chunk_dialogues, min((c + 1) * g.chunk_dialogues, g.dialogues)
        if not path.exists():
            sampled = sample_dialogues(
                policy, tokenizer, user_turns[lo:hi], [i.full if i else "" for i in instructions[lo:hi]], check=check,
                attempts=g.attempts if check is not None else 1, max_new_tokens=g.max_new_tokens,
                temperature=g.temperature, top_p=g.top_p, seed=_seed(config.seed, "gatt", c))
            chunk = [{"index": k, "instruction": asdict(instructions[k]) if instructions[k] else None,
                      "users": s.users, "replies": s.replies, "followed": s.followed}
                     for k, s in enumerate(sampled, start=lo)]
            with _atomic_file(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in chunk))
        rows += [json.loads(line) for line in path.read_text().splitlines()]
        if progress is not None:
            progress(c + 1, n_chunks + sft_estimate, {"dialogues_sampled": float(len(rows))})

    # 3. Keep the dialogues whose every reply followed the instruction (all of them when nothing checks it).
    instructed = [r for r in rows if r["users"] and r["instruction"]]
    kept = [r for r in instructed if check is None or g.keep_unfollowed or all(r["followed"])]
    plain = [r for r in rows if r["users"] and not r["instruction"]]
    # 4. The training samples: the instruction once, as the first turn's system message; loss on the last reply.
    replies = iter([r["replies"] for r in kept])
    samples = build_gatt_samples(
        [_dialog(r) for r in kept], lambda _turns: next(replies),  # the replies sampled above, dialogue by dialogue
        tokenizer, gatt_config, instructions=[_instruction_of(r["instruction"]) for r in kept])
    ends = (lambda n: range(1, n + 1)) if g.all_turns else (lambda n: [n])
    plain_dialogs = [_dialog(r)[: 2 * n] for r in plain for n in ends(len(r["users"]))]
    train_path, train_sha256 = _write_jsonl(out / "train.jsonl", [
        *({"dialog": s.dialog, "instruction": s.instruction.full, "shortened": s.shortened} for s in samples),
        *({"dialog": d, "instruction": None, "shortened": False} for d in plain_dialogs)])
    data = [*(s.sample for s in samples), *(dialog_sample(tokenizer, d, last_turn_only=True) for d in plain_dialogs)]
    turns = [len(r["users"]) for r in rows]
    metrics: dict[str, Any] = {
        "instruction": g.instruction,
        "dialogues": len(rows),
        "turns_asked": g.turns,
        "turns_mean": sum(turns) / len(turns),
        "context_ended_early": sum(t < g.turns for t in turns),
        "plain": len(plain),
        "kept": len(kept),
        "dropped": len(instructed) - len(kept),
        "samples": len(samples) + len(plain_dialogs),
        "plain_samples": len(plain_dialogs),
        "shortened": sum(s.shortened for s in samples),
        "train_path": str(train_path),
        "train_sha256": train_sha256,
    }
    if check is not None:
        # How often the sampled replies followed the instruction in front of them, by turn (1-based).
        by_turn = [[r["followed"][t] for r in instructed if t < len(r["followed"])]
                   for t in range(max(turns, default=0))]
        metrics["followed_by_turn"] = [sum(f) / len(f) for f in by_turn if f]
    return _fine_tune(policy, tokenizer, data, config, out, metrics, "gatt", device, progress, offset=n_chunks)


def context_distillation_stage(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                               safety_scorer: Scorer, config: RoundConfig, out_dir: Path, *, device: str = "auto",
                               progress: Progress | None = None) -> dict[str, Any]:
    """Safety context distillation on the round's safety-tagged prompts: answer with and without the preprompt,
    keep the preprompted answer where the safety RM prefers it, SFT `policy` in place without the preprompt."""
    c, out = config.context_distillation, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_config(out / "config.json", _record(config, "context_distillation", prompts))
    if (out / "result.json").is_file():
        return _read_back(policy, out)

    cd_config = config.context_distillation_config()
    samples_path = out / "samples.jsonl"
    if samples_path.is_file():
        candidates = [_candidate_of(json.loads(line)) for line in samples_path.read_text().splitlines()]
    else:
        # The preprompt, with the answer template of the prompt's risk category where one is known.
        systems = [cd_config.system_message_with(RISK_TEMPLATES.get(risk_category(p) or "", ANSWER_TEMPLATE))
                   if c.answer_templates and p.is_safety else None for p in prompts]
        answer_fn = policy_answer_fn(policy, tokenizer, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                     top_p=c.top_p, seed=_seed(config.seed, "context_distillation", 0))
        candidates = distill_candidates(prompts, answer_fn, safety_scorer, tokenizer, cd_config, systems)
        with _atomic_file(samples_path) as tmp:
            tmp.write_text("".join(json.dumps(_candidate_row(s, s.score_with > s.score_without + c.margin)) + "\n"
                                   for s in candidates))
    kept, chosen = select(candidates, cd_config, skipped_untagged=len(prompts) - len(candidates))
    if progress is not None:
        progress(1, 1 + _sft_steps(config, len(kept)), {"prompts_answered": float(len(candidates))})
    train_path, train_sha256 = _write_jsonl(out / "train.jsonl", [{"dialog": s.dialog} for s in kept])
    metrics = {**chosen, "dropped": len(candidates) - len(kept), "samples_path": str(samples_path),
               "train_path": str(train_path), "train_sha256": train_sha256}
    return _fine_tune(policy, tokenizer, [s.dialog for s in kept], config, out, metrics, "context_distillation",
                      device, progress, offset=1)


def risk_category(prompt: Prompt) -> str | None:
    """The paper's risk category of a prompt where the demo world's parser names its harm, else None."""
    from policy.demo_world import default_world

    turns = [m for m in prompt.messages if m["role"] != "system"]
    intent = default_world().parse(turns[-1]["content"], turns[:-1], is_adversarial=prompt.is_safety)
    return DEMO_RISK_CATEGORIES.get(intent.category)


# --- plumbing both stages share ---------------------------------------------------------------------------

def _fine_tune(policy: Transformer, tokenizer: Tokenizer, data: Sequence[Any], config: RoundConfig, out: Path,
               metrics: dict[str, Any], algorithm: str, device: str, progress: Progress | None,
               offset: int) -> dict[str, Any]:
    """SFT on the stage's data (none: the policy stays as it was), then policy/ and result.json."""
    metrics["fine_tuned"] = bool(data)
    if data:
        def sft_progress(step: int, total: int, m: Mapping[str, float]) -> None:
            if progress is not None:
                progress(offset + step, offset + total, m)

        sft_config = config.sft_config(device)
        metrics.update({f"sft_{k}": v for k, v in sft_train(policy, tokenizer, data, sft_config, sft_progress).items()})
        tokenizer_path = out / "tokenizer.model"
        with _atomic_file(tokenizer_path) as tmp:
            tmp.write_bytes(tokenizer.sp.serialized_model_proto())
        save_checkpoint(policy, out / "policy", tokenizer_path=tokenizer_path, config=sft_config,
                        extra={"algorithm": algorithm, "metrics": metrics})
    with _atomic_file(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"metrics": metrics}, indent=2))
    return metrics


def _read_back(policy: Transformer, out: Path) -> dict[str, Any]:
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    if metrics["fine_tuned"]:
        finished = load_checkpoint(out / "policy", dtype=policy.output.weight.dtype)
        policy.load_state_dict(finished.state_dict())
    return metrics


def _record(config: RoundConfig, stage: str, prompts: Sequence[Prompt]) -> dict[str, Any]:
    """What a resumed stage must find unchanged: its section, the SFT recipe, the seed and the prompts."""
    return {stage: asdict(getattr(config, stage)), "sft": asdict(config.sft), "seed": config.seed,
            "prompts_sha256": hashlib.sha256(json.dumps([p.to_json() for p in prompts], sort_keys=True).encode())
            .hexdigest()}


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, str]:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _sft_steps(config: RoundConfig, n_samples: int) -> int:
    s = config.sft
    if not n_samples:
        return 0
    return s.max_steps or math.ceil(n_samples / s.batch_size) * s.epochs


def _seed(seed: int, stage: str, chunk: int) -> int:
    # 31 bits: the sampling helpers multiply it by about 2^20 before seeding torch's 64-bit generator.
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}:{chunk}".encode()).digest()[:4], "little") >> 1


def _instruction(name: str, rng: random.Random, gatt_config: Any) -> Instruction:
    if name == RANDOM:
        return sample_instruction(rng, gatt_config)
    full, short = INSTRUCTIONS[name]
    return Instruction(full, short, (("style", name),))


def _dialog(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """A sampled dialogue's turns, without its instruction."""
    return [m for u, a in zip(row["users"], row["replies"]) for m in ({"role": "user", "content": u},
                                                                      {"role": "assistant", "content": a})]


def _instruction_of(row: Mapping[str, Any]) -> Instruction:
    return Instruction(row["full"], row["short"], tuple(tuple(c) for c in row["constraints"]))


def _candidate_row(s: DistilledSample, kept: bool) -> dict[str, Any]:
    return {"prompt": s.prompt.to_json(), "system_message": s.system_message, "answer": s.answer,
            "answer_without": s.answer_without, "score_with": s.score_with, "score_without": s.score_without,
            "kept": kept}


def _candidate_of(row: Mapping[str, Any]) -> DistilledSample:
    return DistilledSample(Prompt.from_json(row["prompt"]), row["answer"], row["score_with"], row["score_without"],
                           row["answer_without"], row["system_message"])
