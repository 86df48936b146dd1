"""Importing outside preference data: Anthropic HH-RLHF, TRL-style JSONL, FastChat MT-bench.

Each import is one transaction: a bad line raises ImportFileError naming the file, the line and
the field, and nothing is written.

HH-RLHF and TRL files hold judged pairs. Each becomes its own Batch(kind=import), labelled
"import-<kind>-<sha256 of the file bytes, 12 hex>", frozen at the end (imports are immutable data,
and frozen batches are what reward models train on). Importing the same bytes again is refused:
the label exists. Every pair becomes a Prompt, two Responses from an external checkpoint, a
Comparison(origin=import) and a Judgment(source=imported, strength NULL, safety NULL). Which of
A/B holds the chosen response is decided by a hash of the line, so A is not always the winner.

MT-bench holds no judgments, only answers: its comparisons go to the annotation queue and land in
the weekly batch of their first judgment, as annotated comparisons do -- so that import creates no
batch (a frozen one would take them out of the queue). Importing it again is a no-op: prompts,
responses and comparisons that exist are reused, and a new model adds only its new pairs.
"""
import gzip
import hashlib
import io
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from policy.models import Checkpoint
from policy.services import checkpoint_get_or_create_external

from . import services
from .models import Batch, Comparison, Judgment, Prompt, Response

BULK = 1000  # rows per bulk_create
MAX_TEXT = services.MAX_PROMPT_LENGTH
MAX_RESPONSE = services.MAX_RESPONSE_LENGTH
MAX_SKIPPED_LINES_KEPT = 50  # per reason, in the report


class ImportFileError(ValidationError):
    """A file that cannot be imported: says which file, line and field, and why."""

    def __init__(self, file: str, line: int | None, field_name: str | None, problem: str):
        where = f"{file}, line {line}" if line else file
        self.file, self.line, self.field_name, self.problem = file, line, field_name, problem
        super().__init__(f"{where}: {field_name + ': ' if field_name else ''}{problem}")


@dataclass
class ImportReport:
    file: str
    batch: str | None = None
    pairs: int = 0
    prompts: int = 0
    responses: int = 0
    comparisons: int = 0
    judgments: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> line numbers / question ids (first 50)
    skipped_counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, line: int) -> None:
        self.skipped_counts[reason] += 1
        lines = self.skipped.setdefault(reason, [])
        if len(lines) < MAX_SKIPPED_LINES_KEPT:
            lines.append(line)

    def summary(self) -> str:
        head = (f"{self.file}: {self.pairs} pairs -> {self.comparisons} comparisons, {self.judgments} judgments"
                + (f" in batch {self.batch}" if self.batch else ""))
        skips = [f"  skipped {n} ({reason}): {', '.join(map(str, self.skipped[reason]))}"
                 + (" ..." if n > len(self.skipped[reason]) else "")
                 for reason, n in sorted(self.skipped_counts.items())]
        return "\n".join([head, *skips])


@dataclass(frozen=True)
class Pair:
    """One judged pair, parsed: the dialogue up to the answer and the two answers."""
    line: int
    text: str
    context: list[dict]
    system_prompt: str
    chosen: str
    rejected: str
    chosen_checkpoint: str
    rejected_checkpoint: str
    is_adversarial: bool
    digest: str  # of the line: decides which of A/B holds the chosen response


# --- reading --------------------------------------------------------------------------------------

def _read_bytes(source: str | Path | BinaryIO) -> bytes:
    if isinstance(source, str | Path):
        return Path(source).read_bytes()
    return source.read()


def _jsonl(raw: bytes, name: str) -> Iterator[tuple[int, dict, str]]:
    """(line number, object, digest of the line) for each non-blank line; gzip detected by magic."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ImportFileError(name, None, None, f"not a readable gzip file ({error})") from None
    for number, line in enumerate(io.BytesIO(raw), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            raise ImportFileError(name, number, None, f"not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise ImportFileError(name, number, None, "each line must be a JSON object")
        yield number, value, hashlib.sha256(line).hexdigest()


def _string(value, name: str, line: int, field_name: str, *, max_length: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ImportFileError(name, line, field_name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ImportFileError(name, line, field_name, "is blank")
    if "\x00" in value:
        raise ImportFileError(name, line, field_name, "contains a NUL character")
    if len(value) > max_length:
        raise ImportFileError(name, line, field_name, f"is longer than {max_length} characters")
    return value


# --- HH-RLHF ----------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class _Skip(Exception):
    """A pair that is well-formed JSON but cannot be imported faithfully; skipped and counted."""


def parse_hh_transcript(transcript: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: q\\n\\nAssistant: a...' -> [("user", q), ("assistant", a), ...], contents verbatim."""
    if not transcript.startswith("\n\nHuman: "):
        raise _Skip("transcript does not start with '\\n\\nHuman: '")
    pieces = _HH_TURN.split(transcript)  # ["", "Human", q, "Assistant", a, ...]
    turns = [(_HH_ROLE[role], content) for role, content in zip(pieces[1::2], pieces[2::2])]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise _Skip("turns do not alternate Human / Assistant")
    if not turns or turns[-1][0] != "assistant":
        raise _Skip("transcript does not end with an Assistant turn")
    return turns


def _hh_pair(obj: dict, *, name: str, line: int, digest: str, adversarial: bool) -> Pair:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ImportFileError(name, line, key, "is missing")
        if not isinstance(obj[key], str):
            raise ImportFileError(name, line, key, f"must be a string, got {type(obj[key]).__name__}")
    if obj["chosen"] == obj["rejected"]:
        raise _Skip("chosen and rejected are identical")
    chosen, rejected = parse_hh_transcript(obj["chosen"]), parse_hh_transcript(obj["rejected"])
    if chosen[:-1] != rejected[:-1]:
        raise _Skip("chosen and rejected differ before the last Assistant turn")
    *context, (_, text) = chosen[:-1]
    for _, content in chosen[:-1]:
        if not content.strip() or "\x00" in content or len(content) > MAX_TEXT:
            raise _Skip("a turn is blank, too long or contains NUL")
    for content in (chosen[-1][1], rejected[-1][1]):
        if not content.strip() or "\x00" in content or len(content) > MAX_RESPONSE:
            raise _Skip("a response is blank, too long or contains NUL")
    if chosen[-1][1] == rejected[-1][1]:
        raise _Skip("chosen and rejected are identical")
    return Pair(line=line, text=text, context=[{"role": r, "content": c} for r, c in context], system_prompt="",
                chosen=chosen[-1][1], rejected=rejected[-1][1], chosen_checkpoint="hh-rlhf",
                rejected_checkpoint="hh-rlhf", is_adversarial=adversarial, digest=digest)


def import_hh_rlhf(source: str | Path | BinaryIO, *, name: str | None = None, adversarial: bool | None = None,
                   strict: bool = False) -> ImportReport:
    """Import an HH-RLHF JSONL(.gz) file of {"chosen", "rejected"} transcripts.

    Context turns, the final user message and the two final answers are split on the
    "\\n\\nHuman: " / "\\n\\nAssistant: " markers and stored verbatim (no whitespace trimmed), so an
    export renders the original strings back. adversarial: the prompts are red-team prompts (the
    "harmless" files); None infers it from the file name. Pairs that are valid JSON but cannot be
    imported faithfully (identical sides, sides that differ before the last answer, blank turns)
    are skipped and reported by line -- or, with strict, refuse the whole file.
    """
    name = name or str(source)
    if adversarial is None:
        adversarial = "harmless" in Path(name).name
    raw = _read_bytes(source)

    def pairs(report: ImportReport) -> Iterator[Pair]:
        for line, obj, digest in _jsonl(raw, name):
            try:
                yield _hh_pair(obj, name=name, line=line, digest=digest, adversarial=adversarial)
            except _Skip as skip:
                if strict:
                    raise ImportFileError(name, line, "chosen/rejected", str(skip)) from None
                report.skip(str(skip), line)

    return _import_pairs(raw, name=name, kind="hh-rlhf", source=Prompt.Source.HH_RLHF, pairs=pairs)


# --- TRL-style JSONL ----------------------------------------------------------------------------

def _messages(value, name: str, line: int, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ImportFileError(name, line, field_name, "must be a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ImportFileError(name, line, f"{field_name}[{i}]", "must be an object with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ImportFileError(name, line, f"{field_name}[{i}].role", f"unknown role {message['role']!r}")
        out.append({"role": message["role"],
                    "content": _string(message["content"], name, line, f"{field_name}[{i}].content",
                                       max_length=MAX_RESPONSE)})
    return out


def _split_prompt(messages: list[dict], name: str, line: int, field_name: str) -> tuple[str, list[dict], str]:
    """[system?] + alternating user/assistant ending with user -> (system, context, final user text)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ImportFileError(name, line, field_name, f"message {i} must be '{expected}', got {message['role']!r}")
    if not messages or messages[-1]["role"] != "user":
        raise ImportFileError(name, line, field_name, "must end with a user message")
    for message in messages:
        if len(message["content"]) > MAX_TEXT:
            raise ImportFileError(name, line, field_name, f"a message is longer than {MAX_TEXT} characters")
    return system, messages[:-1], messages[-1]["content"]


def _single_answer(messages: list[dict], name: str, line: int, field_name: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ImportFileError(name, line, field_name, "must be exactly one assistant message")
    return messages[0]["content"]


def _trl_pair(obj: dict, *, name: str, line: int, digest: str, checkpoint: str) -> Pair:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ImportFileError(name, line, key, "is missing")
    if "margin" in obj and (isinstance(obj["margin"], bool) or not isinstance(obj["margin"], int | float)
                            or not math.isfinite(obj["margin"])):
        raise ImportFileError(name, line, "margin", "must be a finite number")
    conversational = isinstance(obj["chosen"], list)
    if conversational:
        chosen, rejected = (_messages(obj[k], name, line, k) for k in ("chosen", "rejected"))
        if "prompt" in obj:
            system, context, text = _split_prompt(_messages(obj["prompt"], name, line, "prompt"), name, line, "prompt")
        else:  # implicit prompt: both conversations share all but their last message
            if chosen[:-1] != rejected[:-1]:
                raise ImportFileError(name, line, "chosen/rejected", "without 'prompt', the two conversations "
                                      "must share all but their last message")
            system, context, text = _split_prompt(chosen[:-1], name, line, "chosen")
            chosen, rejected = chosen[-1:], rejected[-1:]
        chosen_text = _single_answer(chosen, name, line, "chosen")
        rejected_text = _single_answer(rejected, name, line, "rejected")
    else:
        if "prompt" not in obj:
            raise ImportFileError(name, line, "prompt", "is missing (plain-text pairs need a prompt)")
        system, context = "", []
        text = _string(obj["prompt"], name, line, "prompt")
        chosen_text = _string(obj["chosen"], name, line, "chosen", max_length=MAX_RESPONSE)
        rejected_text = _string(obj["rejected"], name, line, "rejected", max_length=MAX_RESPONSE)
    names = {}
    for side in ("chosen", "rejected"):  # our own export carries the checkpoints; reuse them
        value = obj.get(f"{side}_checkpoint", checkpoint)
        names[side] = _string(value, name, line, f"{side}_checkpoint", max_length=200)
    adversarial = obj.get("is_adversarial", False)
    if not isinstance(adversarial, bool):
        raise ImportFileError(name, line, "is_adversarial", "must be true or false")
    if chosen_text == rejected_text:
        raise _Skip("chosen and rejected are identical")
    return Pair(line=line, text=text, context=context, system_prompt=system, chosen=chosen_text,
                rejected=rejected_text, chosen_checkpoint=names["chosen"], rejected_checkpoint=names["rejected"],
                is_adversarial=adversarial, digest=digest)


def import_trl(source: str | Path | BinaryIO, *, name: str | None = None, checkpoint: str = "imported") -> ImportReport:
    """Import TRL-style preference JSONL(.gz): {"prompt", "chosen", "rejected"[, "margin"]}, plain text
    or conversational (explicit prompt, or implicit: two conversations sharing all but the last
    message). Responses come from the external checkpoint `checkpoint`, or from chosen_checkpoint /
    rejected_checkpoint when a line names them (as Tandem's own export does). A margin is checked
    but not stored: Tandem keeps strengths, and an imported pair has none (it exports margin 0).
    Pairs with identical answers are skipped and counted; any other bad line refuses the file."""
    name = name or str(source)
    raw = _read_bytes(source)

    def pairs(report: ImportReport) -> Iterator[Pair]:
        for line, obj, digest in _jsonl(raw, name):
            try:
                yield _trl_pair(obj, name=name, line=line, digest=digest, checkpoint=checkpoint)
            except _Skip as skip:
                report.skip(str(skip), line)

    return _import_pairs(raw, name=name, kind="trl", source=Prompt.Source.TRL, pairs=pairs)


# --- judged pairs into a frozen import batch --------------------------------------------------------

def import_batch_label(kind: str, raw: bytes) -> str:
    return f"import-{kind}-{hashlib.sha256(raw).hexdigest()[:12]}"


@transaction.atomic
def _import_pairs(raw: bytes, *, name: str, kind: str, source: str, pairs) -> ImportReport:
    label = import_batch_label(kind, raw)
    if Batch.objects.filter(label=label).exists():
        raise ImportFileError(name, None, None, f"this file was already imported as batch {label}")
    report = ImportReport(file=name, batch=label)
    batch = Batch.objects.create(label=label, kind=Batch.Kind.IMPORT)
    checkpoints: dict[str, Checkpoint] = {}
    stream = pairs(report)
    while chunk := list(itertools.islice(stream, BULK)):
        for pair in chunk:
            for ckpt in (pair.chosen_checkpoint, pair.rejected_checkpoint):
                if ckpt not in checkpoints:
                    checkpoints[ckpt] = checkpoint_get_or_create_external(name=ckpt)
        prompts = Prompt.objects.bulk_create(
            Prompt(text=p.text, context=p.context, system_prompt=p.system_prompt, source=source,
                   is_adversarial=p.is_adversarial, tags=["safety"] if p.is_adversarial else [],
                   external_id=f"{label}:{p.line}")
            for p in chunk
        )
        responses = Response.objects.bulk_create(
            Response(prompt=prompt, checkpoint=checkpoints[ckpt], text=text)
            for prompt, p in zip(prompts, chunk)
            for text, ckpt in ((p.chosen, p.chosen_checkpoint), (p.rejected, p.rejected_checkpoint))
        )
        chosen_is_a = [int(p.digest[:8], 16) % 2 == 0 for p in chunk]
        comparisons = Comparison.objects.bulk_create(
            Comparison(prompt=prompt, batch=batch, origin=Comparison.Origin.IMPORT, overlap=1,
                       response_a=responses[2 * i] if a else responses[2 * i + 1],
                       response_b=responses[2 * i + 1] if a else responses[2 * i])
            for i, (prompt, a) in enumerate(zip(prompts, chosen_is_a))
        )
        Judgment.objects.bulk_create(
            Judgment(comparison=c, source=Judgment.Source.IMPORTED, chosen="A" if a else "B")
            for c, a in zip(comparisons, chosen_is_a)
        )
        report.pairs += len(chunk)
        report.prompts += len(prompts)
        report.responses += len(responses)
        report.comparisons += len(comparisons)
        report.judgments += len(comparisons)
    if report.pairs == 0:
        raise ImportFileError(name, None, None, "no pair could be imported" + (
            f" (skipped: {dict(report.skipped_counts)})" if report.skipped_counts else " (the file is empty)"))
    services.batch_freeze(batch=batch)
    return report


# --- MT-bench -------------------------------------------------------------------------------------------

def _mt_questions(path: Path) -> dict[int, dict]:
    questions = {}
    for line, obj, _ in _jsonl(path.read_bytes(), str(path)):
        qid = obj.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise ImportFileError(str(path), line, "question_id", "must be an integer")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2:
            raise ImportFileError(str(path), line, "turns", "must be a list of one or two user turns")
        for i, turn in enumerate(turns):
            _string(turn, str(path), line, f"turns[{i}]")
        if qid in questions:
            raise ImportFileError(str(path), line, "question_id", f"{qid} appears twice")
        category = obj.get("category", "")
        questions[qid] = {"turns": turns, "category": category if isinstance(category, str) else ""}
    return questions


def _mt_answers(path: Path, questions: dict[int, dict]) -> tuple[str, dict[int, list[str]]]:
    model, answers = None, {}
    for line, obj, _ in _jsonl(path.read_bytes(), str(path)):
        model_id = obj.get("model_id")
        if not isinstance(model_id, str) or not model_id.strip():
            raise ImportFileError(str(path), line, "model_id", "must be a non-empty string")
        if model is not None and model_id != model:
            raise ImportFileError(str(path), line, "model_id", f"{model_id!r} in a file of {model!r}")
        model = model_id
        qid = obj.get("question_id")
        if qid not in questions:
            raise ImportFileError(str(path), line, "question_id", f"{qid!r} is not in the question file")
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("turns"), list):
            raise ImportFileError(str(path), line, "choices", "must be a list whose first item has 'turns'")
        turns = choices[0]["turns"]
        if len(turns) != len(questions[qid]["turns"]) or not all(isinstance(t, str) for t in turns):
            raise ImportFileError(str(path), line, "choices[0].turns",
                                  f"must be {len(questions[qid]['turns'])} strings, one per question turn")
        answers[qid] = turns
    if model is None:
        raise ImportFileError(str(path), None, None, "holds no answers")
    return model, answers


def _usable(answer: str) -> bool:
    return bool(answer.strip()) and "$ERROR$" not in answer and "\x00" not in answer and len(answer) <= MAX_RESPONSE


@transaction.atomic
def import_mt_bench(
    question_file: str | Path, answer_files: Sequence[str | Path], *, models: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None, overlap: int | None = None,
) -> ImportReport:
    """MT-bench questions and model answers -> unjudged comparisons for the annotation queue.

    One external checkpoint per model_id. Turn 1: every pair of models answers the same prompt.
    Turn 2 needs one shared context, but each model wrote its second answer after its *own* first
    one; we use the first model of the pair's turn-1 answer as the context (the pair's order is
    the sorted model ids, or the order given in `pairs`), so the second model's turn-2 answer is
    judged against a first turn it did not write -- annotators judge the last answer only, and the
    second model may refer to something it "said" that is not shown. Answers that are blank or
    "$ERROR$" and pairs with identical answers are skipped and counted.
    """
    overlap = settings.TANDEM_DEFAULT_OVERLAP if overlap is None else overlap
    if not 1 <= overlap <= 50:
        raise ValidationError({"overlap": "Must be between 1 and 50."})
    question_file = Path(question_file)
    questions = _mt_questions(question_file)
    answers: dict[str, dict[int, list[str]]] = {}
    for path in sorted(map(Path, answer_files)):
        model, by_question = _mt_answers(path, questions)
        if model in answers:
            raise ImportFileError(str(path), None, "model_id", f"{model!r} has answers in two files")
        answers[model] = by_question
    chosen_models = sorted(answers) if models is None else list(models)
    if unknown := [m for m in chosen_models if m not in answers]:
        raise ValidationError(f"No answers for model(s) {', '.join(unknown)}; have {', '.join(sorted(answers))}.")
    model_pairs = list(itertools.combinations(chosen_models, 2)) if pairs is None else [tuple(p) for p in pairs]
    for a, b in model_pairs:
        if a == b or a not in answers or b not in answers:
            raise ValidationError(f"Bad model pair ({a}, {b}): two different models with answers.")
    checkpoints = {m: checkpoint_get_or_create_external(name=m) for m in {m for p in model_pairs for m in p}}

    report = ImportReport(file=str(question_file))
    # Every prompt / response / comparison the pairs need, keyed so existing rows are reused.
    wanted_prompts: dict[str, Prompt] = {}
    wanted_responses: dict[tuple[str, str], str] = {}  # (prompt key, model) -> text
    wanted_comparisons: list[tuple[str, str, str]] = []  # (prompt key, model A, model B)
    for qid in sorted(questions):
        q = questions[qid]
        for a, b in model_pairs:
            ans_a, ans_b = answers[a].get(qid), answers[b].get(qid)
            if ans_a is None or ans_b is None:
                report.skip("a model has no answer (question ids)", qid)
                continue
            for turn in range(len(q["turns"])):
                if not (_usable(ans_a[turn]) and _usable(ans_b[turn])) or (turn and not _usable(ans_a[0])):
                    report.skip("blank or $ERROR$ answer (question ids)", qid)
                    continue
                if ans_a[turn] == ans_b[turn]:
                    report.skip("identical answers (question ids)", qid)
                    continue
                key = f"mt-bench:{qid}:1" if turn == 0 else f"mt-bench:{qid}:2:{a}"
                if key not in wanted_prompts:
                    context = [] if turn == 0 else [{"role": "user", "content": q["turns"][0]},
                                                    {"role": "assistant", "content": ans_a[0]}]
                    wanted_prompts[key] = Prompt(text=q["turns"][turn], context=context, source=Prompt.Source.MT_BENCH,
                                                 tags=[q["category"]] if q["category"] else [], external_id=key)
                wanted_responses[(key, a)] = ans_a[turn]
                wanted_responses[(key, b)] = ans_b[turn]
                wanted_comparisons.append((key, a, b))
                report.pairs += 1

    existing = {p.external_id: p for p in Prompt.objects.filter(source=Prompt.Source.MT_BENCH,
                                                                   external_id__in=list(wanted_prompts))}
    new_prompts = [p for key, p in wanted_prompts.items() if key not in existing]
    for start in range(0, len(new_prompts), BULK):
        Prompt.objects.bulk_create(new_prompts[start:start + BULK])
    prompts = {**{p.external_id: p for p in new_prompts}, **existing}
    report.prompts = len(new_prompts)

    by_id = {c.id: m for m, c in checkpoints.items()}
    have = {(r.prompt_id, by_id[r.checkpoint_id]): r for r in Response.objects.filter(
        prompt__in=list(prompts.values()), checkpoint__in=list(checkpoints.values()))}
    new_responses = {(prompts[key].id, m): Response(prompt=prompts[key], checkpoint=checkpoints[m], text=text)
                     for (key, m), text in wanted_responses.items() if (prompts[key].id, m) not in have}
    Response.objects.bulk_create(list(new_responses.values()), batch_size=BULK)
    responses = {**have, **new_responses}
    report.responses = len(new_responses)

    pairs_wanted = [(responses[(prompts[k].id, a)], responses[(prompts[k].id, b)], prompts[k])
                    for k, a, b in wanted_comparisons]
    seen = set(Comparison.objects.filter(response_a__in=[ra for ra, _, _ in pairs_wanted])
               .values_list("response_a_id", "response_b_id"))
    new_comparisons = [
        Comparison(prompt=p, response_a=ra, response_b=rb, origin=Comparison.Origin.IMPORT, overlap=overlap)
        for ra, rb, p in pairs_wanted if (ra.id, rb.id) not in seen and (rb.id, ra.id) not in seen
    ]
    Comparison.objects.bulk_create(new_comparisons, batch_size=BULK)
    report.comparisons = len(new_comparisons)
    return report
