"""rewards.data: reading snapshots, the paper's mixes, tokenization and truncation, batching."""

import gzip
import json
import random

import pytest

from rewards.config import MixConfig
from rewards.data import (
    DataError,
    EncodedPair,
    InsufficientData,
    build_mix,
    collate,
    collate_packed,
    encode_pair,
    encode_pairs,
    encode_response,
    pad_fraction,
    plan_epochs,
    read_rows,
    shared_prefix,
    sort_key,
    tokens_per_pair,
    validate_row,
)
from tests.rewards import synthetic


@pytest.fixture
def rows():
    return synthetic.make_rows(400, seed=3, test_fraction=0.2, adversarial_fraction=0.5, imported_fraction=0.15)


# --- reading --------------------------------------------------------------------------------


def test_read_rows_gzip_and_plain(tmp_path, rows) -> None:
    gz = synthetic.write_snapshot(rows[:5], tmp_path / "snap.jsonl.gz")
    plain = tmp_path / "snap.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n\n")
    assert read_rows(gz) == rows[:5] == read_rows(plain)


def test_read_rows_names_the_bad_line(tmp_path, rows) -> None:
    path = tmp_path / "bad.jsonl.gz"
    bad = dict(rows[1])
    del bad["split"]
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2 .*missing split"):
        read_rows(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r":1: not JSON"):
        read_rows(path)


@pytest.mark.parametrize("change, message", [
    ({"prompt": "Human: hi\n\nAssistant: "}, "conversational"),
    ({"prompt": [{"role": "assistant", "content": "x"}]}, "roles"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "roles"),
    ({"chosen": [{"role": "user", "content": "x"}]}, "assistant message"),
    ({"strength": 5}, "strength"),
    ({"safety_bin": "maybe"}, "safety_bin"),
    ({"source": "web"}, "source"),
    ({"split": "dev"}, "split"),
    ({"is_adversarial": "no"}, "is_adversarial"),
    ({"id": "7"}, "id must be an integer"),
])
def test_validate_row_rejects(rows, change, message) -> None:
    with pytest.raises(DataError, match=message):
        validate_row({**rows[0], **change})


# --- mixes ----------------------------------------------------------------------------------


def _ids(rows):
    return {r["id"] for r in rows}


def test_helpfulness_mix_follows_the_paper(rows) -> None:
    mix = build_mix(rows, kind="helpfulness", seed=1)
    usable = [r for r in rows if r["safety_bin"] != "chosen_unsafe_other_safe"]
    train = [r for r in usable if r["split"] == "train"]
    core = [r for r in train if not r["is_adversarial"] and r["source"] != "imported"]
    pool = [r for r in train if r["is_adversarial"] or r["source"] == "imported"]
    m = mix.manifest
    assert set(m["parts"]["helpfulness"]) == _ids(core)
    sampled = set(m["parts"]["sampled_safety_and_imported"])
    assert len(sampled) == len(core) and sampled <= _ids(pool)  # an equal amount, from the rest
    assert _ids(mix.train) == _ids(core) | sampled and len(mix.train) == 2 * len(core)
    # Pairs with the unsafe response chosen over a safe one are out; test rows never train.
    assert not any(r["safety_bin"] == "chosen_unsafe_other_safe" for r in mix.train)
    assert m["excluded"]["chosen_unsafe_other_safe"] == sorted(
        r["id"] for r in rows if r["safety_bin"] == "chosen_unsafe_other_safe")
    assert not _ids(mix.train) & _ids(r for r in rows if r["split"] == "test")
    assert m["counts"]["train"] == len(mix.train) and m["counts"]["input_rows"] == len(rows)
    # A pool smaller than the helpfulness part is taken whole, and the manifest says what was wanted.
    few = [r for r in rows if not (r["is_adversarial"] and r["id"] % 3)]
    small = build_mix(few, kind="helpfulness", seed=1).manifest["counts"]
    assert small["train_sampled_safety_and_imported"] == small["train_sampled_from"] < small["train_sampled_wanted"]


def test_safety_mix_is_90_10(rows) -> None:
    mix = build_mix(rows, kind="safety", seed=1)
    safety = [r for r in mix.train if r["is_adversarial"]]
    helpful = [r for r in mix.train if not r["is_adversarial"]]
    expected_safety = [r for r in rows if r["is_adversarial"] and r["split"] == "train"
                       and r["safety_bin"] != "chosen_unsafe_other_safe"]
    assert _ids(safety) == _ids(expected_safety)  # all safety rows, imported harmless data included
    assert any(r["source"] == "imported" for r in safety)
    assert len(helpful) == round(len(safety) / 9)
    assert len(helpful) / len(mix.train) == pytest.approx(0.1, abs=0.01)


def test_mix_is_deterministic_and_order_free(rows) -> None:
    a = build_mix(rows, kind="helpfulness", seed=7)
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    b = build_mix(shuffled, kind="helpfulness", seed=7)
    assert a.manifest == b.manifest and [r["id"] for r in a.train] == [r["id"] for r in b.train]
    c = build_mix(rows, kind="helpfulness", seed=8)
    assert c.manifest["parts"]["sampled_safety_and_imported"] != a.manifest["parts"]["sampled_safety_and_imported"]
    assert c.manifest["sha256"] != a.manifest["sha256"]


def test_manifest_hash_covers_content_and_inputs(rows) -> None:
    base = build_mix(rows, kind="helpfulness", seed=0).manifest
    edited = [dict(r) for r in rows]
    edited[0]["chosen"] = [{"role": "assistant", "content": "something else"}]
    assert build_mix(edited, kind="helpfulness", seed=0).manifest["sha256"] != base["sha256"]
    assert build_mix(rows, kind="helpfulness", seed=0, input_hashes=["ab" * 32]).manifest["sha256"] != base["sha256"]
    assert len(base["sha256"]) == 64 and base["input_hashes"] == []


def test_test_sets_per_batch_source_and_kind(rows) -> None:
    sets = build_mix(rows, kind="helpfulness", seed=0).test_sets
    test = [r for r in rows if r["split"] == "test" and r["safety_bin"] != "chosen_unsafe_other_safe"]
    assert _ids(sets["all"]) == _ids(test)
    assert _ids(sets["batch:2024-W01"]) == _ids(r for r in test if r["batch"] == "2024-W01")
    assert _ids(sets["source:imported"]) == _ids(r for r in test if r["source"] == "imported")
    assert _ids(sets["kind:safety"]) == _ids(r for r in test if r["is_adversarial"])
    assert set(sets) == {"all", "batch:2024-W01", "batch:2024-W02", "kind:helpfulness", "kind:safety",
                         "source:human", "source:imported", "source:simulated"}


def test_too_little_data_is_a_clear_error(rows) -> None:
    with pytest.raises(InsufficientData, match="fewer than the minimum 1000"):
        build_mix(rows, kind="safety", seed=0, mix=MixConfig(min_train_pairs=1000))
    only_imported = [dict(r, source="imported", is_adversarial=False) for r in rows]
    with pytest.raises(InsufficientData, match="human or simulated helpfulness"):
        build_mix(only_imported, kind="helpfulness", seed=0)
    with pytest.raises(DataError, match="duplicate row ids"):
        build_mix(rows + rows[:1], kind="safety", seed=0)


# --- tokenization ---------------------------------------------------------------------------


def test_encode_response_is_the_policy_dialog_ending_with_eos(rm_tokenizer) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rain."}]
    ids, truncated = encode_response(rm_tokenizer, prompt, "river stone", 128)
    expected, mask = rm_tokenizer.encode_dialog_with_loss_mask(prompt + [{"role": "assistant", "content": "river stone"}])
    assert ids == expected and not truncated
    assert ids[0] == rm_tokenizer.bos_id and ids[-1] == rm_tokenizer.eos_id and mask[-1]


def test_truncation_drops_oldest_context_and_keeps_the_response_end(rm_tokenizer) -> None:
    rows = synthetic.make_rows(1, seed=5, context_turns=6)
    full, _ = encode_response(rm_tokenizer, rows[0]["prompt"], "river stone cloud", 10_000)
    ids, truncated = encode_response(rm_tokenizer, rows[0]["prompt"], "river stone cloud", 40)
    assert len(full) > 40 and truncated
    assert len(ids) == 40 and ids[0] == rm_tokenizer.bos_id and ids[1:] == full[-39:]
    # A pair loses the same context tokens from both sequences: as many as the longer one needs.
    pairs = encode_pairs(rm_tokenizer, rows, 40)
    chosen_full, _ = encode_response(rm_tokenizer, rows[0]["prompt"], rows[0]["chosen"][0]["content"], 10_000)
    rejected_full, _ = encode_response(rm_tokenizer, rows[0]["prompt"], rows[0]["rejected"][0]["content"], 10_000)
    cut = max(len(chosen_full), len(rejected_full)) - 40
    assert pairs[0].truncated == 2 and max(len(pairs[0].chosen), len(pairs[0].rejected)) == 40
    assert pairs[0].chosen == chosen_full[:1] + chosen_full[1 + cut:]
    assert pairs[0].rejected == rejected_full[:1] + rejected_full[1 + cut:]
    assert pairs[0].chosen[-1] == rm_tokenizer.eos_id
    assert pairs[0].shared == shared_prefix(chosen_full, rejected_full) - cut > 0
    # A response too long for its context to be shared falls back to cutting each sequence alone.
    long = encode_pair(rm_tokenizer, rows[0]["prompt"], "river " * 60, "stone", 40)
    assert long[0] == encode_response(rm_tokenizer, rows[0]["prompt"], "river " * 60, 40)[0]
    assert long[1] == encode_response(rm_tokenizer, rows[0]["prompt"], "stone", 40)[0] and long[2] == 2
    short_prompt = [{"role": "user", "content": "Hi?"}]
    long = encode_pair(rm_tokenizer, short_prompt, "river " * 60, "stone", 40)
    assert len(long[0]) == 40 and long[1] == encode_response(rm_tokenizer, short_prompt, "stone", 10_000)[0]
    assert long[2] == 1


# --- batching -------------------------------------------------------------------------------


def test_plan_covers_each_pair_once_per_epoch_and_drops_the_remainder() -> None:
    lengths = [random.Random(i).randint(5, 50) for i in range(103)]
    plan = plan_epochs(lengths, seed=0, micro_batch_size=4, micro_batches_per_step=3, epochs=2)
    assert len(plan) == 2 * (103 // 12)
    for epoch in (plan[:8], plan[8:]):
        seen = [i for step in epoch for micro in step for i in micro]
        assert len(seen) == len(set(seen)) == 96
    for step in plan:
        assert [len(m) for m in step] == [4, 4, 4]
        flat = [i for m in step for i in m]
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)  # bucketed within the step
    assert plan == plan_epochs(lengths, seed=0, micro_batch_size=4, micro_batches_per_step=3, epochs=2)
    assert plan != plan_epochs(lengths, seed=1, micro_batch_size=4, micro_batches_per_step=3, epochs=2)


def test_step_contents_do_not_depend_on_the_micro_batch_split() -> None:
    # 2 processes x accumulation 1 x micro 4 and 1 process x accumulation 2 x micro 4 (or micro 8) must
    # see the same pairs per optimizer step, or their weights could not agree.
    lengths = [random.Random(i).randint(5, 50) for i in range(64)]
    a = plan_epochs(lengths, seed=3, micro_batch_size=4, micro_batches_per_step=2)
    b = plan_epochs(lengths, seed=3, micro_batch_size=8, micro_batches_per_step=1)
    assert [sorted(i for m in s for i in m) for s in a] == [sorted(i for m in s for i in m) for s in b]


def test_bucketing_cuts_padding() -> None:
    rng = random.Random(0)
    # As in real pairs, both responses share their prompt, which makes most of the length.
    pairs = [EncodedPair(i, [1] + [5] * n + [6] * rng.randint(5, 30), [1] + [5] * n + [7] * rng.randint(5, 30), None,
                         0.0, 0) for i, n in enumerate(rng.randint(10, 200) for _ in range(256))]
    plan = plan_epochs([sort_key(p) for p in pairs], seed=0, micro_batch_size=8, micro_batches_per_step=16)
    # Without sorting: the same steps cut into micro-batches in shuffled order.
    unsorted = [[sorted([i for m in s for i in m], key=lambda i: rng.random())[j:j + 8]
                 for j in range(0, 128, 8)] for s in plan]
    assert pad_fraction(plan, pairs) < 0.6 * pad_fraction(unsorted, pairs)
    # By hand: pairs ([1 2 3], [1 2]) and ([1 2], [1 5 6 7]) share [1]; packed rows [1 2 3 2] and [1 2 5 6 7]
    # make a (2, 5) tensor: 9 real tokens in 10 slots.
    tiny = [EncodedPair(0, [1, 2, 3], [1, 2], None, 0.0, 0), EncodedPair(1, [1, 2], [1, 5, 6, 7], None, 0.0, 0)]
    assert [p.shared for p in tiny] == [1, 1] and pad_fraction([[[0, 1]]], tiny) == pytest.approx(1 / 10)
    # Unpacked, the same pairs are 4 rows padded to 4: 11 real tokens in 16 slots.
    assert pad_fraction([[[0, 1]]], tiny, packed=False) == pytest.approx(5 / 16)
    assert tokens_per_pair(tiny) == {"shared_prefix_once": 4.5, "two_full_sequences": 5.5}


def test_shared_prefix_split(rm_tokenizer) -> None:
    assert shared_prefix([1, 2, 3], [1, 2, 3]) == 2  # each keeps its last token, where the reward is read
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9]) == 2 and shared_prefix([1], [1, 2]) == 0
    pairs = [EncodedPair(0, [1, 7, 8, 2], [1, 7, 2], None, 0.0, 0), EncodedPair(1, [1, 2], [1, 5, 5, 5, 2], None, 0.0, 0)]
    tokens, lengths = collate_packed(pairs, pad_id=0)
    # [shared prefix | chosen rest | rejected rest], right-padded
    assert tokens.tolist() == [[1, 7, 8, 2, 2, 0], [1, 2, 5, 5, 5, 2]]
    assert lengths.tolist() == [[2, 2, 1], [1, 1, 4]]
    with pytest.raises(ValueError, match="shared"):
        collate_packed([EncodedPair(0, [1], [1, 2], None, 0.0, 0)], pad_id=0)


def test_collate_right_pads_chosen_then_rejected() -> None:
    pairs = [EncodedPair(0, [1, 7, 2], [1, 2], None, 0.0, 0), EncodedPair(1, [1, 2], [1, 8, 9, 2], None, 0.0, 0)]
    tokens, lengths = collate(pairs, pad_id=0)
    assert tokens.tolist() == [[1, 7, 2, 0], [1, 2, 0, 0], [1, 2, 0, 0], [1, 8, 9, 2]]
    assert lengths.tolist() == [3, 2, 2, 4]
