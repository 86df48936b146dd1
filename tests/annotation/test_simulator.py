"""The simulated annotator: its noise model against the formula, and a run through the real REST API of a
live server whose judgments are recorded as simulated and kept out of human statistics and default exports."""
import math
from types import SimpleNamespace

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from annotation import demo, exports, services
from annotation.models import Comparison, Judgment, Prompt
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
        judgment, flipped, _ = oracle.decide(ask, a, b)
        assert not flipped and judgment["chosen"] == prefer(prompt, a, b).choice
    assert oracle.decide(ask, reference, wrong).judgment["strength"] == 3  # margin 0.7: significantly better

    n = 2000
    for margin, b in [(0.24, rude), (0.7, wrong)]:
        noisy = _annotator(0.1, seed=7)
        decisions = [noisy.decide(ask, reference, b) for _ in range(n)]
        flips = sum(d.flipped for d in decisions) / n
        expected = 1 / (1 + math.exp(margin / 0.1))  # sigmoid(-margin / noise)
        assert abs(flips - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, (margin, flips, expected)
        assert all((j["chosen"] == "B") == f for j, f, _ in decisions)  # a flip picks the other side
        strengths = [d.judgment["strength"] for d in decisions]
        if margin > 0.5:
            # strength 3 needs a perceived margin >= 0.5: probability sigmoid((0.7 - 0.5) / 0.1) = 0.881
            assert flips < 0.003 and abs(strengths.count(3) / n - 1 / (1 + math.exp(-2))) < 0.03
        else:
            assert 0.05 < flips < 0.1 and max(strengths.count(k) for k in range(4)) < 0.8 * n  # spread out
            flipped_strengths = [j["strength"] for j, f, _ in decisions if f]
            assert sum(flipped_strengths) / len(flipped_strengths) < 1  # mistakes are mostly "unsure"


def test_safety_decides_first_and_labels_follow_the_oracle():
    world = default_world()
    prompt = next(p for p in world.prompts("train") if p.is_adversarial)
    ask = {"text": prompt.text, "context": [], "is_adversarial": True}
    refusal = world.reference_answer(prompt)
    unsafe = world.answer(prompt, "unsafe", __import__("random").Random(1))
    judgment, flipped, labels_flipped = _annotator(0.1).decide(ask, unsafe, refusal)
    assert judgment["chosen"] == "B" and judgment["strength"] == 3 and not flipped and labels_flipped == 0
    assert (judgment["a_safe"], judgment["b_safe"]) == (False, True)
    labels = SimulatedAnnotator("http://unused", "x", noise=0.1, seed=3, label_noise=0.5)
    decisions = [labels.decide(ask, unsafe, refusal) for _ in range(400)]
    flips = sum(d.judgment["a_safe"] for d in decisions)
    assert 140 < flips < 260  # label noise 0.5: the unsafe answer is called safe about half the time
    # labels_flipped counts the labels that differ from the oracle's (False, True)
    assert all(d.labels_flipped == d.judgment["a_safe"] + (not d.judgment["b_safe"]) for d in decisions)


def test_the_oracle_judges_only_its_worlds_prompts():
    """The hand-written demo items read as free-form prompts to the oracle, which prefers their sloppy
    answer more often than not: the simulator refuses them (ValueError: give it back)."""
    world = default_world()
    oracle = _annotator(0.0)
    misjudged = 0
    for index, item in enumerate(demo.ITEMS):
        context = [{"role": r, "content": t} for u, a in item.context for r, t in (("user", u), ("assistant", a))]
        ask = {"text": item.prompt, "context": context, "is_adversarial": item.adversarial}
        with pytest.raises(ValueError, match="not a prompt of the demo world"):
            oracle.decide(ask, item.careful, item.sloppy)
        misjudged += prefer(SimpleNamespace(**ask), item.careful, item.sloppy).choice == "B"
    assert misjudged > len(demo.ITEMS) / 2  # why: the oracle would invert most of these labels
    follow_up = next(p for p in world.prompts() if p.context)
    ask = {"text": follow_up.text, "context": [dict(t) for t in follow_up.context]}
    reference = world.reference_answer(follow_up)
    assert oracle.decide(ask, reference, "No.").judgment["chosen"] == "A"  # a two-turn prompt of the world
    with pytest.raises(ValueError):  # the same words after another conversation are not the world's prompt
        oracle.decide({**ask, "context": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                      reference, "No.")


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


# --- what a simulated annotator is leased ---------------------------------------------------------------

def _all_leasable(user, tags=()) -> list[int]:
    """Every comparison the lease offers `user` with these tags, in order (each skipped to reach the next)."""
    seen = []
    while (assignment := services.assignment_lease_next(annotator=user, tags=tags)) is not None:
        seen.append(assignment.comparison_id)
        services.assignment_skip(assignment=assignment, annotator=user)
    return seen


@pytest.mark.django_db
def test_the_lease_takes_only_prompts_that_carry_every_tag(make_comparison, make_user):
    def tagged(tags):
        comparison = make_comparison()
        Prompt.objects.filter(pk=comparison.prompt_id).update(tags=tags)
        return comparison.pk

    plain = make_comparison().pk
    near = [tagged(t) for t in (["demo-world-2"], ["Demo-World"], ['say "demo-world"'], ["x demo-world"])]
    world, held = tagged(["demo-world", "capital", "train"]), tagged(["heldout", "demo-world"])
    accented = tagged(["café", "demo-world"])
    users = iter(make_user(f"u{i}") for i in range(10))
    assert _all_leasable(next(users), ["demo-world"]) == [world, held, accented]
    assert _all_leasable(next(users), ["demo-world", "heldout"]) == [held]
    assert _all_leasable(next(users), ["café"]) == [accented]
    assert _all_leasable(next(users), ["Demo-World"]) == [near[1]]  # tags are case-sensitive
    assert _all_leasable(next(users), ['say "demo-world"']) == [near[2]]
    assert _all_leasable(next(users), ["demo"]) == []
    assert _all_leasable(next(users)) == [plain, *near, world, held, accented]
    # Tags choose among new leases: a lease already held comes back first, whatever it carries.
    holder = next(users)
    assert services.assignment_lease_next(annotator=holder).comparison_id == plain
    assert services.assignment_lease_next(annotator=holder, tags=["demo-world"]).comparison_id == plain


@pytest.mark.django_db
def test_simulated_accounts_are_leased_demo_world_prompts_only(make_user):
    from rest_framework.test import APIClient

    from webapp.auth import api_token_issue

    demo.demo_load()  # 34 hand-written comparisons, before the world's in id order
    made = simulation_comparisons_create(count=2, seed=5)

    def client(user=None, token=None):
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {token or api_token_issue(user=user, name='t')[1]}")
        return api

    person = client(make_user("person"))
    facts = person.post("/api/v1/assignments/next?tag=facts")
    assert facts.status_code == 200 and "facts" in Comparison.objects.get(
        pk=facts.json()["comparison"]["id"]).prompt.tags
    _, token = simulated_annotator_create(username="sim-lease")
    simulated = client(token=token)
    ids = []
    for _ in range(3):  # asking for nothing, it gets the world's two and then nothing
        leased = simulated.post("/api/v1/assignments/next")
        if leased.status_code == 204:
            break
        ids.append(leased.json()["comparison"]["id"])
        assert simulated.post(f"/api/v1/assignments/{leased.json()['id']}/skip").status_code == 200
    assert ids == [c.pk for c in made]
    _, token = simulated_annotator_create(username="sim-asks-for-facts")
    assert client(token=token).post("/api/v1/assignments/next?tag=facts").status_code == 204  # not demo-world

    for bad in ("tag=", "tag=" + "x" * 51, "&".join(["tag=x"] * 21), "tag=%00"):
        answer = person.post(f"/api/v1/assignments/next?{bad}")
        assert answer.status_code == 400 and "tag" in answer.json(), bad
    assert person.get("/api/v1/assignments?tag=facts").status_code == 400  # only the lease takes tags
    schema = person.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    [tag] = [p for p in schema["paths"]["/api/v1/assignments/next"]["post"]["parameters"] if p["name"] == "tag"]
    assert tag["in"] == "query" and tag["schema"]["type"] == "array" and "demo-world" in tag["description"]


@pytest.mark.django_db(transaction=True)
def test_a_prompt_not_of_the_world_is_given_back_to_people(live_server, make_user):
    """Tagged demo-world by mistake, a person's prompt still reaches the simulator (the server goes by the
    tag): the simulator gives it back without judging, and a person is then leased it."""
    made = simulation_comparisons_create(count=1, seed=9)[0]
    mislabelled = services.comparison_push(
        text="Which of my two drafts reads better?", tags=["demo-world"],
        response_a=services.ResponseInput(text="The first.", checkpoint="ext-a"),
        response_b=services.ResponseInput(text="The second.", checkpoint="ext-b"))
    _, token = simulated_annotator_create(username="sim-give-back")
    report = SimulatedAnnotator(live_server.url, token, noise=0.1, seed=0).run(max_items=10)
    assert (report.submitted, report.unjudgeable) == (1, 1)
    assert Judgment.objects.get().comparison_id == made.pk
    assert services.assignment_lease_next(annotator=make_user("person")).comparison_id == mislabelled.pk
