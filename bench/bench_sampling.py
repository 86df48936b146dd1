"""Sampling throughput: policy.generate against transformers' LlamaForCausalLM.generate, same weights.

Model: dim 512, 8 layers, 8 heads, 4 KV heads, FFN hidden 1376, vocab 32000, random weights, float32.
Requests: random 64-token prompts, 128 new tokens, plain sampling (temperature 1, no top-k / top-p),
no early stop at EOS, so both produce exactly batch * 128 tokens.

Columns:
- end-to-end tok/s: generated tokens / wall time of the whole call (prefill included);
- decode tok/s: batch * (new - 1) / (time(new tokens) - time(1 token)), the steady-state rate;
- ceiling tok/s: batch / (time of only the weight matmuls of one decode step at that batch), an upper
  bound for decode tok/s: the same F.linear calls on the same weights, nothing else;
- % of ceiling: our decode tok/s / ceiling.
Every time is the best of --repeats runs (this machine is shared; the minimum is the least disturbed).

    .venv/bin/python -m bench.bench_sampling            # quick: batch 16, 32 new tokens, one repeat
    .venv/bin/python -m bench.bench_sampling --full     # the reported run: batch 16 and 64, 128 new tokens
    .venv/bin/python -m bench.bench_sampling --breakdown  # where a batch-64 decode step goes (torch profiler)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policy.checkpoints import save_hf
from policy.generate import decode_one_token, generate, sample_with_logprobs
from policy.model import KVCache, ModelArgs, Transformer

BENCH_ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000, multiple_of=32)
SMOKE_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16)


@dataclass
class Row:
    batch: int
    ours_e2e: float
    ours_decode: float
    hf_e2e: float | None
    hf_decode: float | None
    ceiling: float


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_ceiling(model: Transformer, batch: int, repeats: int) -> float:
    """Tokens/s if a decode step cost only its weight matmuls: every nn.Linear once on a (batch, in) input."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}

    def one_step() -> None:
        for m in linears:
            F.linear(inputs[m.in_features], m.weight)

    with torch.inference_mode():
        one_step()  # warm-up
        step = best_time(lambda: [one_step() for _ in range(10)], repeats) / 10
    return batch / step


def tokens_per_second(run: Callable[[int], object], batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(end-to-end, decode-only) tokens/s of run(max_new_tokens)."""
    run(2)  # warm-up: allocator, kernels' first-call setup
    full = best_time(lambda: run(new_tokens), repeats)
    first = best_time(lambda: run(1), repeats)
    return batch * new_tokens / full, batch * (new_tokens - 1) / (full - first)


def bench(args: ModelArgs, batches: list[int], prompt_len: int, new_tokens: int, repeats: int) -> list[Row]:
    torch.manual_seed(0)
    model = Transformer(args).eval()
    hf = load_transformers_twin(model)
    rows = []
    for batch in batches:
        prompts = torch.randint(3, args.vocab_size, (batch, prompt_len))

        def ours(n: int) -> object:
            return generate(model, prompts.tolist(), n, temperature=1.0, eos_id=None, seed=0)

        ours_e2e, ours_decode = tokens_per_second(ours, batch, new_tokens, repeats)
        hf_e2e = hf_decode = None
        if hf is not None:

            def theirs(n: int) -> object:
                with torch.inference_mode():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                       max_new_tokens=n, min_new_tokens=n, temperature=1.0, top_k=0, top_p=1.0)

            hf_e2e, hf_decode = tokens_per_second(theirs, batch, new_tokens, repeats)
        rows.append(Row(batch, ours_e2e, ours_decode, hf_e2e, hf_decode, matmul_ceiling(model, batch, repeats)))
    return rows


def load_transformers_twin(model: Transformer) -> torch.nn.Module | None:
    """The same weights in transformers' LlamaForCausalLM, through our HF export; None without transformers."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides make exactly the same work
    hf.generation_config.pad_token_id = 0
    return hf


def step_breakdown(args: ModelArgs, batch: int, repeats: int) -> dict[str, float]:
    """ms per decode step (model + sampling) and its parts, from the torch profiler: weight matmuls (aten::mm),
    attention matmuls (aten::bmm), sampling with log-probs, the rest. Steps at cache slots 64, 128 and 190:
    the start, middle and end of 128 new tokens after a 64-token prompt. Every part comes from the same
    profiled steps, so a busy machine inflates them together instead of skewing one against another."""
    from torch.profiler import profile, record_function

    torch.manual_seed(0)
    model = Transformer(args).eval()
    slots = (64, 128, 190)
    best: dict[str, float] | None = None
    with torch.inference_mode():
        cache = KVCache(args, batch, max(slots) + 1, torch.device("cpu"), torch.float32)
        cache.k.normal_(), cache.v.normal_()
        valid = torch.ones(batch, max(slots) + 1, dtype=torch.bool)
        positions = torch.arange(max(slots) + 1).expand(batch, -1)
        token = torch.randint(3, args.vocab_size, (batch,))
        generator = torch.Generator().manual_seed(0)

        def steps() -> None:
            for slot in slots:
                with record_function("model"):
                    logits = decode_one_token(model, token, valid, positions, cache, slot)
                with record_function("sampling"):
                    sample_with_logprobs(logits, 1.0, 0, 1.0, generator)

        steps()  # warm-up
        for _ in range(repeats):
            with profile() as prof:
                steps()
            events = {e.key: e for e in prof.key_averages()}
            ms = {name: events[name].cpu_time_total / len(slots) / 1e3 for name in ("model", "sampling")}
            mm, bmm = (events[op].self_cpu_time_total / len(slots) / 1e3 for op in ("aten::mm", "aten::bmm"))
            parts = {"step": ms["model"] + ms["sampling"], "weight matmuls": mm, "attention matmuls": bmm,
                     "sampling": ms["sampling"], "other": ms["model"] - mm - bmm}
            if best is None or parts["step"] < best["step"]:
                best = parts
    return best


def print_table(rows: list[Row], prompt_len: int, new_tokens: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"prompt {prompt_len} tokens, {new_tokens} new tokens, float32")
    print("| batch | ours tok/s | transformers tok/s | ratio | ours decode tok/s | transformers decode tok/s "
          "| matmul ceiling tok/s | ours % of ceiling |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = (f"{r.hf_e2e:.0f} | {r.ours_e2e / r.hf_e2e:.2f}x" if r.hf_e2e else "n/a | n/a")
        hf_decode = f"{r.hf_decode:.0f}" if r.hf_decode else "n/a"
        print(f"| {r.batch} | {r.ours_e2e:.0f} | {hf} | {r.ours_decode:.0f} | {hf_decode} | {r.ceiling:.0f} "
              f"| {100 * r.ours_decode / r.ceiling:.0f}% |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the reported run: batch 16 and 64, 128 new tokens")
    size.add_argument("--smoke", action="store_true", help="a tiny model, to check the script runs")
    size.add_argument("--breakdown", action="store_true", help="profile a batch-64 decode step instead")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (best is kept)")
    opts = parser.parse_args(argv)
    if opts.smoke:
        args, batches, prompt_len, new_tokens, repeats = SMOKE_ARGS, [2], 8, 4, 1
    elif opts.full:
        args, batches, prompt_len, new_tokens, repeats = BENCH_ARGS, [16, 64], 64, 128, 3
    else:
        args, batches, prompt_len, new_tokens, repeats = BENCH_ARGS, [16], 64, 32, 1
    repeats = opts.repeats or repeats
    load_before = os.getloadavg()[0]
    if opts.breakdown:
        parts = step_breakdown(BENCH_ARGS, 64, opts.repeats or 4)
        print(f"batch 64, {torch.get_num_threads()} threads, ms per decode step (best of {opts.repeats or 4}): "
              + ", ".join(f"{k} {v:.1f}" + ("" if k == "step" else f" ({100 * v / parts['step']:.0f}%)")
                          for k, v in parts.items()))
        print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
        return
    rows = bench(args, batches, prompt_len, new_tokens, repeats)
    print_table(rows, prompt_len, new_tokens)
    # Other processes on a 2-core machine distort every number: show how busy it was.
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
