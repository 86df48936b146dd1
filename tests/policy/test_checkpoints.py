"""policy.checkpoints: round trips in both formats, Meta's shard merge, transformers reading what we write,
and the refusals (pickled code, wrong shapes, missing files, paths outside the model roots)."""

import json
import os
from pathlib import Path

import pytest
import torch

from policy.checkpoints import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint_path,
    save_hf,
    save_meta,
    sha256_of_checkpoint,
)
from policy.model import ModelArgs, Transformer


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_meta_round_trip(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "params.json"]  # no temp files left
    params = json.loads((tmp_path / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 16,
                      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}
    loaded = load_checkpoint(tmp_path, max_seq_len=64)
    assert loaded.args == tiny_model.args
    assert_same_weights(loaded, tiny_model)
    assert load_checkpoint(tmp_path, dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16


def test_two_shards_merge_by_metas_rule(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    # Split as Meta's model parallelism does: embedding, wo and w2 along dim 1, other matrices along
    # dim 0, norms replicated. Also keep Meta's rope.freqs entry, which loading must ignore.
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, tensor in tiny_model.state_dict().items():
        if tensor.dim() == 1:
            halves = (tensor.clone(), tensor.clone())
        elif name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
            halves = tensor.chunk(2, dim=1)
        else:
            halves = tensor.chunk(2, dim=0)
        for shard, half in zip(shards, halves):
            shard[name] = half.clone()
    for i, shard in enumerate(shards):
        torch.save(shard | {"rope.freqs": torch.ones(8)}, tmp_path / f"consolidated.0{i}.pth")
    assert_same_weights(load_checkpoint(tmp_path), tiny_model)


def test_vocab_size_minus_one_needs_the_tokenizer(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text()) | {"vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, vocab_size=97).args.vocab_size == 97


def test_hf_round_trip_gives_the_same_logits(tiny_model: Transformer, tmp_path: Path) -> None:
    save_hf(tiny_model, tmp_path / "hf")
    save_meta(tiny_model, tmp_path / "meta")
    from_hf, from_meta = load_checkpoint(tmp_path / "hf"), load_checkpoint(tmp_path / "meta")
    assert from_hf.args.ffn_hidden_dim == tiny_model.args.ffn_hidden_dim
    assert_same_weights(from_hf, tiny_model)
    tokens = torch.tensor([[1, 7, 42, 3, 96, 5]])
    torch.testing.assert_close(from_hf(tokens), from_meta(tokens), atol=0, rtol=0)


def test_transformers_reads_our_hf_checkpoint(tiny_model: Transformer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    save_hf(tiny_model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.tensor([[1, 7, 42, 3, 96, 5, 11, 0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, tiny_model(tokens), atol=1e-5, rtol=1e-5)


class Exploit:
    def __reduce__(self) -> tuple:
        return os.system, (f"touch {Exploit.marker}",)

    marker = ""


def test_pickled_code_is_refused(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    Exploit.marker = str(tmp_path / "pwned")
    torch.save({"output.weight": Exploit()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_wrong_shape_names_the_tensor(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state["layers.1.feed_forward.w3.weight"] = torch.zeros(10, 64)
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w3\.weight has shape \(10, 64\)"):
        load_checkpoint(tmp_path)


def test_missing_files_are_named(tiny_model: Transformer, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither params.json"):
        load_checkpoint(tmp_path)
    save_meta(tiny_model, tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="consolidated.NN.pth"):
        load_checkpoint(tmp_path)


def test_sha256_covers_weights_and_params_only(tiny_model: Transformer, tmp_path: Path) -> None:
    save_meta(tiny_model, tmp_path)
    digest = sha256_of_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("not part of the checkpoint")
    assert sha256_of_checkpoint(tmp_path) == digest
    save_meta(tiny_model, tmp_path)  # rewriting the same weights keeps the hash
    assert sha256_of_checkpoint(tmp_path) == digest
    with torch.no_grad():
        tiny_model.norm.weight[0] += 1
    save_meta(tiny_model, tmp_path)
    assert sha256_of_checkpoint(tmp_path) != digest


def test_paths_outside_the_roots_are_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    (root / "llama-2-7b").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "escape").symlink_to(elsewhere)
    assert resolve_checkpoint_path(root / "llama-2-7b", [root]) == (root / "llama-2-7b").resolve()
    assert resolve_checkpoint_path("llama-2-7b", [root]) == (root / "llama-2-7b").resolve()
    for bad in [elsewhere, root / ".." / "elsewhere", "../elsewhere", root / "escape", "/etc"]:
        with pytest.raises(CheckpointError, match="outside the model roots"):
            resolve_checkpoint_path(bad, [root])
    with pytest.raises(CheckpointError, match="no model roots"):
        resolve_checkpoint_path(root, [])


def test_args_survive_a_non_default_rope_theta(tmp_path: Path) -> None:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=8, rope_theta=1e6, max_seq_len=32)
    model = Transformer(args)
    save_meta(model, tmp_path / "meta")
    save_hf(model, tmp_path / "hf")
    assert load_checkpoint(tmp_path / "meta", max_seq_len=32).args == args
    assert load_checkpoint(tmp_path / "hf").args.rope_theta == 1e6
