"""Reward-model training throughput: rewards.train against TRL's RewardTrainer, same model, same pairs, CPU.

Model: a tiny Llama (default dim 128, 2 layers, 4 heads, 2 KV heads, vocab of the tokenizer), random
weights, float32, no head bias; TRL trains transformers' LlamaForSequenceClassification built from the
very same weights (policy.checkpoints.save_hf) and our head's weight as its ``score``.
Pairs: the real Anthropic HH harmless-base test pairs of ../shared/data, tokenized once with the Llama 2
tokenizer exactly as rewards.data does (dialog + response as the last assistant turn, EOS, left-truncated
to --max-seq-len); both trainers get the same token ids (TRL pre-tokenized: chosen_ids / rejected_ids).
Without the shared data: generated pairs and a small tokenizer trained here.

Rows of the table:
- ours: rewards.train.train_reward_model, as the platform runs it: length-bucketed micro-batches, each
  pair packed into one row with its shared dialogue prefix run once, the last layer computed only at
  the two read tokens (both exact: see rewards/model.py).
- ours, pack_pairs=False: the same, with chosen and rejected as two rows (what packing adds).
- TRL, same batches: RewardTrainer fed our exact micro-batches in our order (sequential sampler), with the
  same AdamW, LR schedule (passed in as `optimizers`), clipping and accumulation, so the loss curves must
  agree up to float rounding: the check that both train the same thing.
- TRL, shuffled: RewardTrainer's own random sampler over the same pairs (how it runs out of the box,
  padding each micro-batch to its longest sequence).
TRL runs in float32 without gradient checkpointing (TRL 1.x defaults to bf16 autocast and gradient
checkpointing; both only slow a tiny CPU model down, and we use neither on CPU).

pairs/s is measured over the steps after the first --skip ones (steady state: no start-up, model
loading, tokenization or saving), best of --repeats runs, all on --threads threads.

    .venv/bin/python bench/bench_reward.py              # the reported run
    .venv/bin/python bench/bench_reward.py --smoke      # a few steps of a smaller model, for a quick check
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from policy.checkpoints import save_hf, save_meta  # noqa: E402
from policy.model import ModelArgs, Transformer  # noqa: E402
from policy.tokenizer import Tokenizer  # noqa: E402
from rewards.config import RewardTrainConfig  # noqa: E402
from rewards.data import encode_pairs, plan_epochs, plan_sha256, sort_key  # noqa: E402
from rewards.train import build_model, lr_multiplier, train_reward_model, warmup_steps_for  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
LLAMA_TOKENIZER = SHARED / "llama2-tokenizer" / "tokenizer.model"
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_rows(path: Path) -> list[dict]:
    """HH-RLHF transcripts as export rows: the shared dialogue as prompt messages, each last answer a response."""
    rows = []
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f):
            pair = json.loads(line)
            turns = []
            for side in ("chosen", "rejected"):
                parts = _TURN.split(pair[side])
                turns.append([("user" if who == "Human" else "assistant", text) for who, text in zip(parts[1::2], parts[2::2])])
            chosen, rejected = turns
            if (len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1][0] != "assistant"
                    or rejected[-1][0] != "assistant"
                    or any(role != ("user" if k % 2 == 0 else "assistant") for k, (role, _) in enumerate(chosen))):
                continue  # irregular transcript: skip it, as an importer would
            rows.append({
                "id": i, "prompt": [{"role": r, "content": t} for r, t in chosen[:-1]],
                "chosen": [{"role": "assistant", "content": chosen[-1][1]}],
                "rejected": [{"role": "assistant", "content": rejected[-1][1]}],
                "strength": None, "margin": 0.0,
            })
    return rows


def synthetic_setup(tmp: Path) -> tuple[list[dict], Path]:
    from tests.rewards import synthetic

    return synthetic.make_rows(3000, seed=0, context_turns=2, max_words=60), synthetic.train_tokenizer(tmp / "tok.model")


def steady_pairs_per_s(step_ends: list[float], skip: int, step_pairs: int) -> float:
    """Pairs/s from the end of step `skip` to the end of the last step (step_ends[k - 1]: end of step k)."""
    if skip < 1 or len(step_ends) <= skip:
        raise ValueError("need skip >= 1 and more steps than skip")
    return (len(step_ends) - skip) * step_pairs / (step_ends[-1] - step_ends[skip - 1])


def run_ours(config: RewardTrainConfig, rows: list[dict], out: Path, skip: int, step_pairs: int) -> dict:
    step_ends: list[float] = []
    losses: list[float] = []

    def progress(step: int, total: int, metrics: dict) -> None:
        step_ends.append(time.perf_counter())
        losses.append(metrics["loss"])

    result = train_reward_model(config, rows, {}, out, progress=progress, resume=False)
    return {"pairs_per_s": steady_pairs_per_s(step_ends, skip, step_pairs), "losses": losses,
            "pad_fraction": result.train["pad_fraction"], "plan_sha256": result.plan_sha256}


def run_trl(hf_dir: Path, head: torch.Tensor, config: RewardTrainConfig, ordered_pairs: list, pad_id: int, *,
            shuffled: bool, skip: int, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(head)
    # TRL needs a processing class only for its pad / eos tokens here (the data comes tokenized): a word-level
    # stand-in with our ids. Padding uses id pad_id, which never occurs in the data, so that HF's "last
    # non-pad token" is the closing EOS, the token our model reads too.
    vocab = {f"<{i}>": i for i in range(model.config.vocab_size)}
    processing = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(WordLevel(vocab, unk_token="<0>")),
                                         pad_token=f"<{pad_id}>", eos_token="<2>")
    dataset = Dataset.from_dict({"chosen_ids": [p.chosen for p in ordered_pairs],
                                 "rejected_ids": [p.rejected for p in ordered_pairs]})
    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.grad_accum_steps, max_steps=steps, learning_rate=config.lr,
        max_grad_norm=config.grad_clip, bf16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_length=None,
        seed=config.seed, train_sampling_strategy="random" if shuffled else "sequential",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    warmup = warmup_steps_for(config, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, steps, warmup, config.min_lr_ratio))
    step_ends: list[float] = []
    padding = {"real": 0, "slots": 0}

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            step_ends.append(time.perf_counter())

    collator = DataCollatorForPreference(pad_token_id=pad_id)

    def counting_collator(examples):
        batch = collator(examples)
        padding["real"] += int(batch["attention_mask"].sum())
        padding["slots"] += batch["attention_mask"].numel()
        return batch

    trainer = RewardTrainer(model=model, args=args, data_collator=counting_collator, train_dataset=dataset,
                            processing_class=processing, optimizers=(optimizer, scheduler), callbacks=[Clock()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    step_pairs = config.micro_batch_size * config.grad_accum_steps
    return {"pairs_per_s": steady_pairs_per_s(step_ends, skip, step_pairs), "losses": losses,
            "pad_fraction": 1 - padding["real"] / padding["slots"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=3, help="steps not timed at the start (warm-up)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--grad-accum-steps", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="6 steps, dim 64: checks the script runs")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    opts = parser.parse_args()
    if opts.smoke:
        opts.steps, opts.skip, opts.dim, opts.repeats, opts.max_seq_len = 6, 1, 64, 1, 128
    torch.set_num_threads(opts.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if HH.exists() and LLAMA_TOKENIZER.exists():
            rows, tokenizer_path, data_name = hh_rows(HH), LLAMA_TOKENIZER, "HH-RLHF harmless-base test (real)"
        else:
            (rows, tokenizer_path), data_name = synthetic_setup(tmp), "generated pairs (no ../shared/data)"
        tokenizer = Tokenizer(tokenizer_path)
        args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                         multiple_of=32, max_seq_len=opts.max_seq_len)
        torch.manual_seed(0)
        policy = Transformer(args)
        save_meta(policy, tmp / "policy")
        save_hf(policy, tmp / "hf")
        step_pairs = opts.micro_batch_size * opts.grad_accum_steps
        rows = rows[: opts.steps * step_pairs]
        if len(rows) < opts.steps * step_pairs:
            raise SystemExit(f"only {len(rows)} pairs for {opts.steps} steps of {step_pairs}")
        config = RewardTrainConfig(
            base_checkpoint=str(tmp / "policy"), tokenizer_path=str(tokenizer_path), head_bias=False,
            max_seq_len=opts.max_seq_len, micro_batch_size=opts.micro_batch_size, grad_accum_steps=opts.grad_accum_steps,
            lr=1e-4, margin="none", checkpoint_every=0, seed=0, device="cpu",
        )
        head = build_model(config).head.weight.detach().clone()  # the head our run starts from, for TRL too

        # Our data order, flattened: TRL's sequential sampler then cuts exactly our micro-batches.
        pairs = encode_pairs(tokenizer, rows, opts.max_seq_len)
        plan = plan_epochs([sort_key(p) for p in pairs], seed=config.seed, micro_batch_size=opts.micro_batch_size,
                           micro_batches_per_step=opts.grad_accum_steps)
        ordered = [pairs[i] for step in plan for micro in step for i in micro]
        pad_id = 0  # <unk>: never produced by the Llama 2 tokenizer (byte fallback), nor by the small one here

        unpacked = RewardTrainConfig(**{**config.to_dict(), "pack_pairs": False})
        results: dict[str, list[dict]] = {"ours": [], "ours_unpacked": [], "trl_same_batches": [], "trl_shuffled": []}
        for r in range(opts.repeats):  # interleaved, so a busy spell on this shared machine hits all alike
            results["ours"].append(run_ours(config, rows, tmp / f"ours{r}", opts.skip, step_pairs))
            results["ours_unpacked"].append(run_ours(unpacked, rows, tmp / f"oursu{r}", opts.skip, step_pairs))
            results["trl_same_batches"].append(run_trl(tmp / "hf", head, config, ordered, pad_id, shuffled=False,
                                                       skip=opts.skip, steps=opts.steps, out=tmp / f"trl{r}"))
            results["trl_shuffled"].append(run_trl(tmp / "hf", head, config, ordered, pad_id, shuffled=True,
                                                   skip=opts.skip, steps=opts.steps, out=tmp / f"trls{r}"))
        assert results["ours"][0]["plan_sha256"] == plan_sha256(plan, [p.id for p in pairs])

    best = {name: max(runs, key=lambda x: x["pairs_per_s"]) for name, runs in results.items()}
    ours_losses = best["ours"]["losses"]
    same_losses = best["trl_same_batches"]["losses"]
    max_diff = max(abs(a - b) for a, b in zip(ours_losses, same_losses))
    import transformers
    import trl

    print(f"data: {data_name}, {len(rows)} pairs; model dim {opts.dim}, {opts.layers} layers, vocab {args.vocab_size}; "
          f"{opts.steps} steps of {opts.micro_batch_size} x {opts.grad_accum_steps} pairs; max_seq_len {opts.max_seq_len}; "
          f"{opts.threads} threads; best of {opts.repeats}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"python {platform.python_version()}, {datetime.date.today()}")
    print()
    print("| trainer | pairs/s | vs TRL (same batches) | vs TRL (shuffled) | pad fraction | loss at step "
          f"{opts.steps} | mean loss, last 5 steps |")
    print("|---|---|---|---|---|---|---|")
    labels = {"ours": "rewards.train (ours)", "ours_unpacked": "rewards.train, pack_pairs=False",
              "trl_same_batches": "TRL RewardTrainer, our batches",
              "trl_shuffled": "TRL RewardTrainer, its random sampler"}
    for name, res in best.items():
        losses = res["losses"]
        print(f"| {labels[name]} | {res['pairs_per_s']:.1f} | "
              f"{res['pairs_per_s'] / best['trl_same_batches']['pairs_per_s']:.2f}x | "
              f"{res['pairs_per_s'] / best['trl_shuffled']['pairs_per_s']:.2f}x | {res['pad_fraction']:.3f} | "
              f"{losses[-1]:.5f} | {sum(losses[-5:]) / len(losses[-5:]):.5f} |")
    print()
    print(f"largest per-step loss difference, ours vs TRL on the same batches: {max_diff:.2e} "
          f"(over {min(len(ours_losses), len(same_losses))} steps)")
    if opts.json:
        opts.json.write_text(json.dumps({"best": best, "all": results, "max_loss_diff": max_diff}, indent=2))


if __name__ == "__main__":
    main()
