"""Command-line entry points for the reward models (no Django).

    python -m rewards.train --config rm.json --data snapshot.jsonl.gz [--data more.jsonl.gz] --out runs/rm-help
    torchrun --nproc_per_node=2 -m rewards.train --config rm.json --data snapshot.jsonl.gz --out runs/rm-help
    python -m rewards.evaluate --model runs/rm-help/model --data snapshot.jsonl.gz [--split test]

train: reads the snapshot rows, builds the config's kind of mix (rewards.data.build_mix), trains with a
tqdm progress bar (main process only), and prints the result as JSON on stdout. Options given on the
command line override the config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rewards.config import RewardTrainConfig
from rewards.data import build_mix, file_sha256, group_test_sets, read_rows

# Command-line overrides of config fields: flag -> (field, type).
_OVERRIDES = {
    "--kind": ("kind", str),
    "--base-checkpoint": ("base_checkpoint", str),
    "--tokenizer": ("tokenizer_path", str),
    "--seed": ("seed", int),
    "--lr": ("lr", float),
    "--micro-batch-size": ("micro_batch_size", int),
    "--grad-accum-steps": ("grad_accum_steps", int),
    "--max-seq-len": ("max_seq_len", int),
    "--margin": ("margin", str),
    "--checkpoint-every": ("checkpoint_every", int),
    "--device": ("device", str),
}


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.train", description="Train a Llama 2 style reward model.")
    parser.add_argument("--config", type=Path, help="JSON file of RewardTrainConfig fields")
    parser.add_argument("--data", type=Path, action="append", required=True, help="snapshot .jsonl(.gz); repeatable")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, model, result.json)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out holds checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, (name, kind) in _OVERRIDES.items():
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"override config.{name}")
    args = parser.parse_args(argv)

    base = json.loads(args.config.read_text()) if args.config else {}
    overrides = {name: getattr(args, name) for name, _ in _OVERRIDES.values() if getattr(args, name) is not None}
    try:
        config = RewardTrainConfig.from_dict({**base, **overrides})
    except (TypeError, ValueError) as error:
        parser.error(f"bad config: {error}")

    from rewards.data import DataError

    try:
        rows = [row for path in args.data for row in read_rows(path)]
        mix = build_mix(rows, kind=config.kind, seed=config.seed, mix=config.mix,
                        input_hashes=[file_sha256(p) for p in args.data])
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from rewards.train import TrainingDiverged, train_reward_model

    bar = None
    progress = None
    if not args.no_progress and os.environ.get("RANK", "0") == "0":
        from tqdm import tqdm

        def progress(step: int, total: int, metrics: dict) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, initial=step - 1, unit="step", desc=f"{config.kind} RM", file=sys.stderr)
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                            lr=f"{metrics['lr']:.2e}", pairs_s=f"{metrics['pairs_per_s']:.1f}")

    try:
        result = train_reward_model(config, mix.train, mix.test_sets, args.out, progress=progress,
                                    resume=not args.no_resume, manifest=mix.manifest)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        if bar is not None:
            bar.close()
    if os.environ.get("RANK", "0") == "0":
        summary = {k: v for k, v in result.to_dict().items() if k != "train"}
        summary["train"] = {k: v for k, v in result.train.items() if k != "curve"}
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.evaluate", description="Evaluate a reward model.")
    parser.add_argument("--model", type=Path, required=True, help="reward model folder (with tokenizer.model)")
    parser.add_argument("--data", type=Path, action="append", required=True, help="snapshot .jsonl(.gz); repeatable")
    parser.add_argument("--split", choices=["test", "train", "all"], default="test", help="which rows to score")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model if the model folder has none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from policy.tokenizer import Tokenizer
    from rewards.data import UNSAFE_CHOSEN, DataError
    from rewards.evaluate import evaluate_sets
    from rewards.model import TOKENIZER, RewardModelError, load_reward_model

    try:
        rows = [row for path in args.data for row in read_rows(path)]
        model = load_reward_model(args.model, device=args.device)
        tokenizer = Tokenizer(args.tokenizer or args.model / TOKENIZER)
    except (DataError, RewardModelError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = [r for r in rows if r["safety_bin"] != UNSAFE_CHOSEN and (args.split == "all" or r["split"] == args.split)]
    if not rows:
        print(f"error: no {args.split} rows to evaluate", file=sys.stderr)
        return 2
    metrics = evaluate_sets(model, tokenizer, group_test_sets(rows), batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python -m rewards {train,evaluate} ..."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "evaluate": evaluate_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m rewards {train,evaluate} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
