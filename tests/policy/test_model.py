"""policy.model against independent computations: a float64 re-implementation written here, Meta's FFN
formula on the published sizes, the cached inference path, and Hugging Face's LlamaForCausalLM."""

import math

import pytest
import torch

from policy.model import KVCache, ModelArgs, Transformer


def naive_llama_logits(weights: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int]) -> torch.Tensor:
    """Llama 2 for one sequence in float64, head by head, with RoPE as complex multiplication (Meta's form)."""
    W = {name: w.detach().double() for name, w in weights.items()}
    T, H, K = len(tokens), args.n_heads, args.n_kv_heads
    D = args.dim // H

    def rms(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps) * gain

    def rotate(x: torch.Tensor) -> torch.Tensor:  # (T, heads, D)
        freqs = 1.0 / args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        phase = torch.exp(1j * torch.outer(torch.arange(T, dtype=torch.float64), freqs))  # (T, D/2)
        pairs = torch.view_as_complex(x.reshape(T, x.shape[1], D // 2, 2).contiguous())
        return torch.view_as_real(pairs * phase[:, None, :]).reshape(x.shape)

    x = W["tok_embeddings.weight"][tokens]  # (T, dim)
    for layer in range(args.n_layers):
        p = f"layers.{layer}."
        h = rms(x, W[p + "attention_norm.weight"])
        q = rotate(torch.einsum("td,od->to", h, W[p + "attention.wq.weight"]).reshape(T, H, D))
        k = rotate(torch.einsum("td,od->to", h, W[p + "attention.wk.weight"]).reshape(T, K, D))
        v = torch.einsum("td,od->to", h, W[p + "attention.wv.weight"]).reshape(T, K, D)
        heads = []
        for head in range(H):
            kv = head // (H // K)
            scores = torch.einsum("id,jd->ij", q[:, head], k[:, kv]) / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        x = x + torch.cat(heads, dim=-1) @ W[p + "attention.wo.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        gate = h @ W[p + "feed_forward.w1.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ W[p + "feed_forward.w3.weight"].T)) @ W[p + "feed_forward.w2.weight"].T
    return rms(x, W["norm.weight"]) @ W["output.weight"].T


def test_logits_match_float64_reference(tiny_model: Transformer, tiny_args: ModelArgs) -> None:
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = tiny_model(tokens)
    assert logits.shape == (2, 11, tiny_args.vocab_size) and logits.dtype == torch.float32
    for row in range(2):
        expected = naive_llama_logits(tiny_model.state_dict(), tiny_args, tokens[row].tolist())
        torch.testing.assert_close(logits[row].double(), expected, atol=1e-5, rtol=1e-5)


def test_parameter_names_are_metas(tiny_model: Transformer) -> None:
    names = set(tiny_model.state_dict())
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.1.attention.wq.weight",
            "layers.1.attention.wo.weight", "layers.1.feed_forward.w2.weight", "layers.1.attention_norm.weight",
            "layers.1.ffn_norm.weight"} <= names
    assert len(names) == 3 + 9 * 2  # nothing else: no buffers travel with the weights


@pytest.mark.parametrize(
    ("params", "hidden"),
    [
        ({"dim": 4096, "multiple_of": 256}, 11008),  # 7B
        ({"dim": 5120, "multiple_of": 256}, 13824),  # 13B
        ({"dim": 8192, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}, 28672),  # 70B
    ],
)
def test_ffn_hidden_size_follows_metas_formula(params: dict, hidden: int) -> None:
    assert ModelArgs(**params, vocab_size=32000).ffn_hidden_dim == hidden


def test_cross_entropy_ignores_minus_100(tiny_model: Transformer, tiny_args: ModelArgs) -> None:
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    targets = tokens.roll(-1, dims=1)
    targets[:, :3] = -100  # a prompt the loss must skip
    targets[:, -1] = -100
    logits, loss = tiny_model(tokens, targets)
    log_probs = logits.log_softmax(-1)[:, 3:-1].gather(-1, targets[:, 3:-1, None])
    torch.testing.assert_close(loss, -log_probs.mean())
    loss.backward()  # forward is trainable: no inference mode inside
    assert tiny_model.layers[0].attention.wq.weight.grad.abs().sum() > 0


def test_hidden_states_feed_the_output_head(tiny_model: Transformer) -> None:
    tokens = torch.tensor([[1, 5, 9, 13]])
    hidden = tiny_model.hidden_states(tokens)
    assert hidden.shape == (1, 4, 64)
    torch.testing.assert_close(tiny_model.output(hidden), tiny_model(tokens))


def test_cached_decoding_equals_full_forward(tiny_model: Transformer, tiny_args: ModelArgs) -> None:
    tokens = torch.randint(0, tiny_args.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    full = tiny_model(tokens)  # (3, 12, V)
    cache = KVCache(tiny_args, batch_size=3, max_len=16, device=torch.device("cpu"), dtype=torch.float32)
    prompt = 5
    with torch.inference_mode():
        positions = torch.arange(prompt).expand(3, prompt)
        causal = torch.ones(prompt, prompt, dtype=torch.bool).tril().expand(3, 1, prompt, prompt)
        last = tiny_model.forward_cached(tokens[:, :prompt], positions, cache, 0, causal)
        torch.testing.assert_close(last, full[:, prompt - 1], atol=1e-5, rtol=1e-5)
        for t in range(prompt, 12):
            visible = torch.ones(3, 1, 1, t + 1, dtype=torch.bool)
            last = tiny_model.forward_cached(tokens[:, t : t + 1], torch.full((3, 1), t), cache, t, visible)
            torch.testing.assert_close(last, full[:, t], atol=1e-5, rtol=1e-5)


def test_logits_match_transformers_llama(tiny_model: Transformer, tiny_args: ModelArgs) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=tiny_args.vocab_size, hidden_size=tiny_args.dim, intermediate_size=tiny_args.ffn_hidden_dim,
        num_hidden_layers=tiny_args.n_layers, num_attention_heads=tiny_args.n_heads,
        num_key_value_heads=tiny_args.n_kv_heads, rms_norm_eps=tiny_args.norm_eps,
        max_position_embeddings=tiny_args.max_seq_len, rope_theta=tiny_args.rope_theta, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()

    def to_half_split(w: torch.Tensor, heads: int) -> torch.Tensor:
        # HF rotates the two halves of each head instead of interleaved pairs: reorder the rows once.
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    ours = tiny_model.state_dict()
    converted = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"],
                 "lm_head.weight": ours["output.weight"]}
    for i in range(tiny_args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        converted |= {
            q + "self_attn.q_proj.weight": to_half_split(ours[p + "attention.wq.weight"], tiny_args.n_heads),
            q + "self_attn.k_proj.weight": to_half_split(ours[p + "attention.wk.weight"], tiny_args.n_kv_heads),
            q + "self_attn.v_proj.weight": ours[p + "attention.wv.weight"],
            q + "self_attn.o_proj.weight": ours[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": ours[p + "feed_forward.w1.weight"],
            q + "mlp.down_proj.weight": ours[p + "feed_forward.w2.weight"],
            q + "mlp.up_proj.weight": ours[p + "feed_forward.w3.weight"],
            q + "input_layernorm.weight": ours[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": ours[p + "ffn_norm.weight"],
        }
    hf.load_state_dict(converted, strict=True)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)
