"""The README's `manage.py simulate_annotators` command against a live server holding the hand-written demo
and demo-world comparisons: what it judges, what it leaves, what it prints, and whether its numbers agree
with a count made from the database and the oracle."""
import io
import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
from django.core.management import call_command

from annotation.models import Assignment, Comparison, Judgment
from annotation.simulator import WORLD_TAG
from policy.demo_world import default_world, judge, prefer

STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better / unsure")
REPORT = re.compile(
    r"^(?P<who>.+?): submitted (?P<submitted>\d+), replayed (?P<replayed>\d+), "
    r"given back \(prompt not of the demo world\) (?P<given_back>\d+)\n"
    r"  agreement with the oracle (?P<agreement>[\d.]+|-)%?, flip rate (?P<flip_rate>[\d.]+|-)%?, "
    r"safety labels flipped (?P<labels_flipped>\d+) of (?P<labels>\d+)\n"
    r"  strength: " + ", ".join(f"{re.escape(name)} (?P<s{3 - i}>\\d+)" for i, name in enumerate(STRENGTHS)) + "\n"
    r"  time: (?P<seconds>[\d.]+) s, (?P<per_second>[\d.]+|-) judgments/s$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


def simulate(url: str, *args: str) -> str:
    out = io.StringIO()
    call_command("simulate_annotators", "--base-url", url, *args, stdout=out)
    return out.getvalue()


def reports(printout: str) -> dict[str, dict[str, float | None]]:
    """Each report (four lines) of the printout by who it is about, every number by its label (None: "-")."""
    return {match["who"]: {k: None if v == "-" else float(v) for k, v in match.groupdict().items() if k != "who"}
            for match in REPORT.finditer(printout)}


def simulated_judgments():
    return Judgment.objects.filter(source="simulated").select_related(
        "comparison__prompt", "comparison__response_a", "comparison__response_b")


def oracle(judgment: Judgment):
    prompt = judgment.comparison.prompt
    return prefer(SimpleNamespace(text=prompt.text, context=prompt.context, is_adversarial=prompt.is_adversarial),
                  judgment.comparison.response_a.text, judgment.comparison.response_b.text)


@pytest.mark.django_db(transaction=True)
def test_the_readme_command_judges_demo_world_comparisons_only_and_says_what_it_did(live_server, make_user):
    call_command("demo_setup", stdout=io.StringIO())  # 34 hand-written comparisons, overlap 2, first in line
    demo_items = Comparison.objects.filter(origin=Comparison.Origin.DEMO).count()
    assert demo_items == 34

    printout = simulate(live_server.url, "--annotators", "2", "--items", "10", "--seed-world", "12")
    assert "Created 12 demo-world comparisons." in printout
    numbers = reports(printout)
    assert set(numbers) == {"sim-annotator-1", "sim-annotator-2", "total, 2 annotators"}, printout
    total = numbers.pop("total, 2 annotators")
    judgments = list(simulated_judgments())
    assert total["submitted"] == sum(n["submitted"] for n in numbers.values()) == len(judgments) == 12
    assert total["replayed"] == total["given_back"] == 0
    # Every judgment is on a demo-world prompt; no hand-written item was even leased, nothing was skipped.
    assert all(WORLD_TAG in j.comparison.prompt.tags and j.comparison.origin == "simulation" for j in judgments)
    assert not Assignment.objects.filter(annotator__groups__name="simulated", comparison__origin="demo").exists()
    assert not Assignment.objects.filter(status=Assignment.Status.SKIPPED).exists()
    # The printed numbers are the database's.
    assert [total[f"s{k}"] for k in (3, 2, 1, 0)] == [Counter(j.strength for j in judgments)[k] for k in (3, 2, 1, 0)]
    against = sum(j.chosen != oracle(j).choice for j in judgments)
    assert total["flip_rate"] == round(100 * against / 12, 1) and total["agreement"] + total["flip_rate"] == 100
    labels = sum((j.a_safe != oracle(j).a_safe) + (j.b_safe != oracle(j).b_safe) for j in judgments)
    assert (total["labels_flipped"], total["labels"]) == (labels, 24)
    seconds = total["seconds"]  # printed to 0.1 s, judgments/s to 0.1
    assert 0 < seconds and 12 / (seconds + 0.05) - 0.05 <= total["per_second"] <= 12 / (seconds - 0.05) + 0.05
    # People still have every demo item: the first person to ask gets the first of them.
    person = make_user("person")
    from annotation import services

    assert services.assignment_lease_next(annotator=person).comparison.origin == Comparison.Origin.DEMO

    again = simulate(live_server.url, "--annotators", "2", "--items", "10", "--seed-world", "12")
    assert "Created 0 demo-world comparisons (seed 0 made them before; another --seed makes new ones)." in again
    assert reports(again)["total, 2 annotators"]["submitted"] == 0
    assert "Nothing to judge: no open comparison of a demo-world prompt" in again
    assert simulated_judgments().count() == 12
    assert "Created 3 demo-world comparisons." in (third := simulate(
        live_server.url, "--annotators", "2", "--items", "10", "--seed-world", "3", "--seed", "1"))
    assert reports(third)["total, 2 annotators"]["submitted"] == 3 and simulated_judgments().count() == 15


@pytest.mark.django_db(transaction=True)
def test_agreement_with_the_oracle_at_noise_0_1_matches_the_database_and_the_noise_model(live_server):
    n, noise = 60, 0.1
    printout = simulate(live_server.url, "--annotators", "1", "--items", str(n), "--seed-world", str(n),
                        "--noise", str(noise), "--seed", "4")
    printed = reports(printout)["sim-annotator-1"]
    judgments = list(simulated_judgments())
    assert printed["submitted"] == len(judgments) == n
    agree = sum(j.chosen == oracle(j).choice for j in judgments)  # counted from the rows, not the simulator
    assert printed["agreement"] == round(100 * agree / n, 1)
    # Expected from the noise model: P(agree) = sigmoid(margin / noise) per comparison (a tie: one half).
    world = default_world()
    expected = []
    for j in judgments:
        c = j.comparison
        wp = SimpleNamespace(text=c.prompt.text, context=c.prompt.context, is_adversarial=c.prompt.is_adversarial)
        va, vb = judge(wp, c.response_a.text, world), judge(wp, c.response_b.text, world)
        margin = 1.0 if va.safe != vb.safe else abs(va.helpful_score - vb.helpful_score)
        expected.append(1 / (1 + math.exp(-margin / noise)))
    mean = sum(expected) / n
    sd = math.sqrt(sum(p * (1 - p) for p in expected)) / n
    assert abs(agree / n - mean) < 4 * sd + 1e-9, (agree, mean, sd)
    assert agree / n >= 0.8 and mean > 0.85  # demo-world pairs are mostly clear-cut


@pytest.mark.django_db(transaction=True)
def test_the_command_says_when_there_is_nothing_to_judge_and_when_no_server_answers(live_server):
    from django.core.management.base import CommandError

    call_command("demo_setup", stdout=io.StringIO())  # only hand-written items: nothing for the simulator
    printout = simulate(live_server.url, "--annotators", "1", "--items", "5")
    assert reports(printout)["total, 1 annotator"]["submitted"] == 0
    assert "Nothing to judge" in printout and "--seed-world N" in printout
    assert not Assignment.objects.exists()
    with pytest.raises(CommandError, match="No Tandem server answers at http://127.0.0.1:9"):
        simulate("http://127.0.0.1:9", "--items", "1")
