"""SentencePiece tokenizer with Llama 2's ids and chat format, and training of small tokenizers.

The chat format is built exactly as Meta's reference ``chat_completion`` builds it
(llama/generation.py), piece by piece, so a dialog encodes to the ids Llama 2 chat was fine-tuned on:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

Every completed exchange is its own ``encode(..., bos=True, eos=True)``; the last user turn gets BOS and
no EOS, ready for the model to answer.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

Dialog = Sequence[Mapping[str, str]]  # [{"role": "system" | "user" | "assistant", "content": "..."}]


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # Llama 2 has no pad piece (sp.pad_id() is -1). Batches are padded with EOS instead: padded
        # positions are always masked out of attention and loss, so which id they hold never matters.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        """Prompt ids for a dialog ending with a user turn: the model's answer comes next."""
        exchanges = _exchanges(dialog)
        *done, (last_user, last_answer) = exchanges
        if last_answer is not None:
            raise ValueError("encode_dialog needs a dialog that ends with a user turn")
        ids = [i for user, answer in done for i in self._encode_exchange(user, answer)[0]]
        return ids + self.encode(f"{B_INST} {last_user.strip()} {E_INST}", bos=True, eos=False)

    def encode_dialog_with_loss_mask(self, dialog: Dialog, *, last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
        """Ids of a dialog ending with an assistant turn, and per id whether the loss should count it.

        Only answer tokens (including each exchange's closing EOS, so the model learns to stop) are True.
        last_turn_only=True also zeroes the answers of earlier turns, as Ghost Attention does.
        """
        exchanges = _exchanges(dialog)
        if exchanges[-1][1] is None:
            raise ValueError("encode_dialog_with_loss_mask needs a dialog that ends with an assistant turn")
        ids: list[int] = []
        mask: list[bool] = []
        for turn, (user, answer) in enumerate(exchanges):
            exchange, n_prompt = self._encode_exchange(user, answer)
            learn = not last_turn_only or turn == len(exchanges) - 1
            ids += exchange
            mask += [False] * n_prompt + [learn] * (len(exchange) - n_prompt)
        return ids, mask

    def _encode_exchange(self, user: str, answer: str) -> tuple[list[int], int]:
        """Meta's ids for one completed exchange, and how many of them are the prompt (BOS + [INST] ... [/INST])."""
        ids = self.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
        prompt = self.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)
        # SentencePiece starts a new piece at every space, so the prompt's ids are a prefix of the
        # exchange's; check it rather than assume it, since the mask would silently shift otherwise.
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"cannot split the answer from the prompt in the tokens of: {user[:60]!r}")
        return ids, len(prompt)


def _exchanges(dialog: Dialog) -> list[tuple[str, str | None]]:
    """(user, answer) pairs, the system prompt folded into the first user turn; the last answer may be None."""
    if not dialog:
        raise ValueError("empty dialog")
    messages = [(m["role"], m["content"]) for m in dialog]
    if messages[0][0] == "system":
        if len(messages) < 2 or messages[1][0] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages = [("user", B_SYS + messages[0][1] + E_SYS + messages[1][1])] + messages[2:]
    for i, (role, _) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i} has role {role!r}, expected {expected!r}: after an optional system message, "
                "roles must alternate user, assistant, user, ..."
            )
    contents = [content for _, content in messages] + [None] * (len(messages) % 2)
    return list(zip(contents[::2], contents[1::2]))


def train_sentencepiece(
    lines: Iterable[str],
    out_path: str | os.PathLike[str],
    vocab_size: int,
    *,
    character_coverage: float = 0.99995,
    byte_fallback: bool = True,
) -> Path:
    """Train a BPE SentencePiece model with Llama 2's settings and id conventions (unk 0, bos 1, eos 2, no pad),
    for small models trained from scratch. byte_fallback (as Llama) needs vocab_size above 259 plus the
    characters kept. Writes ``out_path`` atomically and returns it."""
    model = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
