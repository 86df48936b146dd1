"""The Llama 2 architecture in one file.

Parameter names are Meta's (``tok_embeddings``, ``layers.N.attention.wq``, ``layers.N.feed_forward.w1``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``), so a ``consolidated.00.pth`` loads with
``load_state_dict`` and no renaming. The model holds no buffers: rotary angles are computed from the
positions of each call, in float32, so casting the model to bf16 never degrades them.

Two ways through the network:

- ``forward`` / ``hidden_states``: full-context causal attention, trainable (SFT, reward models, PPO).
- ``forward_cached``: the inference path used by ``policy.generate``; it writes keys and values into a
  preallocated ``KVCache`` and takes explicit per-row positions and an attention mask, so left-padded
  prompts of different lengths in one batch give each row exactly what it would get alone.

Shape letters: B batch, T tokens in this call, S cache slots attended, H query heads,
K key/value heads, D head_dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    """Hyper-parameters; the first eight are the keys of Meta's ``params.json``."""

    dim: int = 4096  # width of the residual stream
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None means n_heads
    vocab_size: int = -1  # -1 in Meta's params.json means "the tokenizer's size"; must be set to build
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # optional scale of the FFN hidden size (1.3 for 70B)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 4096  # longest context the model is used with (Llama 2 was trained on 4096)
    rope_theta: float = 10000.0  # RoPE base period

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} do not divide")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's formula: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to multiple_of."""
        hidden = 4 * self.dim
        hidden = int(2 * hidden / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x / sqrt(mean(x^2) + eps) in float32 even when x is bf16, as Meta does; cast back before the gain.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_rotations(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """Unit complex numbers e^{i * pos * theta^(-2j/D)} for integer positions (any shape P): (*P, D/2) complex64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate x (B, T, heads, D) by position, Meta's convention: dims (2j, 2j+1) are the real and imaginary
    parts of one complex number, multiplied by rotations (T, D/2) or (B, T, D/2) in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, D/2)
    return torch.view_as_real(pairs * rotations.unsqueeze(-2)).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated for ``max_len`` slots.

    Slot s of every row is written by the same call, so one integer ``start`` addresses the whole batch;
    which slots a row may attend to is the caller's attention mask.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)  # (L, B, K, S_max, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, K, T, D) in slots [start, start + T) and return all slots so far, (B, K, start + T, D)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n: int) -> KVCache:
        """A cache with every row repeated n times (row b -> rows b*n .. b*n+n-1), to sample n continuations."""
        repeated = KVCache.__new__(KVCache)
        repeated.k = self.k.repeat_interleave(n, dim=1)
        repeated.v = self.v.repeat_interleave(n, dim=1)
        return repeated


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new token per row, q (B, H, 1, D), over cached k, v (B, K, S, D) under mask (B, 1, 1, S).

    Same result as scaled_dot_product_attention, but on CPU about 30% faster for this shape (measured in
    bench/bench_sampling.py's setting), where decoding spends most of its non-matmul time: the H/K query
    heads sharing a key/value head become the rows of one small matmul, so no head is repeated. (On an
    AMD EPYC host k @ q^T was the faster order for the scores; on the Intel Xeon that runs the benchmark
    now q @ k^T takes 8% less of a whole decode step: docs/benchmarks.md.)
    """
    B, H, _, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, D)  # query heads grouped by the key/value head they read
    scores = (q @ k.transpose(-1, -2)) * D**-0.5  # (B, K, H/K, S)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).type_as(v) @ v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rotations: Tensor,
        cache: tuple[KVCache, int, int] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, dim). Without a cache: causal attention over x. With cache = (cache, layer, start): attend to
        slots [0, start + T) under ``mask`` (B, 1, T, start + T), True where a query may see a key."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rotations)  # (B, T, H, D)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rotations)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, H or K, T, D)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            kv_cache, layer, start = cache
            k, v = kv_cache.update(layer, start, k, v)  # (B, K, start + T, D)
            if T == 1:
                out = single_query_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, D) -> (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        rotations: Tensor,
        cache: tuple[KVCache, int, int] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (params.json's -1 means: take it from the tokenizer)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """Final-normed hidden states (B, T, dim) of tokens (B, T), positions 0..T-1.

        This is where reward models and PPO's value head attach. Attention is causal, so right padding
        needs no mask: position t never sees the padding after it.
        """
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len {self.args.max_seq_len}")
        rotations = rope_rotations(torch.arange(T, device=tokens.device), self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rotations)
        return self.norm(h)

    def forward(self, tokens: Tensor, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, V) in float32 for tokens (B, T); with targets (B, T) also the mean next-token
        cross-entropy. Targets equal to -100 are ignored (prompt tokens, padding), as in F.cross_entropy."""
        logits = self.output(self.hidden_states(tokens)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def forward_cached(self, tokens: Tensor, positions: Tensor, cache: KVCache, start: int, mask: Tensor) -> Tensor:
        """Inference step: run tokens (B, T) whose keys go to cache slots [start, start + T).

        positions (B, T) are each row's own token positions (left padding shifts them per row); mask
        (B, 1, T, start + T) says which cached slots each query may attend to. Returns float32 logits
        (B, V) of the last token only, the one generation samples from.
        """
        rotations = rope_rotations(positions, self.args.head_dim, self.args.rope_theta)  # (B, T, D/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotations, (cache, i, start), mask)
        return self.output(self.norm(h[:, -1])).float()

