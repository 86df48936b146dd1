"""The simulated annotator: its noise model against the formula, and a run through the real REST API of a
live server whose judgments are recorded as simulated and kept out of human statistics and default exports."""
import math
from types import SimpleNamespace

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from annotation import exports, services
from annotation.models import Comparison, Judgment
from annotation.simulator import SimulatedAnnotator, simulated_annotator_create, simulation_comparisons_create
from policy.demo_world import default_world, prefer
from webapp import dashboard


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


def _annotator(noise: float, seed: int = 0) -> SimulatedAnnotator:
    return SimulatedAnnotator("http://unused", "tdm_unused", noise=noise, seed=seed, label_noise=0.0)


def test_noise_flips_with_the_logistic_probability_of_the_margin_and_sets_strength():
    world = default_world()
    prompt = next(p for p in world.prompts("train") if p.intent.kind == "capital" and not p.context)
    ask = {"text": prompt.text, "context": [], "is_adversarial": False}
    fact = prompt.intent.fact
    reference = fact.statement  # score 1.0
    rude = f"{fact.answer}. Stop asking stupid questions."  # correct, not polite: 0.6 + 0.4 * 0.4 = 0.76
    wrong = world.answer(prompt, "wrong", __import__("random").Random(0))  # wrong and polite: 0.3
    assert prefer(prompt, reference, rude).choice == "A"
    oracle = _annotator(0.0)
    for a, b in [(reference, rude), (rude, reference), (reference, wrong)]:
        judgment, flipped = oracle.decide(ask, a, b)
        assert not flipped and judgment["chosen"] == prefer(prompt, a, b).choice
    assert oracle.decide(ask, reference, wrong)[0]["strength"] == 3  # margin 0.7: significantly better

    n = 2000
    for margin, b in [(0.24, rude), (0.7, wrong)]:
        noisy = _annotator(0.1, seed=7)
        decisions = [noisy.decide(ask, reference, b) for _ in range(n)]
        flips = sum(f for _, f in decisions) / n
        expected = 1 / (1 + math.exp(margin / 0.1))  # sigmoid(-margin / noise)
        assert abs(flips - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, (margin, flips, expected)
        assert all((j["chosen"] == "B") == f for j, f in decisions)  # a flip picks the other side
        strengths = [j["strength"] for j, _ in decisions]
        if margin > 0.5:
            # strength 3 needs a perceived margin >= 0.5: probability sigmoid((0.7 - 0.5) / 0.1) = 0.881
            assert flips < 0.003 and abs(strengths.count(3) / n - 1 / (1 + math.exp(-2))) < 0.03
        else:
            assert 0.05 < flips < 0.1 and max(strengths.count(k) for k in range(4)) < 0.8 * n  # spread out
            flipped_strengths = [j["strength"] for j, f in decisions if f]
            assert sum(flipped_strengths) / len(flipped_strengths) < 1  # mistakes are mostly "unsure"


def test_safety_decides_first_and_labels_follow_the_oracle():
    world = default_world()
    prompt = next(p for p in world.prompts("train") if p.is_adversarial)
    ask = {"text": prompt.text, "context": [], "is_adversarial": True}
    refusal = world.reference_answer(prompt)
    unsafe = world.answer(prompt, "unsafe", __import__("random").Random(1))
    judgment, flipped = _annotator(0.1).decide(ask, unsafe, refusal)
    assert judgment["chosen"] == "B" and judgment["strength"] == 3 and not flipped
    assert (judgment["a_safe"], judgment["b_safe"]) == (False, True)
    labels = SimulatedAnnotator("http://unused", "x", noise=0.1, seed=3, label_noise=0.5)
    flips = sum(labels.decide(ask, unsafe, refusal)[0]["a_safe"] for _ in range(400))
    assert 140 < flips < 260  # label noise 0.5: the unsafe answer is called safe about half the time


@pytest.mark.django_db(transaction=True)
def test_judges_through_the_live_api_as_simulated_and_stays_out_of_human_statistics(live_server, make_user):
    made = simulation_comparisons_create(count=12, seed=3, overlap=2)
    assert len(made) == 12 and {c.origin for c in made} == {Comparison.Origin.SIMULATION}
    assert all(c.response_a.text != c.response_b.text for c in made)
    assert simulation_comparisons_create(count=12, seed=3) == []  # the same world is not made twice
    user, token = simulated_annotator_create(username="sim-1")
    other, other_token = simulated_annotator_create(username="sim-2")
    with pytest.raises(ValidationError):
        simulated_annotator_create(username=make_user("human-ann").username)

    report = SimulatedAnnotator(live_server.url, token, noise=0.1, seed=1).run(max_items=5)
    assert report.submitted == 5 and sum(report.by_strength.values()) == 5
    rest = SimulatedAnnotator(live_server.url, token, noise=0.1, seed=2).run(max_items=100)
    assert rest.submitted == 7  # stops when nothing is left for this annotator (204)
    SimulatedAnnotator(live_server.url, other_token, noise=0.1, seed=3).run(max_items=100)
    judgments = Judgment.objects.filter(annotator__in=[user, other])
    assert judgments.count() == 24 and set(judgments.values_list("source", flat=True)) == {"simulated"}
    # Decisions are the oracle's unless flipped, on the comparison's own A/B (not the screen sides).
    agree = sum(j.chosen == prefer(SimpleNamespace(text=j.comparison.prompt.text, context=j.comparison.prompt.context,
                                                   is_adversarial=j.comparison.prompt.is_adversarial),
                                   j.comparison.response_a.text, j.comparison.response_b.text).choice
                for j in judgments.select_related("comparison__prompt", "comparison__response_a",
                                                  "comparison__response_b"))
    assert agree >= 18

    # One human judgment beside them: the dashboard and the default export see only it.
    human = make_user("person")
    mine = services.comparison_create(prompt=made[0].prompt, response_a=made[0].response_b,
                                      response_b=made[0].response_a, origin=Comparison.Origin.DEMO)
    assignment = services.assignment_lease_next(annotator=human)
    assert assignment.comparison_id == mine.pk
    services.judgment_submit(assignment=assignment, annotator=human, chosen="A", strength=1,
                             safety=services.SafetyLabels(a_safe=True, b_safe=True))
    assert dashboard.throughput()["today"] == 1 and dashboard.throughput()["week_annotators"] == 1
    overall, _ = dashboard.agreement_by_batch()
    assert overall.comparisons == 0  # the 12 doubly judged comparisons are all simulated
    options = exports.ExportOptions()
    default = list(exports.export_rows(exports.exportable_judgments(), options=options))
    assert [r["source"] for r in default] == ["human"]
    only_simulated = list(exports.export_rows(exports.exportable_judgments(source="simulated").filter(
        source="simulated"), options=options))
    assert len(only_simulated) == 24 - sum(j.safety_bin == "chosen_unsafe_other_safe" for j in judgments)


@pytest.mark.django_db(transaction=True)
def test_api_export_and_command(live_server, make_user):
    import requests

    from webapp.auth import api_token_issue

    call_command("simulate_annotators", "--base-url", live_server.url, "--annotators", "2", "--items", "3",
                 "--seed-world", "4", "--overlap", "2")
    assert Judgment.objects.filter(source="simulated").count() == 6
    # Run again with the same seed and accounts: new submissions, not replays of the first run's keys.
    call_command("simulate_annotators", "--base-url", live_server.url, "--annotators", "2", "--items", "1")
    assert Judgment.objects.filter(source="simulated").count() == 8
    researcher = make_user("reader", role="researcher")
    _, token = api_token_issue(user=researcher, name="t")
    headers = {"Authorization": f"Bearer {token}"}
    default = requests.get(f"{live_server.url}/api/v1/export/preferences", headers=headers, timeout=30)
    assert default.status_code == 200 and default.text == ""
    asked = requests.get(f"{live_server.url}/api/v1/export/preferences?source=simulated", headers=headers, timeout=30)
    assert asked.status_code == 200 and asked.text.count('"source":"simulated"') == len(asked.text.splitlines()) > 0
