"""Reward-model training on a CUDA GPU (bf16 autocast): does it learn, is packing exact, how fast is it.

Needs only torch, sentencepiece, safetensors and tqdm (no Django, no TRL), so it runs on a bare GPU
machine from the repository root. Data: generated pairs with multi-turn context (tests/rewards/synthetic).

1. A tiny RM learns the synthetic preference on CUDA (held-out accuracy).
2. A mid-size RM (dim 1024, 8 layers, 16 heads, 8 KV heads): rewards of packed pairs against the two full
   sequences, in float32 and under bf16 autocast (max abs difference and the rewards' spread).
3. Forward + backward pairs/s of that model, packed pairs against two full sequences, bf16.
4. rewards.train's whole loop on it (micro-batch 16 x accumulation 4), pairs/s after 3 steps, peak memory.

    PYTHONPATH=. python3 bench/bench_reward_gpu.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from policy.checkpoints import save_meta  # noqa: E402
from policy.model import ModelArgs, Transformer  # noqa: E402
from policy.tokenizer import Tokenizer  # noqa: E402
from rewards.config import RewardTrainConfig  # noqa: E402
from rewards.data import build_mix, collate, collate_packed, encode_pairs, plan_epochs, sort_key  # noqa: E402
from rewards.model import RewardModel  # noqa: E402
from rewards.train import train_reward_model  # noqa: E402
from tests.rewards import synthetic  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    out: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    tmp = Path(tempfile.mkdtemp())
    tokenizer_path = synthetic.train_tokenizer(tmp / "tok.model")
    tok = Tokenizer(tokenizer_path)

    tiny = synthetic.save_tiny_policy(tmp / "tiny", tokenizer_path, tok.n_words)
    rows = synthetic.make_rows(1200, seed=11, test_fraction=0.2, adversarial_fraction=0.0, imported_fraction=0.0)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    config = RewardTrainConfig(base_checkpoint=str(tiny), max_seq_len=128, micro_batch_size=16, lr=3e-3,
                               checkpoint_every=0, margin="none", device="cuda")
    result = train_reward_model(config, mix.train, mix.test_sets, tmp / "tiny-run", manifest=mix.manifest)
    out["tiny_learns"] = {"held_out_accuracy": result.eval["all"]["accuracy"], "steps": result.steps}

    args = ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=tok.n_words, multiple_of=256,
                     max_seq_len=1024)
    torch.manual_seed(0)
    model = RewardModel(args).cuda()
    big_rows = synthetic.make_rows(2048, seed=3, context_turns=6, max_words=80)
    pairs = encode_pairs(tok, big_rows, args.max_seq_len)
    plan = plan_epochs([sort_key(p) for p in pairs], seed=0, micro_batch_size=16, micro_batches_per_step=8)
    micros = [[pairs[i] for i in micro] for step in plan for micro in step]
    out["tokens_per_pair"] = {"packed": sum(sort_key(p) for p in pairs) / len(pairs),
                              "two_full_sequences": sum(len(p.chosen) + len(p.rejected) for p in pairs) / len(pairs)}

    agreement = {}
    for name, enabled in (("float32", False), ("bf16_autocast", True)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            tokens, lengths = collate_packed(micros[0], tok.pad_id)
            full_tokens, full_lengths = collate(micros[0], tok.pad_id)
            packed, full = model(tokens.cuda(), lengths), model(full_tokens.cuda(), full_lengths)
        agreement[name] = {"max_abs_diff": (packed - full).abs().max().item(), "reward_std": full.std().item()}
    out["packed_vs_full_rewards"] = agreement

    def pairs_per_s(packed: bool, batches) -> float:
        torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                tokens, lengths = collate_packed(batch, tok.pad_id) if packed else collate(batch, tok.pad_id)
                rewards = model(tokens.cuda(non_blocking=True), lengths)
            rewards.float().sum().backward()
            n += len(batch)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    pairs_per_s(True, micros[:8]), pairs_per_s(False, micros[:8])  # warm-up
    out["fwd_bwd_pairs_per_s_bf16"] = {"packed": pairs_per_s(True, micros[8:56]),
                                       "two_full_sequences": pairs_per_s(False, micros[8:56])}

    policy = Transformer(args)
    save_meta(policy, tmp / "mid")
    (tmp / "mid" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    config = RewardTrainConfig(base_checkpoint=str(tmp / "mid"), max_seq_len=1024, micro_batch_size=16,
                               grad_accum_steps=4, lr=1e-5, checkpoint_every=0, device="cuda",
                               mix={"min_train_pairs": 4})
    ends: list[float] = []
    torch.cuda.reset_peak_memory_stats()
    result = train_reward_model(config, big_rows[: 64 * 24], {}, tmp / "mid-run",
                                progress=lambda step, total, metrics: ends.append(time.perf_counter()))
    out["train_loop"] = {"steps": result.steps, "pairs_per_s_after_3_steps": (len(ends) - 3) * 64 / (ends[-1] - ends[2]),
                         "pad_fraction": result.train["pad_fraction"], "final_loss": result.final_loss,
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
