"""GET /api/v1/export/preferences: the row schema TRL reads, margins, the unsafe-chosen rule,
majority aggregation, CSV escaping, filters, and streaming without building lists."""
import csv
import io
import itertools
import json

import pytest
from rest_framework.test import APIClient

from annotation import exports, services
from annotation.models import Batch, Judgment
from annotation.services import SafetyLabels
from webapp.auth import api_token_issue


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


@pytest.fixture
def researcher_client(make_user):
    _, token = api_token_issue(user=make_user("res", role="researcher"), name="export")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def judge(comparison, user, chosen="A", strength=2, a_safe=True, b_safe=True):
    assignment = services.assignment_lease_next(annotator=user)
    assert assignment.comparison_id == comparison.id
    return services.judgment_submit(assignment=assignment, annotator=user, chosen=chosen, strength=strength,
                                    safety=SafetyLabels(a_safe=a_safe, b_safe=b_safe))


def get_rows(client, query=""):
    response = client.get(f"/api/v1/export/preferences{query}")
    assert response.status_code == 200, response.content
    assert response.streaming
    body = b"".join(response.streaming_content).decode()
    return [json.loads(line) for line in body.splitlines()]


@pytest.fixture
def dialogue(make_comparison):
    """A two-turn dialogue with a system prompt, answered by model-a (A) and model-b (B)."""
    comparison = make_comparison(text="And in winter?", a="Cold.", b="Snowy and dark.")
    prompt = comparison.prompt
    prompt.context = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "Mild."}]
    prompt.system_prompt = "Be brief."
    prompt.save(update_fields=["context", "system_prompt"])
    return comparison


class TestRows:
    def test_conversational_row_schema(self, researcher_client, dialogue, annotator):
        judgment = judge(dialogue, annotator, chosen="B", strength=3)
        [row] = get_rows(researcher_client)
        assert list(row) == list(exports.ROW_FIELDS)
        assert row["id"] == judgment.id and row["comparison_id"] == dialogue.id
        assert row["prompt"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Mild."},
            {"role": "user", "content": "And in winter?"},
        ]
        assert row["chosen"] == [{"role": "assistant", "content": "Snowy and dark."}]
        assert row["rejected"] == [{"role": "assistant", "content": "Cold."}]
        assert (row["chosen_checkpoint"], row["rejected_checkpoint"]) == ("model-b", "model-a")
        assert row["margin"] == 0.0 and row["strength"] == 3
        assert (row["safety_bin"], row["chosen_safe"], row["rejected_safe"]) == ("both_safe", True, True)
        assert row["source"] == "human" and row["origin"] == "demo" and row["split"] == "train"
        assert row["batch"] == Batch.objects.get().label and row["is_adversarial"] is False
        assert row["annotator"] == exports.annotator_pseudonym(annotator.id)
        assert row["annotator"].startswith("ann-") and str(annotator.id) != row["annotator"]

    def test_text_format_is_a_transcript_that_prompt_plus_chosen_completes(self, researcher_client, dialogue, annotator):
        judge(dialogue, annotator, chosen="A")
        [row] = get_rows(researcher_client, "?format=text")
        assert row["prompt"] == ("\n\nSystem: Be brief.\n\nHuman: Weather in Oslo?\n\nAssistant: Mild."
                                 "\n\nHuman: And in winter?\n\nAssistant: ")
        assert (row["chosen"], row["rejected"]) == ("Cold.", "Snowy and dark.")

    @pytest.mark.parametrize("scale, expected", [
        ("small", {3: 1.0, 2: 2 / 3, 1: 1 / 3, 0: 0.0}), ("large", {3: 3.0, 2: 2.0, 1: 1.0, 0: 0.0}),
        ("none", {3: 0.0, 2: 0.0, 1: 0.0, 0: 0.0}),
    ])
    def test_margins(self, researcher_client, make_comparison, annotator, scale, expected):
        for strength in (3, 2, 1, 0):
            judge(make_comparison(), annotator, strength=strength)
        rows = get_rows(researcher_client, f"?margin={scale}")
        assert {r["strength"]: r["margin"] for r in rows} == pytest.approx(expected)

    def test_unsafe_chosen_left_out_unless_asked(self, researcher_client, make_comparison, annotator):
        kept = judge(make_comparison(), annotator, chosen="A", a_safe=True, b_safe=False)
        unsafe_chosen = judge(make_comparison(), annotator, chosen="A", a_safe=False, b_safe=True)
        assert [r["id"] for r in get_rows(researcher_client)] == [kept.id]
        rows = get_rows(researcher_client, "?include_unsafe_chosen=true")
        assert [r["id"] for r in rows] == [kept.id, unsafe_chosen.id]
        assert (rows[1]["chosen_safe"], rows[1]["rejected_safe"]) == (False, True)
        assert rows[1]["safety_bin"] == "chosen_unsafe_other_safe"

    def test_filters_as_the_judgments_list(self, researcher_client, make_comparison, annotator, other_annotator):
        a = judge(make_comparison(), annotator, strength=3)
        b = judge(make_comparison(), other_annotator, strength=1)
        assert [r["id"] for r in get_rows(researcher_client, "?strength=1")] == [b.id]
        assert [r["id"] for r in get_rows(researcher_client, "?source=human&split=train")] == [a.id, b.id]
        assert get_rows(researcher_client, "?split=test") == []
        assert get_rows(researcher_client, "?batch=nope") == []
        pseudonym = exports.annotator_pseudonym(annotator.id)
        assert [r["id"] for r in get_rows(researcher_client, f"?annotator={pseudonym}")] == [a.id]

    @pytest.mark.parametrize("query", ["?margin=huge", "?format=xml", "?aggregate=mean", "?export_format=xlsx",
                                       "?annotator__password__startswith=x", "?ordering=id", "?strength=9"])
    def test_bad_parameters_are_400_json(self, researcher_client, query):
        response = researcher_client.get(f"/api/v1/export/preferences{query}")
        assert response.status_code == 400, query
        assert response["Content-Type"].startswith("application/json")

    def test_annotators_cannot_export(self, annotator):
        _, token = api_token_issue(user=annotator, name="t")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        assert client.get("/api/v1/export/preferences").status_code == 403


class TestMajority:
    def test_majority_row_per_comparison(self, researcher_client, make_comparison, make_user):
        users = [make_user(f"a{i}") for i in range(4)]
        three = make_comparison(overlap=3)
        votes = [("B", 3, True, True), ("B", 1, True, True), ("A", 2, True, True)]
        for user, (chosen, strength, a_safe, b_safe) in zip(users, votes):
            judge(three, user, chosen, strength, a_safe, b_safe)
        [row] = get_rows(researcher_client, "?aggregate=majority&margin=large")
        assert row["comparison_id"] == three.id
        assert row["chosen"][0]["content"] == "Answer B"
        assert row["strength"] == 1  # lower median of the majority's 3 and 1
        assert row["margin"] == 1.0
        assert (row["n_judgments"], row["n_majority"], row["annotator"]) == (3, 2, None)
        assert row["id"] == min(j.id for j in Judgment.objects.filter(chosen="B"))

    def test_ties_go_to_summed_strength_and_full_ties_are_left_out(self, researcher_client, make_comparison, make_user):
        users = [make_user(f"t{i}") for i in range(4)]
        by_strength = make_comparison(overlap=2)
        judge(by_strength, users[0], "A", 1)
        judge(by_strength, users[1], "B", 3)
        full_tie = make_comparison(overlap=2)
        judge(full_tie, users[2], "A", 2)
        judge(full_tie, users[3], "B", 2)
        rows = get_rows(researcher_client, "?aggregate=majority")
        assert [r["comparison_id"] for r in rows] == [by_strength.id]
        assert rows[0]["chosen"][0]["content"] == "Answer B"

    def test_aggregated_unsafe_chosen_is_left_out(self, researcher_client, make_comparison, make_user):
        users = [make_user(f"u{i}") for i in range(2)]
        comparison = make_comparison(overlap=2)
        for user in users:
            judge(comparison, user, "A", 2, a_safe=False, b_safe=True)
        assert get_rows(researcher_client, "?aggregate=majority") == []
        [row] = get_rows(researcher_client, "?aggregate=majority&include_unsafe_chosen=true")
        assert row["safety_bin"] == "chosen_unsafe_other_safe"


class TestCsv:
    def test_csv_escapes_formulas(self, researcher_client, make_comparison, annotator):
        judge(make_comparison(text="=HYPERLINK(\"http://evil\")", a="+1 call now", b="@SUM(A1)"), annotator, "A")
        response = researcher_client.get("/api/v1/export/preferences?export_format=csv&format=text")
        assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
        [row] = table
        assert row["chosen"] == "'+1 call now" and row["rejected"] == "'@SUM(A1)"
        assert row["prompt"].startswith("\n\nHuman: =HYPERLINK")  # starts with a newline: not a formula
        assert row["margin"] == "0.0" and row["strength"] == "2" and row["chosen_safe"] == "true"

    def test_csv_quoting_reads_back_with_the_csv_module(self):
        tricky = ['say "hi", twice', "line\nbreak", "cr\r\nlf", "", "plain", '"', ",", "ünïcödé 🙂", " lead"]
        rows = [{"prompt": t, "chosen": t[::-1], "rejected": "x", "id": i} for i, t in enumerate(tricky)]
        text = b"".join(exports.stream_csv(iter(rows), fields=("id", "prompt", "chosen", "rejected"))).decode()
        table = list(csv.reader(io.StringIO(text, newline="")))
        assert table[0] == ["id", "prompt", "chosen", "rejected"]
        assert [r[1:3] for r in table[1:]] == [[t, t[::-1]] for t in tricky]

    @pytest.mark.parametrize("value, cell", [
        ("=1+1", "'=1+1"), ("-2", "'-2"), ("+x", "'+x"), ("@x", "'@x"), ("\tx", "'\tx"), ("\rx", "'\rx"),
        ("plain", "plain"), ("", ""), (None, ""), (-1.5, "-1.5"), (True, "true"),
        ([{"role": "user", "content": "=x"}], '[{"role":"user","content":"=x"}]'),
    ])
    def test_csv_cell(self, value, cell):
        assert exports.csv_cell(value) == cell


class TestStreaming:
    def test_stream_is_lazy(self):
        """The first chunk comes out before the rows run out: nothing is collected into a list."""
        row = {"prompt": "p" * 1000, "chosen": "c", "rejected": "r"}
        endless = itertools.repeat(row)  # would never finish if the writer built a list
        first = next(exports.stream_jsonl(endless))
        assert len(first) >= exports.STREAM_CHUNK_BYTES
        assert json.loads(first.split(b"\n")[0]) == row
        assert next(exports.stream_csv(endless)).startswith(b"id,comparison_id,prompt")

    def test_export_queryset_is_one_query_with_a_server_side_iterator(self, make_comparison, annotator,
                                                                      django_assert_num_queries):
        for _ in range(3):
            judge(make_comparison(), annotator)
        rows = exports.export_rows(Judgment.objects.all(), options=exports.ExportOptions())
        with django_assert_num_queries(1):
            assert len(list(rows)) == 3


class TestHuggingFace:
    def test_datasets_reads_the_export_as_it_is(self, researcher_client, dialogue, make_comparison, annotator,
                                                 tmp_path):
        datasets = pytest.importorskip("datasets")
        judge(dialogue, annotator, chosen="B", strength=3)
        judge(make_comparison(), annotator, chosen="A", strength=0, a_safe=True, b_safe=False)
        for query, name in (("?margin=small", "conv.jsonl"), ("?format=text", "text.jsonl")):
            response = researcher_client.get(f"/api/v1/export/preferences{query}")
            (tmp_path / name).write_bytes(b"".join(response.streaming_content))
        conv = datasets.load_dataset("json", data_files=str(tmp_path / "conv.jsonl"), split="train")
        assert conv.num_rows == 2 and set(exports.ROW_FIELDS) == set(conv.column_names)
        assert conv[0]["prompt"][-1] == {"role": "user", "content": "And in winter?"}
        assert conv[0]["chosen"] == [{"role": "assistant", "content": "Snowy and dark."}]
        assert conv["margin"] == [1.0, 0.0] and conv["strength"] == [3, 0]
        text = datasets.load_dataset("json", data_files=str(tmp_path / "text.jsonl"), split="train")
        assert text[0]["prompt"].endswith("\n\nHuman: And in winter?\n\nAssistant: ")
        assert text[0]["chosen"] == "Snowy and dark."
