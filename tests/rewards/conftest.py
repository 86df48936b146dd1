"""Fixtures of the reward-model torch tests: a tiny tokenizer and a tiny policy checkpoint, made once."""

from pathlib import Path

import pytest

from policy.tokenizer import Tokenizer
from tests.rewards import synthetic


@pytest.fixture(scope="session")
def rm_tokenizer_path(tmp_path_factory) -> Path:
    return synthetic.train_tokenizer(tmp_path_factory.mktemp("rm-tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def rm_tokenizer(rm_tokenizer_path) -> Tokenizer:
    return Tokenizer(rm_tokenizer_path)


@pytest.fixture(scope="session")
def rm_policy_dir(tmp_path_factory, rm_tokenizer_path, rm_tokenizer) -> Path:
    return synthetic.save_tiny_policy(tmp_path_factory.mktemp("rm-policy"), rm_tokenizer_path, rm_tokenizer.n_words)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread than two on this 2-core machine, above all when other test
    processes share it (two OpenMP threads then spin-wait on each other); subprocess tests get
    OMP_NUM_THREADS=1 for the same reason, so in-process and subprocess runs use the same kernels."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
