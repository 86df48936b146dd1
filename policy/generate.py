"""Batched sampling from a policy with a preallocated KV cache (in the manner of gpt-fast).

Prompts of different lengths share one batch by left padding: row b's prompt occupies the last
len_b of the P prompt slots, its tokens keep their own positions 0..len_b-1, and its attention mask
hides the padding slots. Every row therefore computes what it would compute alone. Generated tokens
then go to slots P, P+1, ... of every row at once, so one integer addresses the whole batch.

``n`` samples per prompt run the prompt once: prefill fills the cache for the B prompts, then the
cache is repeated n times along the batch before decoding.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from policy.model import KVCache, Transformer


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids of each sample, ending with the EOS that stopped it, if any
    logprobs: list[list[float]]  # log p(token) under the raw model: log_softmax(logits) at temperature 1
    lengths: list[int]  # len(tokens[i])
    prompt_index: list[int]  # the prompt sample i continues: samples of prompt p are p*n .. p*n + n-1


def sample(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next token (N,) from float32 logits (N, V): temperature, then top-k, then nucleus (top-p) as in Meta's
    sample_top_p. Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1:
        logits = logits / temperature
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(-1)  # (N, V)
    if top_p >= 1.0:
        return _draw(probs, generator)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (N, V) each
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the tokens before it already do.
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > top_p, 0.0)
    return order.gather(-1, _draw(sorted_probs, generator)[:, None]).squeeze(-1)


def sample_with_logprobs(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """sample() and raw_logprobs() of the drawn tokens, (N,) each, from float32 logits (N, V).

    Plain sampling (temperature 1, no top-k or top-p), the common case of rejection sampling and PPO,
    draws from the very exponentials the log-normaliser sums, so the (N, V) matrix is read three times
    instead of some ten; the log-probs are computed exactly as logsumexp computes them.
    """
    if temperature != 1 or top_k > 0 or top_p < 1.0:
        token = sample(logits, temperature, top_k, top_p, generator)
        return token, raw_logprobs(logits, token)
    peak = logits.amax(-1, keepdim=True)  # (N, 1)
    weights = (logits - peak).exp_()  # (N, V): unnormalised probabilities, the largest is 1
    log_z = weights.sum(-1).log_() + peak.squeeze(-1)  # (N,): logsumexp's own steps, so the same value
    token = _draw(weights, generator)
    return token, logits.gather(-1, token[:, None]).squeeze(-1) - log_z


# Inverse-CDF sampling reads the vocabulary in blocks of this many tokens (see _draw).
_BLOCK = 128


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row with probability proportional to probs (N, V) >= 0, which need not sum to one.

    Inverse-CDF sampling: one uniform u per row, then the first index whose cumulative mass exceeds u.
    torch.multinomial and the exponential race draw a random number per token, some 30x dearer on CPU,
    and a cumulative sum over the whole vocabulary is a sequential pass; so the search runs in two
    levels: the vectorised sums of blocks of _BLOCK tokens, a cumulative sum over the blocks, then a
    cumulative sum inside the one block u falls in. A token of zero mass is never drawn.
    """
    N, V = probs.shape
    n_blocks = -(-V // _BLOCK)
    padding = n_blocks * _BLOCK - V
    blocks = (F.pad(probs, (0, padding)) if padding else probs).reshape(N, n_blocks, _BLOCK)  # padding: no mass
    block_cdf = blocks.sum(-1).cumsum(-1)  # (N, n_blocks)
    u = _uniform_below(block_cdf[:, -1:], generator)  # (N, 1)
    block = torch.searchsorted(block_cdf, u, right=True)  # (N, 1): block_cdf[block] > u >= block_cdf[block - 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # (N, 1)
    inside = blocks.gather(1, block[:, :, None].expand(N, 1, _BLOCK)).squeeze(1).cumsum(-1)  # (N, _BLOCK)
    # u - before >= 0 exactly; the block's own sum may round differently from its share of block_cdf, so
    # keep the target below the block's last cumulative value: the first value above it then has mass.
    target = torch.minimum(u - before, torch.nextafter(inside[:, -1:], torch.zeros_like(u)))
    return (block * _BLOCK + torch.searchsorted(inside, target, right=True)).squeeze(-1)


def _uniform_below(total: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform in [0, total) per row of total (N, 1), rounding kept below total."""
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    return torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))


def raw_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax(logits)[token] per row, logits (N, V) and tokens (N,): what PPO needs as old log-probs."""
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)


def prefill(model: Transformer, prompts: Tensor, valid: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """Run left-padded prompts (B, P) into cache slots [0, P); returns the logits (B, V) of their last tokens.

    A query sees earlier valid slots of its own row. A padding slot also sees itself, so its softmax
    has something to normalise over: the padding's outputs stay finite and, being masked, unused.
    """
    P = prompts.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=prompts.device).tril()
    itself = torch.eye(P, dtype=torch.bool, device=prompts.device)
    mask = causal & (valid[:, None, None, :P] | itself)  # (B, 1, P, P)
    return model.forward_cached(prompts, positions[:, :P], cache, 0, mask)


def decode_one_token(
    model: Transformer, token: Tensor, valid: Tensor, positions: Tensor, cache: KVCache, slot: int
) -> Tensor:
    """Feed token (N,) into cache slot ``slot``; returns the logits (N, V) for the next one."""
    mask = valid[:, None, None, : slot + 1]  # (N, 1, 1, slot + 1)
    return model.forward_cached(token[:, None], positions[:, slot : slot + 1], cache, slot, mask)


def generate(
    model: Transformer,
    prompt_tokens: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    eos_id: int | None = 2,
    seed: int | None = None,
) -> GenerationOutput:
    """Sample up to max_new_tokens continuations of each prompt, n per prompt.

    Sampling uses temperature, top_k (0: off) and top_p (1.0: off); temperature 0 is greedy. A sample
    stops after producing eos_id (None: never stops early); generation also stops at the model's
    context, so at most max_seq_len - (longest prompt) tokens are produced. The returned log-probs are
    those of the raw model (temperature 1, no truncation), whatever the sampling settings. With a seed
    the result is reproducible on the same device; without one the global RNG is used.
    """
    args = model.args
    _check_request(prompt_tokens, max_new_tokens, temperature, top_p, top_k, n, args.vocab_size, args.max_seq_len)
    device = model.output.weight.device
    P = max(len(p) for p in prompt_tokens)
    steps = min(max_new_tokens, args.max_seq_len - P)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    autocast, cache_dtype = _precision(device, model.output.weight.dtype)

    with torch.inference_mode(), autocast:
        # Left padding: row b's prompt fills the last len_b of P slots, generated tokens follow in slot order.
        lengths = torch.tensor([len(p) for p in prompt_tokens], device=device)  # (B,)
        prompts = torch.tensor([[0] * (P - len(p)) + p for p in prompt_tokens], device=device)  # (B, P)
        slots = torch.arange(P + steps, device=device)  # (S,)
        pad = (P - lengths)[:, None]  # (B, 1)
        valid = slots >= pad  # (B, S): slots a row may attend to
        positions = (slots - pad).clamp(min=0)  # (B, S): each row counts from its own first token

        cache = KVCache(args, len(prompt_tokens), P + steps, device, cache_dtype)
        logits = prefill(model, prompts, valid, positions, cache)  # (B, V)
        if n > 1:
            cache = cache.repeat_interleave(n)
            logits, valid, positions = (t.repeat_interleave(n, dim=0) for t in (logits, valid, positions))

        N = logits.shape[0]
        tokens = torch.zeros(N, steps, dtype=torch.long, device=device)
        logprobs = torch.zeros(N, steps, device=device)
        out_lengths = torch.full((N,), steps, device=device)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        for t in range(steps):
            token, logprobs[:, t] = sample_with_logprobs(logits, temperature, top_k, top_p, generator)  # (N,)
            if eos_id is not None:
                finished_now = (token == eos_id) & ~done
                out_lengths.masked_fill_(finished_now, t + 1)
                done |= finished_now
            tokens[:, t] = token
            if t + 1 == steps or (eos_id is not None and bool(done.all())):
                break
            logits = decode_one_token(model, token, valid, positions, cache, P + t)

    lengths_list = out_lengths.tolist()
    return GenerationOutput(
        tokens=[row[:k] for row, k in zip(tokens.tolist(), lengths_list)],
        logprobs=[row[:k] for row, k in zip(logprobs.tolist(), lengths_list)],
        lengths=lengths_list,
        prompt_index=[i // n for i in range(N)],
    )


def _check_request(
    prompt_tokens: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    n: int,
    vocab_size: int,
    max_seq_len: int,
) -> None:
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("every prompt needs at least one token (usually BOS)")
    for i, prompt in enumerate(prompt_tokens):
        if len(prompt) >= max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; the model's context is {max_seq_len} tokens, "
                             "which leaves no room to generate")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
    if max_new_tokens < 1 or n < 1 or top_k < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 1, n >= 1, top_k >= 0, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens=}, {n=}, {top_k=}, {temperature=}, {top_p=}")


def _precision(device: torch.device, param_dtype: torch.dtype) -> tuple[AbstractContextManager, torch.dtype]:
    """bf16 autocast and a bf16 cache on CUDA; on CPU the model's own dtype."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.bfloat16
    return nullcontext(), param_dtype
