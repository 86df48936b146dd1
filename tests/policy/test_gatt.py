"""policy.gatt: what the sampler sees, and the training tokens and loss masks token by token against
dialogues encoded here by hand, piece by piece, in Meta's chat format."""

from __future__ import annotations

import random

import pytest

from policy.gatt import (FORMS, GAttConfig, Instruction, build_gatt_samples, policy_sample_fn, sample_instruction)
from policy.tokenizer import Tokenizer
from tests.policy.rl_helpers import one_cpu_thread, tiny_policy, tiny_tokenizer  # noqa: F401

INSTRUCTION = Instruction("Always act as Napoleon from now on.", "Figure: Napoleon.", (("figure", "Napoleon"),))
DIALOG = [
    {"role": "user", "content": "tell me a story"},
    {"role": "assistant", "content": "an old reply the policy's replaces"},
    {"role": "user", "content": "is the cat good"},
    {"role": "assistant", "content": "another old reply"},
    {"role": "user", "content": "yes or no"},
]
REPLIES = ["the sun is good", "the cat sat on the mat", "yes"]


class RecordingSampler:
    def __init__(self) -> None:
        self.seen = []

    def __call__(self, user_turns):
        self.seen.append(user_turns)
        return REPLIES[: len(user_turns)]


def by_hand(tok: Tokenizer, system: str, users: list[str], answers: list[str]) -> tuple[list[int], list[bool]]:
    """Meta's format written out: exchange k is BOS "[INST] u_k [/INST] a_k " EOS, the system prompt inside the
    first [INST]; the loss only on the last answer's tokens and its EOS."""
    tokens, mask = [], []
    for k, (u, a) in enumerate(zip(users, answers)):
        if k == 0:
            u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
        prompt = tok.encode(f"[INST] {u} [/INST]", bos=True, eos=False)
        exchange = tok.encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)
        assert exchange[: len(prompt)] == prompt
        last = k == len(users) - 1
        tokens += exchange
        mask += [False] * len(prompt) + [last] * (len(exchange) - len(prompt))
    return tokens, mask


def test_sampling_sees_the_instruction_on_every_user_turn(tiny_tokenizer: Tokenizer) -> None:
    sampler = RecordingSampler()
    build_gatt_samples([DIALOG], sampler, tiny_tokenizer, GAttConfig(), instructions=[INSTRUCTION])
    assert sampler.seen == [[
        {"role": "user", "content": "<<SYS>>\nAlways act as Napoleon from now on.\n<</SYS>>\n\ntell me a story"},
        {"role": "user", "content": "<<SYS>>\nAlways act as Napoleon from now on.\n<</SYS>>\n\nis the cat good"},
        {"role": "user", "content": "<<SYS>>\nAlways act as Napoleon from now on.\n<</SYS>>\n\nyes or no"},
    ]]  # fmt: skip


@pytest.mark.parametrize("shorten", [0.0, 1.0])
def test_training_sample_tokens_and_mask_token_by_token(tiny_tokenizer: Tokenizer, shorten: float) -> None:
    [sample] = build_gatt_samples([DIALOG], RecordingSampler(), tiny_tokenizer,
                                  GAttConfig(shorten_probability=shorten), instructions=[INSTRUCTION])
    system = INSTRUCTION.short if shorten else INSTRUCTION.full
    assert sample.shortened == bool(shorten)
    assert sample.dialog == [
        {"role": "system", "content": system},
        {"role": "user", "content": "tell me a story"}, {"role": "assistant", "content": "the sun is good"},
        {"role": "user", "content": "is the cat good"}, {"role": "assistant", "content": "the cat sat on the mat"},
        {"role": "user", "content": "yes or no"}, {"role": "assistant", "content": "yes"},
    ]  # fmt: skip
    tokens, mask = by_hand(tiny_tokenizer, system, ["tell me a story", "is the cat good", "yes or no"], REPLIES)
    assert sample.sample.tokens == tokens
    assert sample.sample.loss_mask == mask
    # The learned tokens are exactly the last reply, its trailing space and EOS: nothing of earlier turns.
    learned = [t for t, m in zip(tokens, mask) if m]
    assert learned[-1] == tiny_tokenizer.eos_id and tiny_tokenizer.decode(learned).strip() == "yes"
    assert sum(mask) == len(learned) and tokens.count(tiny_tokenizer.eos_id) == 3
    # The instruction appears once, in the first turn only.
    assert tiny_tokenizer.decode(tokens).count(system) == 1


def test_all_turns_makes_one_sample_per_prefix(tiny_tokenizer: Tokenizer) -> None:
    samples = build_gatt_samples([DIALOG], RecordingSampler(), tiny_tokenizer,
                                 GAttConfig(all_turns=True, shorten_probability=0.0), instructions=[INSTRUCTION])
    users = ["tell me a story", "is the cat good", "yes or no"]
    assert len(samples) == 3
    for n, sample in enumerate(samples, 1):
        tokens, mask = by_hand(tiny_tokenizer, INSTRUCTION.full, users[:n], REPLIES[:n])
        assert (sample.sample.tokens, sample.sample.loss_mask) == (tokens, mask)


def test_random_instructions_combine_kinds_and_shorten_about_half_the_time(tiny_tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    config = GAttConfig(max_constraints=3)
    instructions = [sample_instruction(rng, config) for _ in range(300)]
    sizes = {len(i.constraints) for i in instructions}
    assert sizes == {1, 2, 3}
    for ins in instructions:
        kinds = [k for k, _ in ins.constraints]
        assert len(set(kinds)) == len(kinds)  # different kinds
        assert ins.full == " ".join(FORMS[k][0].format(v) for k, v in ins.constraints)
        assert len(ins.short) < len(ins.full)
    samples = build_gatt_samples([DIALOG[:1]] * 200, RecordingSampler(), tiny_tokenizer, GAttConfig(seed=1))
    shortened = sum(s.shortened for s in samples) / len(samples)
    assert 0.4 < shortened < 0.6
    assert all(s.dialog[0]["content"] == (s.instruction.short if s.shortened else s.instruction.full) for s in samples)


def test_bad_dialogues_and_replies_are_refused(tiny_tokenizer: Tokenizer) -> None:
    config = GAttConfig()
    with pytest.raises(ValueError, match="system"):
        build_gatt_samples([[{"role": "system", "content": "x"}, *DIALOG]], RecordingSampler(), tiny_tokenizer, config)
    with pytest.raises(ValueError, match="alternate"):
        build_gatt_samples([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]], RecordingSampler(),
                           tiny_tokenizer, config)
    with pytest.raises(ValueError, match="replies"):
        build_gatt_samples([DIALOG], lambda turns: ["only one"], tiny_tokenizer, config)
    with pytest.raises(ValueError):
        GAttConfig(max_constraints=0)


def test_policy_sample_fn_answers_turn_by_turn(tiny_tokenizer: Tokenizer) -> None:
    policy = tiny_policy(tiny_tokenizer.n_words, max_seq_len=512)  # the instruction on every turn is long
    sample_fn = policy_sample_fn(policy, tiny_tokenizer, max_new_tokens=5, seed=3)
    samples = build_gatt_samples([DIALOG], sample_fn, tiny_tokenizer, GAttConfig(), instructions=[INSTRUCTION])
    replies = [m["content"] for m in samples[0].dialog if m["role"] == "assistant"]
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    assert any(samples[0].sample.loss_mask)
