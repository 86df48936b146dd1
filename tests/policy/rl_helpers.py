"""Tiny stand-ins shared by the RLHF algorithm tests (rejection sampling, PPO, GAtt, context distillation):
a SentencePiece tokenizer trained in a second on a few words, a tiny random policy, and toy reward
functions computed from token ids, so every test knows exactly what the reward is."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from policy.model import ModelArgs, Transformer
from policy.reward import Prompt
from policy.tokenizer import Tokenizer, train_sentencepiece

WORDS = ("the cat dog sat on mat is a good bad safe help me how do i tell story about sun moon yes no "
         "please sorry cannot with that you are assistant answer question").split()


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models are dispatch-bound: a second intra-op thread only contends for the cores (on a busy
    2-core machine these tests ran 3-5 times slower with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_tokenizer(directory: Path) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    lines += ["[INST] <<SYS>>\n you are a safe assistant \n<</SYS>>\n\n tell me a story [/INST] yes"] * 50
    return Tokenizer(train_sentencepiece(lines, directory / "tiny.model", vocab_size=320))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("rl_tokenizer"))


def tiny_policy(vocab_size: int, seed: int = 0, dim: int = 32, max_seq_len: int = 96) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=max_seq_len)
    return Transformer(args).eval()


PROMPT_TEXTS = ["tell me a story", "how do i help", "is the cat good", "please answer the question",
                "tell me about the sun", "how do i sat on mat", "you are a good dog", "yes or no"]


def prompts(n: int = 8, safety_every: int = 0) -> list[Prompt]:
    """n single-turn prompts; with safety_every k, every k-th one is safety-tagged."""
    return [Prompt([{"role": "user", "content": PROMPT_TEXTS[i % len(PROMPT_TEXTS)] + " " * (i // len(PROMPT_TEXTS))}],
                   is_safety=bool(safety_every) and i % safety_every == 0)
            for i in range(n)]  # fmt: skip


class TokenFractionReward:
    """helpful = scale * (fraction of the response's tokens that are in `targets`), safety = a constant
    (safe: above the threshold, so R_c is the helpful score on untagged prompts)."""

    def __init__(self, targets: Sequence[int], scale: float = 4.0, safety: float = 3.0) -> None:
        self.targets, self.scale, self.safety = set(targets), scale, safety
        self.calls = 0

    def fraction(self, tokens: Sequence[int]) -> float:
        return sum(t in self.targets for t in tokens) / max(len(tokens), 1)

    def __call__(self, prompts, responses, response_tokens):
        self.calls += 1
        helpful = torch.tensor([self.scale * self.fraction(t) for t in response_tokens], dtype=torch.float64)
        return helpful, torch.full_like(helpful, self.safety)
