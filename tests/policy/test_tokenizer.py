"""policy.tokenizer against the real Llama 2 tokenizer and Meta's chat-format rule, built here by hand."""

import random
from pathlib import Path

import pytest

from policy.tokenizer import Tokenizer, train_sentencepiece

DIALOG = [
    {"role": "system", "content": "Always answer with a haiku."},
    {"role": "user", "content": " What is rain? "},
    {"role": "assistant", "content": "Water falls from clouds\n"},
    {"role": "user", "content": "And snow?"},
]


@pytest.fixture
def tokenizer(llama2_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_path)


def test_llama2_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    assert tokenizer.pad_id == 2  # Llama 2 has no pad piece; we pad with EOS
    assert tokenizer.decode([1, 15043, 3186, 2]) == "Hello world"


def test_dialog_follows_metas_chat_completion(tokenizer: Tokenizer) -> None:
    # Meta: system folded into the first user turn; each exchange bos + "[INST] u [/INST] a " + eos.
    first_user = "<<SYS>>\nAlways answer with a haiku.\n<</SYS>>\n\n What is rain?"
    expected = (
        tokenizer.encode(f"[INST] {first_user.strip()} [/INST] Water falls from clouds ", bos=True, eos=True)
        + tokenizer.encode("[INST] And snow? [/INST]", bos=True, eos=False)
    )
    assert tokenizer.encode_dialog(DIALOG) == expected
    assert expected[0] == 1 and expected.count(2) == 1 and expected[-1] != 2


def test_loss_mask_covers_only_answers(tokenizer: Tokenizer) -> None:
    dialog = DIALOG + [{"role": "assistant", "content": "White quiet falling"}]
    ids, mask = tokenizer.encode_dialog_with_loss_mask(dialog)
    assert len(ids) == len(mask)
    learned = [i for i, m in zip(ids, mask) if m]
    # The answers, each with the trailing space of Meta's format and its EOS; nothing of the prompts.
    assert tokenizer.decode(learned) == "Water falls from clouds  White quiet falling "
    assert learned.count(2) == 2
    assert ids[: len(tokenizer.encode_dialog(DIALOG))] == tokenizer.encode_dialog(DIALOG)

    ids_last, mask_last = tokenizer.encode_dialog_with_loss_mask(dialog, last_turn_only=True)
    assert ids_last == ids
    assert tokenizer.decode([i for i, m in zip(ids, mask_last) if m]) == "White quiet falling "


@pytest.mark.parametrize(
    "dialog",
    [
        [],
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # no user turn to answer
    ],
)
def test_malformed_dialogs_are_refused(tokenizer: Tokenizer, dialog: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError):
        tokenizer.encode_dialog(dialog)


def test_loss_mask_needs_a_final_answer(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        tokenizer.encode_dialog_with_loss_mask(DIALOG)


def test_train_small_tokenizer(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["reward", "model", "policy", "sample", "human", "prefers", "answer", "safe", "helpful", "the", "a"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 999)}."
             for _ in range(300)]
    path = train_sentencepiece(lines, tmp_path / "tiny.model", vocab_size=320)
    tok = Tokenizer(path)
    assert (tok.n_words, tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (320, 0, 1, 2, -1)
    for line in lines[:20] + ["unseen wörds ünïcode 42"]:  # byte fallback covers unseen characters
        assert tok.decode(tok.encode(line, bos=True, eos=True)) == line
    assert len(tok.encode("reward model policy", bos=False, eos=False)) == 3  # whole words were learned
