"""Preference rows for TRL / Hugging Face datasets, built and streamed without holding them in memory.

One row per judgment (or, with aggregate="majority", one per comparison), in the shape TRL's
RewardTrainer and `datasets.load_dataset("json")` read as they are:

    {"id", "comparison_id", "prompt", "chosen", "rejected", "margin", "strength", "safety_bin",
     "chosen_safe", "rejected_safe", "is_adversarial", "source", "origin", "batch", "split",
     "annotator", "chosen_checkpoint", "rejected_checkpoint"}

Conversational (default): prompt = [system?] + the context turns + the final user message, as
{"role", "content"} messages; chosen / rejected = [{"role": "assistant", "content": ...}].
Text: prompt is the dialogue rendered as an Anthropic-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ")
ending in "Assistant: ", and chosen / rejected are the response texts exactly, so prompt + chosen is
the whole dialogue (for HH-RLHF imports: byte-for-byte the original "chosen" string).

Margins (Llama 2, section 3.2.2) by strength 3/2/1/0: "small" 1, 2/3, 1/3, 0; "large" 3, 2, 1, 0;
"none" 0 everywhere (the default: plain Bradley-Terry, TRL's own default). Imported judgments have
no strength: strength null and margin 0.

Pairs whose chosen response is unsafe while the other is safe are left out (the paper's rule)
unless include_unsafe_chosen. "annotator" is a pseudonym: HMAC-SHA256(SECRET_KEY, user id),
stable for a deployment and not reversible without the key.
"""
import hashlib
import hmac
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby

import orjson
from django.conf import settings
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast

from .models import Judgment, SafetyBin, safety_bin_for

SCHEMA_VERSION = 1
MARGINS = {
    "small": {3: 1.0, 2: 2 / 3, 1: 1 / 3, 0: 0.0},
    "large": {3: 3.0, 2: 2.0, 1: 1.0, 0: 0.0},
    "none": {3: 0.0, 2: 0.0, 1: 0.0, 0: 0.0},
}
ROW_FIELDS = (
    "id", "comparison_id", "prompt", "chosen", "rejected", "margin", "strength", "safety_bin", "chosen_safe",
    "rejected_safe", "is_adversarial", "source", "origin", "batch", "split", "annotator", "chosen_checkpoint",
    "rejected_checkpoint",
)
AGGREGATE_FIELDS = ROW_FIELDS + ("n_judgments", "n_majority")
_EMPTY: list = []  # shared, never mutated
ITERATOR_CHUNK = 5000  # rows per server-side cursor fetch
STREAM_CHUNK_BYTES = 256 * 1024  # bytes per yielded HTTP chunk

# What one row needs, as flat values (no model instances: several times faster for big exports).
_COLUMNS = (
    "id", "comparison_id", "chosen", "strength", "a_safe", "b_safe", "safety_bin", "source", "annotator_id",
    "comparison__origin", "comparison__is_test", "comparison__batch__label",
    "comparison__prompt__text", "context_json", "comparison__prompt__system_prompt",
    "comparison__prompt__is_adversarial",
    "comparison__response_a__text", "comparison__response_b__text",
    "comparison__response_a__checkpoint__name", "comparison__response_b__checkpoint__name",
)


@dataclass(frozen=True)
class ExportOptions:
    conversational: bool = True  # False: prompt / chosen / rejected as plain strings
    margin: str = "none"  # "small" | "large" | "none"
    include_unsafe_chosen: bool = False  # keep pairs whose chosen response is unsafe and the other safe
    aggregate: str = "none"  # "none": a row per judgment; "majority": a row per comparison

    def __post_init__(self):
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {', '.join(MARGINS)}")
        if self.aggregate not in ("none", "majority"):
            raise ValueError("aggregate must be 'none' or 'majority'")


def annotator_pseudonym(user_id: int | None) -> str | None:
    if user_id is None:
        return None
    digest = hmac.new(settings.SECRET_KEY.encode(), f"annotator:{user_id}".encode(), hashlib.sha256)
    return "ann-" + digest.hexdigest()[:16]


class _Pseudonyms(dict):
    """user id -> pseudonym, computed once per id within one export."""

    def __missing__(self, user_id):
        self[user_id] = value = annotator_pseudonym(user_id)
        return value


def render_transcript(*, system: str, context: list[dict], text: str) -> str:
    """The dialogue up to the answer, Anthropic-style: prompt + response is the whole transcript."""
    parts = [f"\n\nSystem: {system}"] if system else []
    parts += [f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in context]
    parts.append(f"\n\nHuman: {text}\n\nAssistant: ")
    return "".join(parts)


def prompt_messages(*, system: str, context: list[dict], text: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": t["role"], "content": t["content"]} for t in context]
    messages.append({"role": "user", "content": text})
    return messages


def exportable_judgments(*, source: str | None = None) -> QuerySet[Judgment]:
    """What an export starts from before its filters: simulated judgments (annotation.simulator) only
    when `source` asks for a source, so that a default export is never people mixed with a simulation."""
    judgments = Judgment.objects.all()
    return judgments if source else judgments.exclude(source=Judgment.Source.SIMULATED)


def export_queryset(judgments: QuerySet[Judgment], *, options: ExportOptions) -> QuerySet:
    """Flat value tuples in export order; the unsafe-chosen rule is applied here unless aggregating
    (a majority row is judged on its aggregated labels, after the vote)."""
    if not options.include_unsafe_chosen and options.aggregate == "none":
        judgments = judgments.exclude(safety_bin=SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE)
    order = ("comparison_id", "id") if options.aggregate == "majority" else ("id",)
    # The context comes as JSON text, parsed by orjson in _row: Django's JSONField would json.loads
    # every row (a third of the export's time), and most contexts are "[]".
    return (judgments.annotate(context_json=Cast("comparison__prompt__context", TextField()))
            .order_by(*order).values_list(*_COLUMNS))


def export_rows(judgments: QuerySet[Judgment], *, options: ExportOptions) -> Iterator[dict]:
    values = export_queryset(judgments, options=options).iterator(chunk_size=ITERATOR_CHUNK)
    if options.aggregate == "majority":
        return _majority_rows(values, options)
    return _judgment_rows(values, options)


def _judgment_rows(values: Iterable[tuple], options: ExportOptions) -> Iterator[dict]:
    margins = MARGINS[options.margin]
    pseudonyms = _Pseudonyms()
    for value in values:
        yield _row(value, margins=margins, conversational=options.conversational, pseudonyms=pseudonyms)


def _row(value: tuple, *, margins: dict, conversational: bool, pseudonyms: _Pseudonyms) -> dict:
    (jid, cid, chosen, strength, a_safe, b_safe, safety_bin, source, annotator_id, origin, is_test, batch,
     text, context, system, adversarial, a_text, b_text, a_ckpt, b_ckpt) = value
    context = _EMPTY if context == "[]" else orjson.loads(context)
    if chosen == "A":
        chosen_text, rejected_text, chosen_ckpt, rejected_ckpt, chosen_safe, rejected_safe = (
            a_text, b_text, a_ckpt, b_ckpt, a_safe, b_safe)
    else:
        chosen_text, rejected_text, chosen_ckpt, rejected_ckpt, chosen_safe, rejected_safe = (
            b_text, a_text, b_ckpt, a_ckpt, b_safe, a_safe)
    if conversational:
        prompt = prompt_messages(system=system, context=context, text=text)
        chosen_out = [{"role": "assistant", "content": chosen_text}]
        rejected_out = [{"role": "assistant", "content": rejected_text}]
    else:
        prompt, chosen_out, rejected_out = render_transcript(system=system, context=context, text=text), \
            chosen_text, rejected_text
    return {
        "id": jid, "comparison_id": cid, "prompt": prompt, "chosen": chosen_out, "rejected": rejected_out,
        "margin": 0.0 if strength is None else margins[strength], "strength": strength,
        "safety_bin": safety_bin or None, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe,
        "is_adversarial": adversarial, "source": source, "origin": origin, "batch": batch,
        "split": "test" if is_test else "train", "annotator": pseudonyms[annotator_id],
        "chosen_checkpoint": chosen_ckpt, "rejected_checkpoint": rejected_ckpt,
    }


def _majority_label(labels: list[bool]) -> bool | None:
    """Safe only if more than half of the labels say so (a tie reads as unsafe: the cautious side)."""
    if not labels:
        return None
    return sum(labels) * 2 > len(labels)


def _majority_rows(values: Iterable[tuple], options: ExportOptions) -> Iterator[dict]:
    """One row per comparison: the side most judgments chose.

    Ties in the number of votes go to the side with the larger summed strength (unknown strength
    counts 0); a comparison still tied has no majority and is left out. strength = the lower median
    of the majority's known strengths; each response is safe if most of the majority's labels say
    so; the row's safety bin and the unsafe-chosen rule follow from those aggregated labels. The
    row's id is the first majority judgment's; annotator is null.
    """
    margins = MARGINS[options.margin]
    pseudonyms = _Pseudonyms()
    for _, group in groupby(values, key=lambda v: v[1]):  # v[1]: comparison_id (the query orders by it)
        votes = list(group)  # one comparison's judgments: a handful (its overlap)
        by_side = {side: [v for v in votes if v[2] == side] for side in ("A", "B")}
        score = {side: (len(vs), sum(v[3] or 0 for v in vs)) for side, vs in by_side.items()}
        if score["A"] == score["B"]:
            continue
        majority = by_side["A"] if score["A"] > score["B"] else by_side["B"]
        rows = [_row(v, margins=margins, conversational=options.conversational, pseudonyms=pseudonyms)
                for v in majority]
        strengths = [r["strength"] for r in rows if r["strength"] is not None]
        strength = statistics.median_low(strengths) if strengths else None
        chosen_safe = _majority_label([r["chosen_safe"] for r in rows if r["chosen_safe"] is not None])
        rejected_safe = _majority_label([r["rejected_safe"] for r in rows if r["rejected_safe"] is not None])
        safety_bin = None
        if chosen_safe is not None and rejected_safe is not None:
            # safety_bin_for names sides A/B; here the chosen side plays A.
            safety_bin = safety_bin_for("A", chosen_safe, rejected_safe).value
        if safety_bin == SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE and not options.include_unsafe_chosen:
            continue
        yield {
            **rows[0], "margin": 0.0 if strength is None else margins[strength], "strength": strength,
            "safety_bin": safety_bin, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe,
            "source": Counter(r["source"] for r in rows).most_common(1)[0][0], "annotator": None,
            "n_judgments": len(votes), "n_majority": len(majority),
        }


# --- serialization ------------------------------------------------------------------------------

def stream_jsonl(rows: Iterable[dict]) -> Iterator[bytes]:
    """JSON Lines, yielded in chunks of about STREAM_CHUNK_BYTES (few, large writes to the socket)."""
    buffer: list[bytes] = []
    size = 0
    for row in rows:
        line = orjson.dumps(row)
        buffer.append(line)
        size += len(line) + 1
        if size >= STREAM_CHUNK_BYTES:
            yield b"\n".join(buffer) + b"\n"
            buffer, size = [], 0
    if buffer:
        yield b"\n".join(buffer) + b"\n"


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> str:
    """A CSV cell that spreadsheets will not run: text starting like a formula gets a leading '."""
    kind = type(value)
    if kind is str:
        return "'" + value if value.startswith(FORMULA_PREFIXES) else value
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value)
    value = orjson.dumps(value).decode()  # conversational messages: their JSON
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def _csv_field(cell: str) -> str:
    """RFC 4180 quoting, as csv.QUOTE_MINIMAL does it (written out: several times faster per row)."""
    if '"' in cell:
        return '"' + cell.replace('"', '""') + '"'
    if "," in cell or "\n" in cell or "\r" in cell:
        return '"' + cell + '"'
    return cell


def stream_csv(rows: Iterable[dict], *, fields: tuple[str, ...] = ROW_FIELDS) -> Iterator[bytes]:
    """CSV (RFC 4180, UTF-8, CRLF, header row); conversational cells hold the messages as JSON."""
    lines = [",".join(map(_csv_field, fields))]
    size = 0
    for row in rows:
        line = ",".join([_csv_field(csv_cell(row.get(f))) for f in fields])
        lines.append(line)
        size += len(line)
        if size >= STREAM_CHUNK_BYTES:
            yield ("\r\n".join(lines) + "\r\n").encode()
            lines, size = [], 0
    if lines:
        yield ("\r\n".join(lines) + "\r\n").encode()
