"""Small generated preference data, a tiny SentencePiece tokenizer and tiny policy checkpoints for the
reward-model tests and the benchmark. The preference is simple on purpose: the chosen response
contains the marker word "gladly", the rejected one does not, so a tiny RM can learn it in seconds."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

from policy.checkpoints import save_meta
from policy.model import ModelArgs, Transformer
from policy.tokenizer import train_sentencepiece

MARKER = "gladly"
WORDS = ("river stone cloud apple green quiet bright paper window garden music orange silver morning "
         "winter candle forest little yellow ocean simple yes no the a of and to is it").split()
TOPICS = ("rain", "snow", "cats", "maps", "bread", "trains", "stars", "tea")
BINS = ("both_safe", "both_safe", "chosen_safe_other_unsafe", "both_unsafe", "chosen_unsafe_other_safe")


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_rows(n: int, *, seed: int = 0, start_id: int = 1, test_fraction: float = 0.0, adversarial_fraction: float = 0.3,
              imported_fraction: float = 0.1, batches: tuple[str, ...] = ("2024-W01", "2024-W02"),
              context_turns: int = 0, min_words: int = 3, max_words: int = 12) -> list[dict]:
    """n rows in the export schema; chosen responses carry MARKER at a random position."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        prompt = []
        if rng.random() < 0.3:
            prompt.append({"role": "system", "content": "Be brief."})
        for _ in range(context_turns):
            prompt += [{"role": "user", "content": _sentence(rng, 4)}, {"role": "assistant", "content": _sentence(rng, 5)}]
        prompt.append({"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}, please."})
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        chosen = list(words)
        chosen.insert(rng.randint(0, len(chosen)), MARKER)
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        imported = rng.random() < imported_fraction
        strength = None if imported else rng.randint(0, 3)
        safety_bin = None if imported else rng.choice(BINS)
        rows.append({
            "id": start_id + k, "comparison_id": start_id + k, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
            "rejected": [{"role": "assistant", "content": " ".join(rejected)}],
            "margin": 0.0 if strength is None else strength / 3, "strength": strength, "safety_bin": safety_bin,
            "chosen_safe": None if safety_bin is None else safety_bin in ("both_safe", "chosen_safe_other_unsafe"),
            "rejected_safe": None if safety_bin is None else safety_bin in ("both_safe", "chosen_unsafe_other_safe"),
            "is_adversarial": rng.random() < adversarial_fraction,
            "source": "imported" if imported else rng.choice(("human", "simulated")),
            "origin": "import" if imported else "sampled", "batch": rng.choice(batches),
            "split": "test" if rng.random() < test_fraction else "train", "annotator": f"ann{rng.randint(1, 3)}",
            "chosen_checkpoint": "ckpt-a", "rejected_checkpoint": "ckpt-b",
        })
    return rows


def write_snapshot(rows: list[dict], path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def train_tokenizer(path: Path) -> Path:
    rng = random.Random(0)
    lines = [_sentence(rng, 12) for _ in range(400)] + [f"[INST] Tell me about {t}, please. [/INST] {MARKER}"
                                                         for t in TOPICS] * 5
    lines += ["<<SYS>>\nBe brief.\n<</SYS>>\n\n"] * 5
    return train_sentencepiece(lines, path, vocab_size=320)


def tiny_args(vocab_size: int, **overrides) -> ModelArgs:
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32, max_seq_len=128)
    return ModelArgs(**{**kw, **overrides})


def save_tiny_policy(folder: Path, tokenizer_path: Path, vocab_size: int, seed: int = 0) -> Path:
    """A random tiny Llama saved in Meta's format, tokenizer.model beside it: stands in for a chat model."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(vocab_size))
    save_meta(model, folder)
    (folder / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return folder
