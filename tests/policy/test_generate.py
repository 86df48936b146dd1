"""policy.generate against naive decoding with the full forward, one-prompt-at-a-time runs, and the
sampling distributions written out by hand."""

import pytest
import torch

from policy import generate as generation
from policy.generate import generate, sample, sample_with_logprobs
from policy.model import ModelArgs, Transformer

PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45], [1], [1, 8, 8, 8, 30]]


def naive_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by re-running the full forward on the whole sequence at every step."""
    sequence, logprobs = list(prompt), []
    for _ in range(steps):
        last = model(torch.tensor([sequence]))[0, -1].log_softmax(-1)
        token = int(last.argmax())
        sequence.append(token)
        logprobs.append(float(last[token]))
    return sequence[len(prompt):], logprobs


def full_forward_logprobs(model: Transformer, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log p(generated[t] | prompt, generated[:t]) from one full forward."""
    sequence = torch.tensor([prompt + generated])
    logprobs = model(sequence)[0, len(prompt) - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)


def test_greedy_equals_naive_loop(tiny_model: Transformer) -> None:
    out = generate(tiny_model, [PROMPTS[1]], 12, temperature=0, eos_id=None)
    with torch.no_grad():
        tokens, logprobs = naive_greedy(tiny_model, PROMPTS[1], 12)
    assert out.tokens == [tokens] and out.lengths == [12] and out.prompt_index == [0]
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), torch.tensor(logprobs), atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_one_prompt_at_a_time(tiny_model: Transformer) -> None:
    batched = generate(tiny_model, PROMPTS, 10, temperature=0, eos_id=None)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(tiny_model, [prompt], 10, temperature=0, eos_id=None)
        assert batched.tokens[i] == alone.tokens[0]
        torch.testing.assert_close(torch.tensor(batched.logprobs[i]), torch.tensor(alone.logprobs[0]),
                                   atol=1e-5, rtol=1e-5)


def test_logprobs_are_the_raw_models_whatever_the_sampling(tiny_model: Transformer) -> None:
    out = generate(tiny_model, PROMPTS, 8, temperature=0.7, top_p=0.9, top_k=20, eos_id=None, seed=3)
    for i, prompt in enumerate(PROMPTS):
        expected = full_forward_logprobs(tiny_model, prompt, out.tokens[i])
        torch.testing.assert_close(torch.tensor(out.logprobs[i]), expected, atol=1e-5, rtol=1e-5)


def test_seed_reproduces_and_varies(tiny_model: Transformer) -> None:
    first = generate(tiny_model, PROMPTS, 16, temperature=1.0, eos_id=None, seed=7)
    assert generate(tiny_model, PROMPTS, 16, temperature=1.0, eos_id=None, seed=7) == first
    assert generate(tiny_model, PROMPTS, 16, temperature=1.0, eos_id=None, seed=8).tokens != first.tokens


def test_top_k_one_is_greedy(tiny_model: Transformer) -> None:
    greedy = generate(tiny_model, PROMPTS, 10, temperature=0, eos_id=None)
    assert generate(tiny_model, PROMPTS, 10, temperature=1.3, top_k=1, eos_id=None, seed=0).tokens == greedy.tokens


def test_n_samples_share_one_prefill(tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_batches = []
    real_prefill = generation.prefill

    def counting_prefill(model: Transformer, prompts: torch.Tensor, *rest: object) -> torch.Tensor:
        prefill_batches.append(prompts.shape[0])
        return real_prefill(model, prompts, *rest)

    monkeypatch.setattr(generation, "prefill", counting_prefill)
    out = generate(tiny_model, PROMPTS[:2], 6, temperature=0, n=3, eos_id=None)
    assert prefill_batches == [2]
    assert out.prompt_index == [0, 0, 0, 1, 1, 1]
    single = generate(tiny_model, PROMPTS[:2], 6, temperature=0, eos_id=None)
    assert out.tokens == [single.tokens[0]] * 3 + [single.tokens[1]] * 3
    sampled = generate(tiny_model, PROMPTS[:1], 12, n=4, eos_id=None, seed=1)
    assert len({tuple(t) for t in sampled.tokens}) > 1  # the copies sample independently


def test_each_sequence_stops_at_its_eos(tiny_model: Transformer) -> None:
    free = generate(tiny_model, PROMPTS, 12, temperature=0, eos_id=None)
    eos = free.tokens[0][3]  # make row 0's fourth token the EOS
    stopped = generate(tiny_model, PROMPTS, 12, temperature=0, eos_id=eos)
    for row, full in zip(stopped.tokens, free.tokens):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert row == expected
    assert stopped.lengths[0] == free.tokens[0].index(eos) + 1 <= 4
    assert [len(lp) for lp in stopped.logprobs] == stopped.lengths


def test_generation_stops_at_the_context(tiny_model: Transformer) -> None:
    out = generate(tiny_model, [[1] * 60, [1, 2]], 10, temperature=0, eos_id=None)  # max_seq_len is 64
    assert out.lengths == [4, 4]


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([[1] * 64], {}, "context is 64"),
        ([[1, 97]], {}, "outside the vocabulary"),
        ([[]], {}, "at least one token"),
        ([[1]], {"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_requests_raise_value_error(tiny_model: Transformer, prompts: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tiny_model, prompts, 4, **kwargs)


def test_sampling_distributions() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40_000, 4)
    generator = torch.Generator().manual_seed(0)

    def frequencies(**kwargs: float) -> torch.Tensor:
        drawn = sample(logits, generator=generator, **{"temperature": 1.0, "top_k": 0, "top_p": 1.0} | kwargs)
        return torch.bincount(drawn, minlength=4) / len(drawn)

    torch.testing.assert_close(frequencies(), probs, atol=0.01, rtol=0)
    tempered = probs**2 / (probs**2).sum()
    torch.testing.assert_close(frequencies(temperature=0.5), tempered, atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    # Nucleus 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it; the rest is cut.
    torch.testing.assert_close(frequencies(top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.01, rtol=0)


def test_blockwise_inverse_cdf_over_a_ragged_vocabulary() -> None:
    # 300 tokens: blocks of 128 tokens, the last one padded. The mass sits on block edges (127, 128, 299)
    # and inside the last block; every other token, the whole of block 1 but its first, has none.
    probs = torch.zeros(300)
    probs[[127, 128, 270, 299]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(40_000, 300)
    generator = torch.Generator().manual_seed(1)
    for temperature, expected in ((1.0, probs), (0.5, probs**2 / (probs**2).sum())):
        drawn, logprobs = sample_with_logprobs(logits, temperature, 0, 1.0, generator)
        assert set(drawn.unique().tolist()) == {127, 128, 270, 299}
        torch.testing.assert_close(torch.bincount(drawn, minlength=300) / len(drawn), expected, atol=0.01, rtol=0)
        torch.testing.assert_close(logprobs, probs.log()[drawn])


def test_sample_with_logprobs_returns_the_raw_log_softmax() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 4
    expected = logits.log_softmax(-1)
    for kwargs in ({}, {"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.8}):
        settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} | kwargs
        token, logprobs = sample_with_logprobs(logits, generator=torch.Generator().manual_seed(2), **settings)
        assert torch.equal(token, sample(logits, generator=torch.Generator().manual_seed(2), **settings))
        # The very numbers raw_logprobs (and PPO's recomputation) give, and log_softmax's up to rounding.
        assert torch.equal(logprobs, generation.raw_logprobs(logits, token))
        torch.testing.assert_close(logprobs, expected.gather(-1, token[:, None]).squeeze(-1))


def test_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bench_sampling

    bench_sampling.main(["--smoke"])
    assert "tok/s" in capsys.readouterr().out


def test_tiny_model_in_bf16_on_cpu(tiny_args: ModelArgs) -> None:
    model = Transformer(tiny_args).to(torch.bfloat16)
    out = generate(model, PROMPTS, 5, seed=0, eos_id=None)
    assert out.lengths == [5] * 4 and all(lp <= 0 for row in out.logprobs for lp in row)
