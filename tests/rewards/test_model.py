"""rewards.model: the scalar head read at the last real token, policy initialisation, save / load, scoring."""

import json

import pytest
import torch

from policy.checkpoints import load_checkpoint
from rewards.data import collate, collate_packed, encode_pairs
from rewards.model import (
    RewardModel,
    RewardModelError,
    load_manifest,
    load_reward_model,
    rewards_of,
    save_reward_model,
    score,
    score_batch,
)
from tests.rewards import synthetic


@pytest.fixture
def model(rm_tokenizer) -> RewardModel:
    torch.manual_seed(0)
    m = RewardModel(synthetic.tiny_args(rm_tokenizer.n_words)).eval()
    with torch.no_grad():
        m.head.bias.fill_(0.3)  # a non-zero bias, so losing it on a round trip would show
    return m


def test_reward_is_the_head_on_the_last_real_token(model) -> None:
    torch.manual_seed(1)
    seqs = [torch.randint(3, 300, (n,)) for n in (9, 4, 13)]
    tokens = torch.zeros(3, 13, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lengths = torch.tensor([9, 4, 13])
    with torch.no_grad():
        rewards = model(tokens, lengths)
        # By hand: the backbone's hidden state at position len - 1 of each sequence alone, times the head.
        for i, s in enumerate(seqs):
            h = model.backbone.hidden_states(s[None])[0, -1]
            assert rewards[i].item() == pytest.approx((h @ model.head.weight[0] + model.head.bias[0]).item(), abs=1e-5)
        # Whatever the padding holds, and whatever follows a row's end, the reward stays.
        garbage = tokens.clone()
        garbage[0, 9:] = 17
        garbage[1, 4:] = 250
        torch.testing.assert_close(model(garbage, lengths), rewards, atol=1e-5, rtol=0)
        changed = tokens.clone()
        changed[1, 2] = (changed[1, 2] + 1) % 300
        assert model(changed, lengths)[1].item() != pytest.approx(rewards[1].item(), abs=1e-6)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    with pytest.raises(ValueError, match="lengths"):
        model(tokens, torch.tensor([0, 4, 13]))
    with pytest.raises(ValueError, match="lengths"):
        model(tokens, torch.tensor([14, 4, 13]))


def test_packed_pairs_equal_two_full_sequences(model, rm_tokenizer) -> None:
    rows = synthetic.make_rows(6, seed=8, context_turns=1)
    pairs = encode_pairs(rm_tokenizer, rows, 128)
    assert all(p.shared > 10 for p in pairs)  # the dialogue prefix is shared
    model.train()
    tokens, lengths = collate_packed(pairs, rm_tokenizer.pad_id)
    packed = model(tokens, lengths)  # (12,): chosen rewards, then rejected
    weights = torch.randn(12, generator=torch.Generator().manual_seed(0))
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_tokens, full_lengths = collate(pairs, rm_tokenizer.pad_id)
    full = model(full_tokens, full_lengths)
    (full * weights).sum().backward()
    # Same rewards and the same gradients: packing is exact, not an approximation.
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    # And against the policy's own forward, sequence by sequence.
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for j, seq in ((i, p.chosen), (i + 6, p.rejected)):
                h = model.backbone.hidden_states(torch.tensor([seq]))[0, -1]
                assert packed[j].item() == pytest.approx((h @ model.head.weight[0] + model.head.bias[0]).item(), abs=1e-5)
    with pytest.raises(ValueError, match="packed lengths"):
        model(tokens, torch.zeros(6, 3, dtype=torch.long))


def test_from_policy_keeps_the_backbone_and_drops_the_lm_head(rm_policy_dir) -> None:
    policy = load_checkpoint(rm_policy_dir)
    rm = RewardModel.from_policy(rm_policy_dir, generator=torch.Generator().manual_seed(0))
    names = set(rm.state_dict())
    assert "head.weight" in names and "head.bias" in names
    assert not any(n.endswith("output.weight") for n in names)
    for name, tensor in policy.state_dict().items():
        if name != "output.weight":
            assert torch.equal(rm.state_dict()[f"backbone.{name}"], tensor), name
    tokens = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(rm.backbone.hidden_states(tokens), policy.hidden_states(tokens))
    # The head is drawn from the generator: same seed, same head.
    again = RewardModel.from_policy(rm_policy_dir, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.head.weight, rm.head.weight) and rm.head.weight.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path, model, rm_tokenizer_path) -> None:
    manifest = {"sha256": "ab" * 32, "parts": {"helpfulness": [1, 2, 3]}}
    out = save_reward_model(model, tmp_path / "rm", manifest=manifest, tokenizer_path=rm_tokenizer_path,
                            extra_json={"metrics.json": {"accuracy": 0.9}})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "data_manifest.json", "metrics.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["dim"] == 64 and config["head"]["out_features"] == 1 and config["head"]["bias"]
    assert load_manifest(out) == manifest
    loaded = load_reward_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens, lengths = torch.randint(3, 300, (2, 6)), torch.tensor([6, 3])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, lengths), model(tokens, lengths))


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path, model) -> None:
    save_reward_model(model, tmp_path / "rm")
    with torch.no_grad():
        model.head.bias.fill_(-2.0)
    save_reward_model(model, tmp_path / "rm")
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]
    assert load_reward_model(tmp_path / "rm").head.bias.item() == -2.0

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom

    # A failure while writing leaves the old model whole and no temporary folder behind.
    import safetensors.torch

    original = safetensors.torch.save_file
    safetensors.torch.save_file = fail
    try:
        with pytest.raises(Boom):
            save_reward_model(model, tmp_path / "rm")
    finally:
        safetensors.torch.save_file = original
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]
    assert load_reward_model(tmp_path / "rm").head.bias.item() == -2.0


def test_load_refuses_what_is_not_a_reward_model(tmp_path, model, rm_policy_dir) -> None:
    with pytest.raises(RewardModelError, match="not a reward model folder"):
        load_reward_model(rm_policy_dir)
    out = save_reward_model(model, tmp_path / "rm")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format": "something"}))
    with pytest.raises(RewardModelError, match="format"):
        load_reward_model(out)
    config["model_args"]["dim"] = 128
    config["model_args"]["n_heads"] = 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardModelError, match="shape"):
        load_reward_model(out)


def test_score_and_score_batch_agree_in_any_batching(model, rm_tokenizer) -> None:
    rows = synthetic.make_rows(7, seed=2, context_turns=1, max_words=6)
    prompts = [r["prompt"] for r in rows]
    responses = [r["chosen"][0]["content"] for r in rows]
    batched = score_batch(model, rm_tokenizer, prompts, responses, batch_size=3)
    one_by_one = [score(model, rm_tokenizer, p, r) for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(b, 6) for b in batched)) == 7
    ids = rm_tokenizer.encode_dialog_with_loss_mask(prompts[0] + [{"role": "assistant", "content": responses[0]}])[0]
    assert rewards_of(model, [ids], pad_id=rm_tokenizer.pad_id) == pytest.approx([one_by_one[0]], abs=1e-6)
    assert model.training is False
    with pytest.raises(ValueError):
        score_batch(model, rm_tokenizer, prompts, responses[:-1])
