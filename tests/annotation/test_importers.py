"""Importers: HH-RLHF (round trip on the real file), TRL-style JSONL, MT-bench (the real files);
atomic refusal of bad files with file/line/field; re-imports; the staff upload page; the commands."""
import gzip
import json
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from annotation import exports, services
from annotation.importers import ImportFileError, import_hh_rlhf, import_mt_bench, import_trl, parse_hh_transcript
from annotation.models import Batch, Comparison, Judgment, Prompt, Response
from policy.models import Checkpoint
from tests.conftest import shared_data
from webapp.auth import api_token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


def hh(*turns: str) -> str:
    """hh("q", "a", "q2", "a2") -> the HH transcript string."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def write_jsonl(path, rows, *, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def nothing_written():
    return not (Batch.objects.exists() or Prompt.objects.exists() or Response.objects.exists()
                or Comparison.objects.exists() or Judgment.objects.exists() or Checkpoint.objects.exists())


def export_text_rows(make_user):
    _, token = api_token_issue(user=make_user("res", role="researcher"), name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = client.get("/api/v1/export/preferences?format=text")
    assert response.status_code == 200
    return [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]


class TestHH:
    def test_parse_keeps_contents_verbatim(self):
        assert parse_hh_transcript(hh("hi", " two  spaces", "q2", "a2 ")) == [
            ("user", "hi"), ("assistant", " two  spaces"), ("user", "q2"), ("assistant", "a2 ")]

    def test_import_small_file(self, tmp_path):
        path = write_jsonl(tmp_path / "harmless-mini.jsonl.gz", [
            {"chosen": hh("q1", "a1", "q2", "good"), "rejected": hh("q1", "a1", "q2", "bad")},
            {"chosen": hh("solo", " I won't."), "rejected": hh("solo", "Sure, here is how")},
            {"chosen": hh("same", "x"), "rejected": hh("same", "x")},  # identical: skipped and counted
        ], gz=True)
        report = import_hh_rlhf(path)
        assert (report.pairs, report.comparisons, report.judgments) == (2, 2, 2)
        assert report.skipped_counts == {"chosen and rejected are identical": 1} and report.skipped
        batch = Batch.objects.get()
        assert batch.kind == "import" and batch.is_frozen and batch.label == report.batch
        assert batch.label.startswith("import-hh-rlhf-") and len(batch.label) == len("import-hh-rlhf-") + 12
        first = Prompt.objects.get(text="q2")
        assert first.context == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
        assert first.is_adversarial and first.source == Prompt.Source.HH_RLHF  # "harmless" in the file name
        judgment = Judgment.objects.get(comparison__prompt__text="solo")
        chosen = judgment.comparison.response_a if judgment.chosen == "A" else judgment.comparison.response_b
        assert chosen.text == " I won't." and chosen.checkpoint.name == "hh-rlhf"
        assert (judgment.source, judgment.strength, judgment.a_safe, judgment.safety_bin) == ("imported", None, None, "")

    def test_same_file_twice_is_refused(self, tmp_path):
        path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": hh("q", "a"), "rejected": hh("q", "b")}])
        import_hh_rlhf(path)
        with pytest.raises(ImportFileError, match="already imported as batch import-hh-rlhf-"):
            import_hh_rlhf(path)
        assert Comparison.objects.count() == 1

    @pytest.mark.parametrize("bad_line, where", [
        ("{not json", "line 2: not valid JSON"),
        ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a"}', "line 2: rejected: is missing"),
        ('{"chosen": 3, "rejected": "x"}', "line 2: chosen: must be a string"),
        ('["a list"]', "line 2: each line must be a JSON object"),
    ])
    def test_bad_line_names_file_line_field_and_writes_nothing(self, tmp_path, bad_line, where):
        path = write_jsonl(tmp_path / "bad.jsonl", [
            {"chosen": hh("q", "a"), "rejected": hh("q", "b")}, bad_line,
            {"chosen": hh("q3", "a"), "rejected": hh("q3", "b")},
        ])
        with pytest.raises(ImportFileError) as error:
            import_hh_rlhf(path)
        assert f"{path}, {where}" in str(error.value)
        assert nothing_written()

    def test_sides_differing_before_the_last_answer(self, tmp_path):
        rows = [{"chosen": hh("q", "a"), "rejected": hh("q", "b")},
                {"chosen": hh("q", "x", "q2", "y"), "rejected": hh("q", "DIFFERENT", "q2", "z")}]
        path = write_jsonl(tmp_path / "x.jsonl", rows)
        with pytest.raises(ImportFileError, match="line 2: chosen/rejected: chosen and rejected differ before"):
            import_hh_rlhf(path, strict=True)
        assert nothing_written()
        report = import_hh_rlhf(path)
        assert report.pairs == 1 and report.skipped == {"chosen and rejected differ before the last Assistant turn": [2]}

    def test_round_trip_of_the_real_file(self, make_user):
        """Every imported pair exports back to the original strings: prompt + chosen == chosen."""
        path = shared_data("hh-rlhf/harmless-base-test.jsonl.gz")
        originals = [json.loads(line) for line in gzip.open(path, "rt")]
        report = import_hh_rlhf(path)
        skipped = sum(report.skipped_counts.values())
        assert report.pairs == len(originals) - skipped == Comparison.objects.count()
        # 13 of the file's pairs are malformed (a marker inside an answer, so turns do not alternate or
        # the sides differ early; or a blank final answer): skipped, reported by line, nothing else lost
        assert skipped <= 15 and set(report.skipped_counts) <= {
            "turns do not alternate Human / Assistant", "a response is blank, too long or contains NUL",
            "chosen and rejected differ before the last Assistant turn", "chosen and rejected are identical"}
        line_of = {c: int(e.rsplit(":", 1)[1]) for c, e in
                   Comparison.objects.values_list("id", "prompt__external_id")}
        rows = export_text_rows(make_user)
        assert len(rows) == report.pairs
        for row in rows:
            original = originals[line_of[row["comparison_id"]] - 1]
            assert row["prompt"] + row["chosen"] == original["chosen"]
            assert row["prompt"] + row["rejected"] == original["rejected"]
            assert row["source"] == "imported" and row["strength"] is None and row["margin"] == 0.0
            assert row["is_adversarial"] is True and row["batch"] == report.batch
        # the conversational rows carry the same dialogue as messages
        conversational = exports.export_rows(Judgment.objects.all(), options=exports.ExportOptions())
        for row in conversational:
            original = originals[line_of[row["comparison_id"]] - 1]
            turns = [*row["prompt"], *row["chosen"]]
            assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            assert hh(*[t["content"] for t in turns]) == original["chosen"]


class TestTRL:
    def test_plain_conversational_and_implicit(self, tmp_path):
        path = write_jsonl(tmp_path / "prefs.jsonl", [
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "margin": 1.5},
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}],
             "chosen_checkpoint": "ckpt-x", "rejected_checkpoint": "ckpt-y", "is_adversarial": True},
            {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
            {"prompt": "dup", "chosen": "same", "rejected": "same"},
        ])
        report = import_trl(path)
        assert report.pairs == 3 and report.skipped_counts == {"chosen and rejected are identical": 1}
        assert Batch.objects.get().label.startswith("import-trl-")
        terse = Prompt.objects.get(text="2+2?")
        assert terse.system_prompt == "Be terse." and terse.context == [] and terse.is_adversarial
        judgment = Judgment.objects.get(comparison__prompt=terse)
        chosen = judgment.comparison.response_a if judgment.chosen == "A" else judgment.comparison.response_b
        assert (chosen.text, chosen.checkpoint.name) == ("4", "ckpt-x")
        assert Response.objects.get(text="Paris.").checkpoint.name == "imported"
        assert Prompt.objects.get(text="hi").source == Prompt.Source.TRL

    @pytest.mark.parametrize("row, message", [
        ({"chosen": "a", "rejected": "b"}, "line 1: prompt: is missing"),
        ({"prompt": "p", "chosen": "a"}, "line 1: rejected: is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "line 1: margin: must be a finite number"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "line 1: prompt: message 0 must be 'user'"),
        ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "wizard", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "line 1: chosen[0].role: unknown role"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "line 1: prompt: is blank"),
    ])
    def test_bad_lines(self, tmp_path, row, message):
        path = write_jsonl(tmp_path / "bad.jsonl", [row])
        with pytest.raises(ImportFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            import_trl(path)
        assert nothing_written()

    def test_our_own_export_imports_back(self, tmp_path, make_comparison, annotator):
        comparison = make_comparison(text="Why is the sky blue?", a="Rayleigh scattering.", b="Because.")
        services.judgment_submit(assignment=services.assignment_lease_next(annotator=annotator), annotator=annotator,
                                 chosen="A", strength=3, safety=services.SafetyLabels(a_safe=True, b_safe=True))
        path = tmp_path / "export.jsonl"
        path.write_bytes(b"".join(exports.stream_jsonl(
            exports.export_rows(Judgment.objects.all(), options=exports.ExportOptions()))))
        import_trl(path)
        imported = Judgment.objects.get(source="imported")
        c = imported.comparison
        chosen, rejected = (c.response_a, c.response_b) if imported.chosen == "A" else (c.response_b, c.response_a)
        assert (c.prompt.text, chosen.text, rejected.text) == ("Why is the sky blue?", "Rayleigh scattering.", "Because.")
        assert (chosen.checkpoint, rejected.checkpoint) == (comparison.response_a.checkpoint,
                                                            comparison.response_b.checkpoint)


class TestMTBench:
    def test_real_files(self, annotator):
        questions = shared_data("mt-bench/question.jsonl")
        answers = sorted(shared_data("mt-bench/model_answer").glob("*.jsonl"))
        n_questions = sum(1 for _ in questions.open())
        report = import_mt_bench(questions, answers)
        n_models = len(answers)
        pairs = n_models * (n_models - 1) // 2
        skipped = sum(report.skipped_counts.values())  # a few pairs of models gave identical answers
        assert skipped < 20 and set(report.skipped_counts) <= {"identical answers (question ids)"}
        assert report.comparisons == Comparison.objects.count() == n_questions * pairs * 2 - skipped
        assert not Batch.objects.exists() and not Judgment.objects.exists()  # unjudged: for the queue
        assert set(Checkpoint.objects.values_list("name", flat=True)) >= {"claude-v1", "gpt-3.5-turbo"}
        # turn 2: context = the pair's first model's own turn-1 answer; both turn-2 answers compared
        first_question = json.loads(questions.open().readline())
        claude = {json.loads(line)["question_id"]: json.loads(line) for line in
                  (questions.parent / "model_answer" / "claude-v1.jsonl").open()}
        turn2 = Comparison.objects.get(prompt__external_id=f"mt-bench:{first_question['question_id']}:2:alpaca-13b",
                                       response_b__checkpoint__name="claude-v1")
        assert turn2.prompt.text == first_question["turns"][1]
        assert turn2.prompt.context[0] == {"role": "user", "content": first_question["turns"][0]}
        assert turn2.response_a.checkpoint.name == "alpaca-13b"
        assert turn2.response_b.text == claude[first_question["question_id"]]["choices"][0]["turns"][1]
        assert turn2.prompt.source == Prompt.Source.MT_BENCH and turn2.origin == "import"
        # importing again adds nothing
        again = import_mt_bench(questions, answers)
        assert (again.prompts, again.responses, again.comparisons) == (0, 0, 0)
        assert Comparison.objects.count() == report.comparisons
        assert services.assignment_lease_next(annotator=annotator) is not None

    def test_answer_for_unknown_question_refuses_everything(self, tmp_path):
        questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "turns": ["a?", "b?"]}])
        good = write_jsonl(tmp_path / "m1.jsonl", [{"question_id": 1, "model_id": "m1", "choices": [{"turns": ["x", "y"]}]}])
        bad = write_jsonl(tmp_path / "m2.jsonl", [{"question_id": 1, "model_id": "m2", "choices": [{"turns": ["x2", "y2"]}]},
                                                 {"question_id": 7, "model_id": "m2", "choices": [{"turns": ["p", "q"]}]}])
        with pytest.raises(ImportFileError, match="m2.jsonl, line 2: question_id: 7 is not in the question file"):
            import_mt_bench(questions, [good, bad])
        assert nothing_written()
        with pytest.raises(ValidationError, match="No answers for model"):
            import_mt_bench(questions, [good], models=["m1", "ghost"])


class TestStaffPageAndCommands:
    def test_upload_page(self, client, admin_user, annotator, tmp_path):
        data = json.dumps({"chosen": hh("q", "a"), "rejected": hh("q", "b")}).encode() + b"\n"
        client.force_login(annotator)
        assert client.get("/staff/import/").status_code == 302  # staff only
        client.force_login(admin_user)
        assert client.get("/staff/import/").status_code == 200
        response = client.post("/staff/import/", {"kind": "hh-rlhf", "adversarial": "no",
                                                  "file": SimpleUploadedFile("pairs.jsonl", data)})
        assert response.status_code == 200 and b"1 pairs" in response.content
        assert not Prompt.objects.get().is_adversarial
        bad = client.post("/staff/import/", {"kind": "trl", "adversarial": "auto",
                                             "file": SimpleUploadedFile("<i>evil.jsonl", b"{oops\n")})
        assert bad.status_code == 400
        assert b"&lt;i&gt;evil.jsonl, line 1: not valid JSON" in bad.content and b"<i>evil" not in bad.content
        assert Batch.objects.count() == 1

    def test_commands(self, tmp_path):
        path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": hh("q", "a"), "rejected": hh("q", "b")}])
        out = StringIO()
        call_command("import_hh_rlhf", str(path), "--not-adversarial", stdout=out)
        assert "1 pairs" in out.getvalue()
        with pytest.raises(CommandError, match="already imported"):
            call_command("import_hh_rlhf", str(path), stdout=StringIO())
        trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
        call_command("import_trl", str(trl), "--checkpoint", "someone", stdout=StringIO())
        assert Response.objects.filter(checkpoint__name="someone").count() == 2
        questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["a?", "b?"]}])
        answers = tmp_path / "answers"
        answers.mkdir()
        for m in ("m1", "m2"):
            write_jsonl(answers / f"{m}.jsonl", [{"question_id": 1, "model_id": m, "choices": [{"turns": [m, m + "!"]}]}])
        call_command("import_mt_bench", str(questions), str(answers), stdout=StringIO())
        assert Comparison.objects.filter(prompt__source=Prompt.Source.MT_BENCH).count() == 2
        exported = tmp_path / "out.jsonl"
        call_command("export_preferences", "-o", str(exported), "--source", "imported", "--format", "text")
        rows = [json.loads(line) for line in exported.read_text().splitlines()]
        assert len(rows) == 2 and {r["source"] for r in rows} == {"imported"}
        with pytest.raises(CommandError):
            call_command("export_preferences", "--strength", "9", stdout=StringIO())
