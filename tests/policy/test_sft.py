"""policy.sft against hand computations: which tokens carry the loss, one AdamW step written out by
hand, the schedule's formula, memorisation of a tiny set, and the checkpoint it writes."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from policy.checkpoints import load_checkpoint
from policy.demo_world import default_world
from policy.generate import generate
from policy.model import ModelArgs, Transformer
from policy.sft import (
    IGNORE, SFTConfig, SFTSample, dialog_sample, lr_at, make_batch, save_checkpoint, sft_train, text_sample,
)
from policy.tokenizer import Tokenizer, train_sentencepiece

DIALOGS = [
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}],
    [{"role": "user", "content": "What sound does a cow make?"}, {"role": "assistant", "content": "A cow says moo."}],
    [{"role": "system", "content": "Answer briefly and politely."},
     {"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "It is Lima."}],
    [{"role": "user", "content": "What colour is snow?"}, {"role": "assistant", "content": "Snow is white."},
     {"role": "user", "content": "And what about coal?"}, {"role": "assistant", "content": "Coal is black."}],
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a shared machine OpenMP threads that
    # wait for a busy core make each step fifty times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_sentencepiece(default_world().corpus(), path, vocab_size=400))


def tiny(tokenizer: Tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                 multiple_of=32, max_seq_len=96))


def test_only_answer_tokens_are_targets(tokenizer: Tokenizer) -> None:
    # By hand, from the pieces of Meta's format: the prompt part, then the whole exchange.
    prompt = tokenizer.encode("[INST] What is 2 plus 2? [/INST]", bos=True, eos=False)
    exchange = tokenizer.encode("[INST] What is 2 plus 2? [/INST] 2 plus 2 is 4. ", bos=True, eos=True)
    inputs, targets = make_batch([dialog_sample(tokenizer, DIALOGS[0])], tokenizer.pad_id, 96)
    assert inputs[0].tolist() == exchange[:-1]
    n = len(prompt)
    assert targets[0, : n - 1].tolist() == [IGNORE] * (n - 1)  # predicting a prompt token: no loss
    assert targets[0, n - 1 :].tolist() == exchange[n:]  # from the first answer token to the EOS
    assert tokenizer.decode(exchange[n:-1]).strip() == "2 plus 2 is 4." and exchange[-1] == tokenizer.eos_id


def test_padding_and_both_answers_of_a_two_turn_dialog(tokenizer: Tokenizer) -> None:
    first = tokenizer.encode("[INST] What colour is snow? [/INST] Snow is white. ", bos=True, eos=True)
    first_prompt = tokenizer.encode("[INST] What colour is snow? [/INST]", bos=True, eos=False)
    second = tokenizer.encode("[INST] And what about coal? [/INST] Coal is black. ", bos=True, eos=True)
    second_prompt = tokenizer.encode("[INST] And what about coal? [/INST]", bos=True, eos=False)
    short, long_ = dialog_sample(tokenizer, DIALOGS[0]), dialog_sample(tokenizer, DIALOGS[3])
    inputs, targets = make_batch([short, long_], tokenizer.pad_id, 96)
    assert inputs.shape == (2, len(first) + len(second) - 1)
    answers = (len(first) - len(first_prompt)) + (len(second) - len(second_prompt))
    assert int((targets[1] != IGNORE).sum()) == answers
    assert (inputs[0, len(short.tokens) - 1 :] == tokenizer.pad_id).all()
    assert (targets[0, len(short.tokens) - 1 :] == IGNORE).all()  # padding is never a target


def test_text_sample_learns_every_token(tokenizer: Tokenizer) -> None:
    sample = text_sample(tokenizer, "Paris is the capital of France.")
    _, targets = make_batch([sample], tokenizer.pad_id, 96)
    assert targets[0].tolist() == sample.tokens[1:]


def test_one_step_equals_a_hand_rolled_adamw_step(tokenizer: Tokenizer) -> None:
    model = tiny(tokenizer)
    reference = copy.deepcopy(model)
    samples = [dialog_sample(tokenizer, d) for d in DIALOGS]
    # A large eps makes the update a smooth function of the gradient (not ~sign(g)), so float noise
    # between the batched and the one-at-a-time computation cannot flip an update; clipping is active.
    config = SFTConfig(lr=1e-2, max_steps=1, batch_size=4, weight_decay=0.1, grad_clip=0.05, adam_eps=1e-3,
                       beta1=0.9, beta2=0.95, device="cpu")
    metrics = sft_train(model, tokenizer, samples, config)

    # By hand: mean -log p over every answer token of the batch, one dialog at a time, no padding.
    nll, count = torch.zeros(()), 0
    for s in samples:
        logp = reference(torch.tensor([s.tokens[:-1]]))[0].log_softmax(-1)
        for t in range(len(s.tokens) - 1):
            if s.loss_mask[t + 1]:
                nll = nll - logp[t, s.tokens[t + 1]]
                count += 1
    loss = nll / count
    loss.backward()
    assert metrics["loss_first"] == pytest.approx(loss.item(), rel=1e-5)
    params = list(reference.parameters())
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    scale = min(1.0, 0.05 / (norm + 1e-6))
    assert scale < 1  # clipping took effect
    lr = 1e-2
    for (name, p), trained in zip(reference.named_parameters(), model.parameters()):
        g = p.grad * scale
        m_hat = g  # (1 - beta1) g / (1 - beta1): the first step's bias-corrected moments
        v_hat = g * g
        decay = 0.1 if p.dim() >= 2 else 0.0  # matrices only
        expected = p.detach() * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + 1e-3)
        torch.testing.assert_close(trained.detach(), expected, atol=2e-6, rtol=1e-4, msg=name)


def test_micro_batches_give_the_same_update(tokenizer: Tokenizer) -> None:
    samples = [dialog_sample(tokenizer, d) for d in DIALOGS]
    whole, split = tiny(tokenizer), tiny(tokenizer)
    config = SFTConfig(lr=1e-2, max_steps=2, batch_size=4, adam_eps=1e-3, device="cpu")
    sft_train(whole, tokenizer, samples, config)
    sft_train(split, tokenizer, samples, SFTConfig(**{**config.__dict__, "micro_batch_size": 1}))
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


def test_memorises_a_tiny_set(tokenizer: Tokenizer) -> None:
    model = tiny(tokenizer)
    config = SFTConfig(lr=3e-3, max_steps=80, batch_size=4, warmup_steps=5, weight_decay=0.0, device="cpu")
    seen = []
    metrics = sft_train(model, tokenizer, DIALOGS, config, progress=lambda step, total, m: seen.append((step, total)))
    assert seen[0] == (1, 80) and seen[-1] == (80, 80)
    assert metrics["loss_last10"] < 0.05 < 2.0 < metrics["loss_first"]
    model.eval()
    for dialog in DIALOGS:
        prompt = tokenizer.encode_dialog(dialog[:-1])
        out = generate(model, [prompt], 20, temperature=0, eos_id=tokenizer.eos_id)
        assert tokenizer.decode(out.tokens[0][:-1]).strip() == dialog[-1]["content"]


def test_schedule_formula() -> None:
    config = SFTConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, config) == pytest.approx(0.1) and lr_at(9, 110, config) == pytest.approx(1.0)
    assert lr_at(10, 110, config) == pytest.approx(1.0)
    assert lr_at(60, 110, config) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(110, 110, config) == pytest.approx(0.1)


def test_samples_cut_to_the_context(tokenizer: Tokenizer) -> None:
    long_prompt = [{"role": "user", "content": "What is the capital of France? " * 40},
                   {"role": "assistant", "content": "Paris."}]
    model = tiny(tokenizer)
    metrics = sft_train(model, tokenizer, [*DIALOGS, long_prompt], SFTConfig(max_steps=1, batch_size=5, device="cpu"))
    assert (metrics["samples"], metrics["dropped"], metrics["truncated"]) == (4, 1, 1)
    with pytest.raises(ValueError, match="nothing to learn"):
        sft_train(model, tokenizer, [long_prompt], SFTConfig(max_steps=1, device="cpu"))
    with pytest.raises(ValueError, match="same|tokens but"):
        SFTSample([1, 2, 3], [True])


def test_save_checkpoint_is_complete_and_replaces(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny(tokenizer).eval()
    tokenizer_path = tmp_path / "src.model"
    tokenizer_path.write_bytes(tokenizer.sp.serialized_model_proto())
    config = SFTConfig(lr=5e-4)
    out = save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tokenizer_path, config=config, extra={"note": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model",
                                                     "training.json"]
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["lr"] == 5e-4 and record["note"] == "x"
    x = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out)(x), model(x))
    other = tiny(tokenizer, seed=1)
    save_checkpoint(other, tmp_path / "ckpt", tokenizer_path=tokenizer_path)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out)(x), other(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src.model"]  # no temporary left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_learns_like_cpu(tokenizer: Tokenizer) -> None:
    config = SFTConfig(lr=3e-3, max_steps=40, batch_size=4, warmup_steps=5, weight_decay=0.0, device="cuda")
    model = tiny(tokenizer)
    metrics = sft_train(model, tokenizer, DIALOGS, config)
    assert metrics["device"].startswith("cuda") and next(model.parameters()).dtype == torch.float32
    cpu = sft_train(tiny(tokenizer), tokenizer, DIALOGS, SFTConfig(**{**config.__dict__, "device": "cpu"}))
    assert metrics["loss_first"] == pytest.approx(cpu["loss_first"], rel=2e-2)
    assert metrics["loss_last10"] < 0.3
