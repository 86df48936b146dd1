"""Preference rows for the twin reward models: reading, the paper's data mixes, tokenization, batching.

Rows are plain dicts in the export schema (annotation/exports.py, conversational form):

    {"id", "comparison_id", "prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant", ...}],
     "rejected": [...], "margin", "strength": 0..3 | None, "safety_bin", "chosen_safe", "rejected_safe",
     "is_adversarial", "source": "human" | "simulated" | "imported", "origin", "batch", "split": "train" | "test",
     "annotator", "chosen_checkpoint", "rejected_checkpoint"}

The mixes (Llama 2, section 3.2.2). "Helpfulness rows" are those whose prompt is not adversarial,
"safety rows" those whose prompt is (imported HH-RLHF harmless-base data is adversarial by import).

- Helpfulness RM: every helpfulness row annotated here (human / simulated) + as many rows again
  (``other_ratio`` 1.0), sampled uniformly from the safety rows and the imported open data.
- Safety RM: every safety row (imported harmlessness data included) + helpfulness rows sampled so
  that they make up ``helpfulness_fraction`` (10%) of the final mix: the paper's 90/10.

Pairs whose chosen response is unsafe and the other safe are left out everywhere, training and test
(the paper: a safer response is also the one people should prefer, so such labels contradict it).
split == "test" rows never train; they form the test sets, grouped per batch, source and kind.

Everything is a pure function of the rows and the seed: input order does not matter (rows are
sorted by id first), and the manifest lists every id that went in, with a hash over all of it.

Tokenization: the prompt messages plus the response as the final assistant turn, exactly as the
policy sees a finished dialogue (``Tokenizer.encode_dialog_with_loss_mask``: BOS [INST] ... [/INST]
answer EOS per exchange), so the sequence ends with EOS, where the reward is read. Truncation
policy for sequences longer than ``max_seq_len``: tokens are dropped from the LEFT (oldest context
first) and the leading BOS is kept; the response's end, whose hidden state the reward reads, is
always kept. The two responses of a pair are truncated together (the same context tokens dropped
from both, as many as the longer needs), so they are compared against the same context; a single
response scored alone (``encode_response``) loses just what it needs. Truncated sequences are
counted so a report can show how many there were.

Packing: both sequences of a pair begin with the same tokens (the whole dialogue up to the answer,
often most of the length). Training packs a pair into one row, [shared prefix | chosen rest |
rejected rest], and RewardModel's packed mode masks and positions it so both rewards are exactly
those of the two full sequences, for one prefix's work.

Batching: each optimizer step's pairs are a uniform random slice of the shuffled epoch; only within
a step are they sorted by packed length and cut into micro-batches, so rows of similar length share
a padded tensor (little padding) while what a step learns from is unchanged (the loss is summed
over the step's pairs, whatever their grouping).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rewards.config import KINDS, MixConfig

SAFETY_BINS = ("chosen_safe_other_unsafe", "both_safe", "both_unsafe", "chosen_unsafe_other_safe")
UNSAFE_CHOSEN = "chosen_unsafe_other_safe"
SOURCES = ("human", "simulated", "imported")
REQUIRED_KEYS = ("id", "prompt", "chosen", "rejected", "strength", "safety_bin", "is_adversarial", "source",
                 "split", "batch")
MANIFEST_SCHEMA = 1


class DataError(ValueError):
    """Rows that cannot be used: a missing key, a wrong type, a malformed dialogue, a duplicate id."""


class InsufficientData(DataError):
    """Too few pairs to train on."""


# --- reading and validating ------------------------------------------------------------------


def read_rows(path: str | os.PathLike[str]) -> list[dict]:
    """Rows of a snapshot file: JSON lines, gzip-compressed or not (told by the magic bytes)."""
    path = Path(path)
    with path.open("rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not JSON ({error.msg})") from None
            validate_row(row, where=f"{path}:{line_no}")
            rows.append(row)
    return rows


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def response_text(messages: Any, where: str = "") -> str:
    """The text of a chosen / rejected field: one assistant message (a bare string is accepted too)."""
    if isinstance(messages, str):
        return messages
    if (not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping)
            or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str)):
        raise DataError(f"{where}: a response must be a list ending with an assistant message")
    return messages[-1]["content"]


def validate_row(row: Any, where: str = "row") -> None:
    """Raise DataError naming the place and the field unless row follows the export schema."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be a JSON object")
    where = f"{where} (id {row.get('id')!r})"
    if missing := [k for k in REQUIRED_KEYS if k not in row]:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(row["id"], int) or isinstance(row["id"], bool):
        raise DataError(f"{where}: id must be an integer")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        raise DataError(f"{where}: prompt is text; export the conversational form (a list of messages)")
    if not isinstance(prompt, list) or not prompt or not all(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in prompt
    ):
        raise DataError(f"{where}: prompt must be a non-empty list of {{role, content}} messages")
    roles = [m.get("role") for m in prompt]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)) or body[-1] != "user":
        raise DataError(f"{where}: prompt roles must be [system], user, assistant, ..., user; got {roles}")
    response_text(row["chosen"], f"{where}: chosen")
    response_text(row["rejected"], f"{where}: rejected")
    if row["strength"] is not None and row["strength"] not in (0, 1, 2, 3):
        raise DataError(f"{where}: strength must be 0..3 or null")
    if row["safety_bin"] is not None and row["safety_bin"] not in SAFETY_BINS:
        raise DataError(f"{where}: safety_bin must be one of {', '.join(SAFETY_BINS)} or null")
    if not isinstance(row["is_adversarial"], bool):
        raise DataError(f"{where}: is_adversarial must be true or false")
    if row["source"] not in SOURCES:
        raise DataError(f"{where}: source must be one of {', '.join(SOURCES)}")
    if row["split"] not in ("train", "test"):
        raise DataError(f"{where}: split must be 'train' or 'test'")
    if not isinstance(row.get("margin", 0.0), (int, float)):
        raise DataError(f"{where}: margin must be a number")


# --- the mixes -------------------------------------------------------------------------------


@dataclass
class Mix:
    """A twin's training rows, its test sets, and the manifest saying exactly what went in."""

    train: list[dict]
    test_sets: dict[str, list[dict]]
    manifest: dict[str, Any]


def build_mix(
    rows: Iterable[Mapping],
    *,
    kind: str,
    seed: int,
    mix: MixConfig | None = None,
    input_hashes: Sequence[str] = (),
) -> Mix:
    """The paper's mix for the helpfulness or safety RM (see the module docstring), deterministic for seed.

    input_hashes: content hashes of where the rows came from (snapshot files), folded into the manifest's
    sha256 along with the ids and the rows' own content hash.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    mix = mix or MixConfig()
    rows = list(rows)
    for i, row in enumerate(rows):
        validate_row(row, where=f"row {i}")
    rows.sort(key=lambda r: r["id"])
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"duplicate row ids: {dupes}")

    excluded = [r for r in rows if mix.exclude_unsafe_chosen and r["safety_bin"] == UNSAFE_CHOSEN]
    kept = [r for r in rows if not (mix.exclude_unsafe_chosen and r["safety_bin"] == UNSAFE_CHOSEN)]
    train_pool = [r for r in kept if r["split"] == "train"]
    test_rows = [r for r in kept if r["split"] == "test"]
    helpful = [r for r in train_pool if not r["is_adversarial"]]
    safety = [r for r in train_pool if r["is_adversarial"]]

    # One generator per (kind, seed): the helpfulness and safety mixes of one seed sample independently.
    rng = random.Random(f"rewards.mix:{kind}:{seed}")
    if kind == "helpfulness":
        core = [r for r in helpful if r["source"] != "imported"]
        pool = safety + [r for r in helpful if r["source"] == "imported"]
        pool.sort(key=lambda r: r["id"])
        wanted = round(len(core) * mix.other_ratio)
        sampled = rng.sample(pool, min(len(pool), wanted))  # all of the pool when it is smaller than wanted
        parts = {"helpfulness": core, "sampled_safety_and_imported": sampled}
        if not core:
            raise InsufficientData(
                f"the helpfulness mix needs human or simulated helpfulness pairs; the {len(rows)} rows have none "
                "(imported data only joins the mix as the sampled part)"
            )
    else:
        core = safety
        # Helpfulness rows make up the fraction f of the final mix: n_help = f / (1 - f) * n_safety.
        wanted = round(len(core) * mix.helpfulness_fraction / (1 - mix.helpfulness_fraction))
        sampled = rng.sample(helpful, min(len(helpful), wanted))
        parts = {"safety": core, "sampled_helpfulness": sampled}
    train = sorted((r for part in parts.values() for r in part), key=lambda r: r["id"])
    if len(train) < mix.min_train_pairs:
        counts = ", ".join(f"{name} {len(part)}" for name, part in parts.items())
        raise InsufficientData(
            f"{kind} reward model: {len(train)} training pairs ({counts}), fewer than the minimum "
            f"{mix.min_train_pairs}; {len(test_rows)} test pairs and {len(excluded)} excluded pairs are not counted"
        )
    sets = group_test_sets(test_rows)

    used = sorted(train + test_rows, key=lambda r: r["id"])
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "seed": seed,
        "mix": asdict(mix),
        "counts": {
            "input_rows": len(rows),
            "train": len(train),
            **{f"train_{name}": len(part) for name, part in parts.items()},
            "train_sampled_wanted": wanted,
            "train_sampled_from": len(pool) if kind == "helpfulness" else len(helpful),
            "test": len(test_rows),
            "excluded_unsafe_chosen": len(excluded),
        },
        "parts": {name: sorted(r["id"] for r in part) for name, part in parts.items()},
        "test_sets": {name: [r["id"] for r in set_rows] for name, set_rows in sets.items()},
        "excluded": {UNSAFE_CHOSEN: [r["id"] for r in excluded]},
        "input_hashes": sorted(input_hashes),
        "rows_sha256": rows_sha256(used),
    }
    manifest["sha256"] = manifest_sha256(manifest)
    return Mix(train=train, test_sets=sets, manifest=manifest)


def group_test_sets(test_rows: Sequence[Mapping]) -> dict[str, list[dict]]:
    """Test rows as named sets: "all", "kind:helpfulness" / "kind:safety", "batch:<label>", "source:<source>"."""
    sets: dict[str, list[dict]] = {}
    if test_rows:
        sets["all"] = list(test_rows)
    for row in test_rows:
        sets.setdefault(f"kind:{'safety' if row['is_adversarial'] else 'helpfulness'}", []).append(row)
        sets.setdefault(f"batch:{row['batch']}", []).append(row)
        sets.setdefault(f"source:{row['source']}", []).append(row)
    return dict(sorted(sets.items()))


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rows_sha256(rows: Iterable[Mapping]) -> str:
    """A hash of the rows' full content, in id order: same ids with edited text give another hash."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["id"]):
        blob = _canonical(row)
        digest.update(len(blob).to_bytes(8, "little") + blob)  # length-framed: row boundaries are unambiguous
    return digest.hexdigest()


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """sha256 over everything in the manifest that decides the data: kind, seed, mix, every id, input hashes."""
    keyed = {k: manifest[k] for k in ("kind", "seed", "mix", "parts", "test_sets", "excluded", "input_hashes",
                                      "rows_sha256")}
    return hashlib.sha256(_canonical(keyed)).hexdigest()


# --- tokenization ---------------------------------------------------------------------------


def encode_response(tokenizer, prompt: Sequence[Mapping[str, str]], response: str, max_seq_len: int) -> tuple[list[int], bool]:
    """Ids of prompt + response as the final assistant turn (ends with EOS), left-truncated to max_seq_len.

    Returns (ids, truncated). See the module docstring for the truncation policy.
    """
    ids = _dialog_ids(tokenizer, prompt, response)
    if len(ids) <= max_seq_len:
        return ids, False
    return _cut(ids, len(ids) - max_seq_len), True


def _dialog_ids(tokenizer, prompt: Sequence[Mapping[str, str]], response: str) -> list[int]:
    ids, _ = tokenizer.encode_dialog_with_loss_mask([*prompt, {"role": "assistant", "content": response}])
    return ids


def _cut(ids: list[int], n: int) -> list[int]:
    """Drop n tokens after the leading BOS: the oldest context goes first, BOS stays in front."""
    return ids[:1] + ids[1 + n:]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of a and b, leaving each at least its last token (where the reward is read)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, prompt: Sequence[Mapping[str, str]], chosen: str, rejected: str,
                max_seq_len: int) -> tuple[list[int], list[int], int]:
    """Ids of both responses to one prompt, truncated together: (chosen, rejected, sequences truncated).

    When the longer one exceeds max_seq_len, the same oldest context tokens are dropped from both, so
    the two responses are still compared against one and the same (shortened) context, and their
    common prefix stays common. A single response longer than the budget with its shared context
    falls back to per-sequence truncation (encode_response's rule).
    """
    c, r = _dialog_ids(tokenizer, prompt, chosen), _dialog_ids(tokenizer, prompt, rejected)
    excess = max(len(c), len(r)) - max_seq_len
    if excess <= 0:
        return c, r, 0
    if 1 + excess <= shared_prefix(c, r):  # the dropped tokens lie inside the shared context
        return _cut(c, excess), _cut(r, excess), 2
    cut_c, cut_r = len(c) > max_seq_len, len(r) > max_seq_len
    return (_cut(c, len(c) - max_seq_len) if cut_c else c), (_cut(r, len(r) - max_seq_len) if cut_r else r), cut_c + cut_r


@dataclass
class EncodedPair:
    id: int
    chosen: list[int]
    rejected: list[int]
    strength: int | None
    row_margin: float
    truncated: int  # how many of the two sequences lost tokens
    shared: int = 0  # tokens both sequences begin with (shared_prefix): computed once for them

    def __post_init__(self) -> None:
        if not self.shared:
            self.shared = shared_prefix(self.chosen, self.rejected)

    @property
    def length(self) -> int:
        """Longest of the two sequences."""
        return max(len(self.chosen), len(self.rejected))


def encode_pairs(tokenizer, rows: Sequence[Mapping], max_seq_len: int) -> list[EncodedPair]:
    pairs = []
    for row in rows:
        chosen, rejected, truncated = encode_pair(tokenizer, row["prompt"], response_text(row["chosen"]),
                                                  response_text(row["rejected"]), max_seq_len)
        pairs.append(EncodedPair(row["id"], chosen, rejected, row["strength"], float(row.get("margin", 0.0)), truncated))
    return pairs


# --- batching --------------------------------------------------------------------------------


def plan_epochs(
    lengths: Sequence[int], *, seed: int, micro_batch_size: int, micro_batches_per_step: int, epochs: int = 1
) -> list[list[list[int]]]:
    """The whole run's data order: steps -> micro-batches -> pair indices, a pure function of its inputs.

    Each epoch shuffles all pairs (seeded by seed and epoch) and cuts them into steps of
    micro_batch_size * micro_batches_per_step pairs; the remainder that does not fill a step is
    dropped for that epoch (a partial step would weight its pairs differently). Within a step, pairs
    are sorted by `lengths` and cut into micro-batches. With micro_batches_per_step =
    grad_accum_steps * world_size, process r of a step takes micro-batches r, r + world, ...
    """
    step_size = micro_batch_size * micro_batches_per_step
    plan: list[list[list[int]]] = []
    for epoch in range(epochs):
        order = list(range(len(lengths)))
        random.Random(f"rewards.order:{seed}:{epoch}").shuffle(order)
        for start in range(0, len(order) - step_size + 1, step_size):
            step = sorted(order[start:start + step_size], key=lambda i: (lengths[i], i))
            plan.append([step[j:j + micro_batch_size] for j in range(0, step_size, micro_batch_size)])
    return plan


def sort_key(pair: EncodedPair) -> int:
    """The packed length of a pair (collate_packed): shared prefix once plus both continuations."""
    return len(pair.chosen) + len(pair.rejected) - pair.shared


def plan_sha256(plan: Sequence[Sequence[Sequence[int]]], pair_ids: Sequence[int]) -> str:
    """A hash of the data order by row id: a resumed run must see the very same order."""
    return hashlib.sha256(_canonical([[[pair_ids[i] for i in micro] for micro in step] for step in plan])).hexdigest()


def collate(pairs: Sequence[EncodedPair], pad_id: int):
    """Full sequences: tokens (2B, T) right-padded with pad_id (chosen rows first, then rejected), lengths (2B,)."""
    import torch  # here, so that the data functions above stay importable without torch

    return _pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, torch)


def collate_packed(pairs: Sequence[EncodedPair], pad_id: int):
    """One row per pair for RewardModel's packed mode: [shared prefix | chosen rest | rejected rest],
    right-padded with pad_id: tokens (B, T) and lengths (B, 3) of the three parts."""
    import torch

    if any(p.shared < 1 for p in pairs):
        raise ValueError("every pair needs a shared prefix of at least one token (both sequences start with BOS)")
    tokens, _ = _pad([p.chosen + p.rejected[p.shared:] for p in pairs], pad_id, torch)
    lengths = torch.tensor([[p.shared, len(p.chosen) - p.shared, len(p.rejected) - p.shared] for p in pairs],
                           dtype=torch.long)
    return tokens, lengths


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, torch):
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths


def pad_fraction(plan: Sequence[Sequence[Sequence[int]]], pairs: Sequence[EncodedPair], packed: bool = True) -> float:
    """Share of the token slots in the planned tensors that hold padding: packed (B, T) rows
    (collate_packed), or chosen and rejected as (2B, T) rows (collate)."""
    real = slots = 0
    for step in plan:
        for micro in step:
            batch = [pairs[i] for i in micro]
            if packed:
                lengths = [sort_key(p) for p in batch]
                real += sum(lengths)
                slots += len(lengths) * max(lengths)
            else:
                real += sum(len(p.chosen) + len(p.rejected) for p in batch)
                slots += 2 * len(batch) * max(p.length for p in batch)
    return 1 - real / slots if slots else 0.0


def tokens_per_pair(pairs: Sequence[EncodedPair]) -> dict[str, float]:
    """Mean real tokens per pair run through the model: with the shared prefix once, and as two sequences."""
    if not pairs:
        return {"shared_prefix_once": 0.0, "two_full_sequences": 0.0}
    return {
        "shared_prefix_once": sum(len(p.chosen) + len(p.rejected) - p.shared for p in pairs) / len(pairs),
        "two_full_sequences": sum(len(p.chosen) + len(p.rejected) for p in pairs) / len(pairs),
    }
