"""The demo policy: a tiny Llama 2 trained from scratch on the demo world, in two checkpoints whose
quality differs, so that comparing them means something.

- ``demo-base``: a SentencePiece tokenizer trained on the world's text, then a few minutes of
  training on the world's facts as plain statements plus chat dialogues whose answers are a mix of
  good, wrong, rude, rambling, empty and (on adversarial prompts) unsafely compliant ones. It knows
  the chat format and many facts, and it is often sloppy.
- ``demo-sft``: demo-base fine-tuned further on the reference answers only (polite, correct, safe
  refusals), with the loss on answer tokens. Its parent is demo-base.

Both are saved in Meta's format (params.json, consolidated.00.pth, tokenizer.model). At the end the
oracle of `policy.demo_world` measures how often demo-sft beats demo-base on held-out prompts, each
sampled at the temperature the default sampling arms use.

No Django here: `build_demo_policy` returns plain dicts; policy.demo_services runs it as a job (in a
worker, or in `manage.py policy_demo_build`) and registers them. The config is policy.demo_config's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from policy.checkpoints import load_checkpoint, sha256_of_checkpoint
from policy.demo_config import DemoBuildConfig
from policy.demo_world import DemoWorld, default_world, judge, win_rate
from policy.generate import generate
from policy.model import ModelArgs, Transformer
from policy.sft import SFTConfig, dialog_sample, save_checkpoint, sft_train, text_sample
from policy.tokenizer import Tokenizer, train_sentencepiece

# The sloppy mix demo-base learns from. On adversarial prompts "wrong" and "unsafe" both mean
# vague compliance, so about a third of its adversarial answers comply.
BASE_STYLES = {"reference": 0.35, "wrong": 0.15, "rude": 0.15, "rambling": 0.1, "empty": 0.05,
               "over_refusal": 0.05, "unsafe": 0.15}  # fmt: skip
SFT_STYLES = {"reference": 1.0}


# (phase, step done, total steps of the phase, metrics)
Progress = Callable[[str, int, int, Mapping[str, float]], None]


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_args(config: DemoBuildConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                     vocab_size=vocab_size, multiple_of=config.multiple_of, max_seq_len=config.max_seq_len)


def build_demo_policy(
    out_root: str | Path, config: DemoBuildConfig | None = None, progress: Progress | None = None,
    world: DemoWorld | None = None,
) -> list[dict]:
    """Train demo-base and demo-sft into out_root/<name>/ and return one dict per checkpoint:
    name, path, tokenizer_path, tokenizer_sha256, params, sha256, parent (a name or None), metrics.

    A demo-base that this same config already saved in out_root (a build stopped after it) is kept,
    and training resumes at demo-sft: each checkpoint is written whole or not at all
    (policy.sft.save_checkpoint), and demo-sft's training draws nothing from torch's random state,
    so the result is the same as an uninterrupted build's."""
    config = config or DemoBuildConfig()
    world = world or default_world()
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    def report(phase: str) -> Callable[[int, int, Mapping[str, float]], None] | None:
        return (lambda step, total, metrics: progress(phase, step, total, metrics)) if progress else None

    base_dir = out_root / config.base_name
    resumed = saved_by(base_dir, config)
    if resumed:
        tokenizer_path = base_dir / "tokenizer.model"
        tokenizer = Tokenizer(tokenizer_path)
        model = load_checkpoint(base_dir, max_seq_len=config.max_seq_len)  # float32, as it was trained
        base_metrics = json.loads((base_dir / "training.json").read_text())["metrics"]
        if progress:
            progress("demo-base", config.base_steps, config.base_steps, {})
    else:
        tokenizer_path = train_sentencepiece(world.corpus(), out_root / "tokenizer.model", config.vocab_size)
        tokenizer = Tokenizer(tokenizer_path)
        model = Transformer(model_args(config, tokenizer.n_words))
        # demo-base: facts as plain text, and sloppy chat dialogues (loss on the answers only).
        knowledge = [text_sample(tokenizer, t) for t in world.knowledge_texts()] * config.knowledge_repeats
        sloppy = world.dialogs(split="train", styles=BASE_STYLES, n=config.base_dialogs, seed=config.seed)
        base_config = SFTConfig(
            lr=config.base_lr, min_lr_ratio=0.1, max_steps=config.base_steps, batch_size=config.batch_size,
            max_seq_len=config.max_seq_len, warmup_steps=config.warmup_steps, weight_decay=0.1, seed=config.seed,
            device=config.device, group_by_length=True,
        )  # fmt: skip
        base_metrics = sft_train(model, tokenizer, knowledge + [dialog_sample(tokenizer, d) for d in sloppy],
                                 base_config, report("demo-base"))
        save_checkpoint(model, base_dir, tokenizer_path=tokenizer_path, config=base_config,
                        extra={"demo": asdict(config), "styles": BASE_STYLES, "metrics": base_metrics})
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # demo-sft: the same weights, further trained on reference answers only.
    clean = world.dialogs(split="train", styles=SFT_STYLES, n=config.sft_dialogs, seed=config.seed + 1)
    sft_config = SFTConfig(
        lr=config.sft_lr, min_lr_ratio=0.1, max_steps=config.sft_steps, batch_size=config.batch_size,
        max_seq_len=config.max_seq_len, warmup_steps=min(config.warmup_steps, config.sft_steps // 5),
        weight_decay=0.1, seed=config.seed + 1, device=config.device, group_by_length=True,
    )  # fmt: skip
    sft_metrics = sft_train(model, tokenizer, clean, sft_config, report("demo-sft"))
    sft_dir = save_checkpoint(model, out_root / config.sft_name, tokenizer_path=tokenizer_path, config=sft_config,
                              extra={"demo": asdict(config), "styles": SFT_STYLES, "metrics": sft_metrics,
                                     "parent": config.base_name})  # fmt: skip

    evaluation = {}
    if config.eval_prompts > 0:
        base_model = Transformer(model.args).to(next(model.parameters()).device)
        base_model.load_state_dict(base_state)
        evaluation = evaluate_win_rate(model.eval(), base_model.eval(), tokenizer, world, config, report("eval"))
    seconds = time.perf_counter() - started

    built = []
    for name, path, metrics, parent in [
        (config.base_name, base_dir, base_metrics, None), (config.sft_name, sft_dir, sft_metrics, config.base_name),
    ]:  # fmt: skip
        built.append({
            "name": name, "path": str(path.resolve()), "tokenizer_path": str((path / "tokenizer.model").resolve()),
            "tokenizer_sha256": sha256_of_file(path / "tokenizer.model"), "params": _params_json(path),
            "sha256": sha256_of_checkpoint(path), "parent": parent,
            "metrics": {**metrics, "build_seconds": seconds, **({"eval": evaluation} if evaluation else {}),
                        **({"resumed_at": config.sft_name} if resumed else {})},
        })  # fmt: skip
    (out_root / "tokenizer.model").unlink(missing_ok=True)  # each checkpoint holds its own copy
    return built


def saved_by(ckpt: Path, config: DemoBuildConfig) -> bool:
    """Whether ckpt is a checkpoint that a build with exactly this config saved."""
    try:
        record = json.loads((Path(ckpt) / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("demo") == asdict(config) and (Path(ckpt) / "consolidated.00.pth").is_file()


def _params_json(path: Path) -> dict:
    return json.loads((path / "params.json").read_text())


def answer_dialogs(
    model: Transformer, tokenizer: Tokenizer, dialogs: Sequence[Sequence[Mapping[str, str]]], *,
    temperature: float, max_new_tokens: int, seed: int, top_p: float = 0.9, batch_size: int = 32,
) -> list[str]:
    """Sample one answer per dialog (each ending with a user turn) and decode it."""
    answers = []
    for lo in range(0, len(dialogs), batch_size):
        prompts = [tokenizer.encode_dialog(d) for d in dialogs[lo : lo + batch_size]]
        out = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_id=tokenizer.eos_id, seed=seed + lo)
        answers += [decode_answer(tokenizer, tokens) for tokens in out.tokens]
    return answers


def decode_answer(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    """Generated ids to text, without the EOS that ended them and without control characters (but
    tab and newline), which byte-fallback pieces can produce."""
    if tokens and tokens[-1] == tokenizer.eos_id:
        tokens = tokens[:-1]
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", tokenizer.decode(list(tokens))).strip()


def evaluate_win_rate(
    sft_model: Transformer, base_model: Transformer, tokenizer: Tokenizer, world: DemoWorld,
    config: DemoBuildConfig, progress: Callable[[int, int, Mapping[str, float]], None] | None = None,
) -> dict:
    """The oracle's win rate of sft@sft_temperature over base@base_temperature on held-out prompts,
    with each arm's mean helpfulness and its correct / safe rates."""
    prompts = world.sample(config.eval_prompts, seed=config.seed, split="heldout")
    dialogs = [p.dialog() for p in prompts]
    sft_answers = answer_dialogs(sft_model, tokenizer, dialogs, temperature=config.sft_temperature,
                                 max_new_tokens=config.eval_max_new_tokens, seed=config.seed)
    if progress:
        progress(1, 2, {})
    base_answers = answer_dialogs(base_model, tokenizer, dialogs, temperature=config.base_temperature,
                                  max_new_tokens=config.eval_max_new_tokens, seed=config.seed)
    if progress:
        progress(2, 2, {})
    result = win_rate(prompts, sft_answers, base_answers, world)
    for arm, answers in (("sft", sft_answers), ("base", base_answers)):
        verdicts = [judge(p, a, world) for p, a in zip(prompts, answers)]
        adversarial = [v for p, v in zip(prompts, verdicts) if p.is_adversarial]
        result[f"{arm}_helpful"] = sum(v.helpful_score for v in verdicts) / len(verdicts)
        result[f"{arm}_correct"] = sum(v.correct for v in verdicts) / len(verdicts)
        result[f"{arm}_safe_on_adversarial"] = sum(v.safe for v in adversarial) / max(1, len(adversarial))
    result["examples"] = [
        {"prompt": p.text, "sft": a, "base": b} for p, a, b in list(zip(prompts, sft_answers, base_answers))[:6]
    ]
    return result
