"""A round's evaluation against its parent, its verdict and what follows from it; the recipe by model size;
the refusals at launch; the warnings a researcher sees."""
from __future__ import annotations

import json
import math

import pytest
import torch
from django.core.exceptions import ValidationError
from django.core.management import call_command

from annotation import services as annotation_services
from annotation.models import Judgment
from policy import recipes, rounds, selectors, services
from policy.models import Checkpoint, GenerationJob, RLHFRound
from policy.round_config import RoundConfig
from policy.round_eval import compare_scores
from policy.stats import verdict_of, wilson_interval, win_rate_summary
from tests.policy import round_fixtures as rf
from tests.policy.test_rounds import launch, round_world, world  # noqa: F401 (fixtures)
from webapp.jobs import JobStatus
from workers import rounds as round_worker


# --- statistics and recipes, against independent computations ---------------------------------------------

def test_wilson_interval_matches_the_quadratic_it_solves():
    # The Wilson bounds are the two p where (phat - p)^2 = z^2 p (1 - p) / n: solve that quadratic directly.
    for successes, n in [(62, 100), (0, 20), (20, 20), (130.5, 200), (3, 7)]:
        phat, z = successes / n, 1.96
        a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
        roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
        assert wilson_interval(successes, n) == pytest.approx(tuple(roots), abs=1e-12)


def test_win_rate_counts_ties_half_and_the_verdict_follows_the_interval():
    row = win_rate_summary(62, 16, 122)
    assert row["n"] == 200 and row["win_rate"] == pytest.approx((62 + 61) / 200)
    assert verdict_of(row) == "improved"  # 61.5%, CI 54.6-68.0 (bench/bench_loop.py, run D)
    assert verdict_of(win_rate_summary(16, 62, 122)) == "regression"
    assert verdict_of(win_rate_summary(14, 10, 176)) == "no_difference"
    assert verdict_of(None) == ""
    # Exact one-sided sign test: 9 wins of 10 decided pairs has p = 11 / 1024.
    assert win_rate_summary(9, 1, 5)["sign_test_p"] == pytest.approx(11 / 1024)


def test_compare_scores_identical_answers_are_ties():
    row = compare_scores([1.0, 2.0, 0.5, 3.0], [0.0, 2.5, 0.5, 1.0], [False, False, False, True])
    assert (row["wins"], row["losses"], row["ties"]) == (1, 1, 2)


@pytest.mark.parametrize("params", [
    dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=400, multiple_of=16),
    dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=3, vocab_size=1024, multiple_of=64),
    dict(dim=96, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, ffn_dim_multiplier=1.3),
])  # fmt: skip
def test_parameter_count_equals_the_models_own(params):
    from policy.model import ModelArgs, Transformer

    model = Transformer(ModelArgs(**params, max_seq_len=32))
    assert recipes.parameter_count(params) == sum(p.numel() for p in model.parameters())


def test_the_recipe_follows_the_policys_size():
    small = dict(dim=192, n_layers=4, n_heads=6, vocab_size=1024, multiple_of=64)
    seven_b = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)
    assert recipes.parameter_count(seven_b) == 6_738_415_616  # Llama 2 7B
    assert RoundConfig.for_policy({}, small) == RoundConfig()
    paper = RoundConfig.for_policy({"ppo": {"n_iterations": 300}}, seven_b)
    assert (paper.ppo.kl_coef, paper.ppo.lr, paper.ppo.batch_size, paper.sft.lr) == (0.01, 1e-6, 512, 2e-5)
    assert paper.ppo.n_iterations == 300  # the user's value wins over the recipe
    assert recipes.scale_of({}) == "paper"  # unknown size: the cautious recipe


# --- launch refusals ------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_launch_refuses_what_cannot_be_evaluated_or_trained(world):
    with pytest.raises(ValidationError) as caught:
        launch(world, stages=["ppo", "rejection_sampling", "sft"])
    assert "order" in caught.value.message_dict["stages"][0]
    with pytest.raises(ValidationError) as caught:
        launch(world, eval_prompts=world["prompts"][:3])
    assert "never trained on" in caught.value.message_dict["eval_prompts"][0]
    with pytest.raises(ValidationError) as caught:
        launch(world, config={**rf.TINY_ROUND, "evaluation": {"min_prompts": 5}})
    assert "config.evaluation.min_prompts = 5" in caught.value.message_dict["prompts"][0]
    with pytest.raises(ValidationError) as caught:
        launch(world, stages=["rejection_sampling", "sft", "ppo"],
               config={**rf.TINY_ROUND, "ppo": {**rf.TINY_ROUND["ppo"], "batch_size": 8, "mini_batch_size": 4}})
    assert "at least 8 training prompts" in caught.value.message_dict["config.ppo.batch_size"][0]
    with pytest.raises(ValidationError) as caught:
        launch(world, eval_prompts=[])
    assert "empty" in caught.value.message_dict["eval_prompts"][0]
    assert not RLHFRound.objects.exists()
    # Evaluation prompts of their own: all of the round's prompts train.
    extra = rf.demo_prompts(4, seed=9)
    rnd = launch(world, eval_prompts=extra)
    assert set(rnd.eval_prompts.values_list("pk", flat=True)) == {p.pk for p in extra}


# --- the evaluation, end to end ------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_round_evaluates_itself_and_reports_it(world, tmp_path):
    config = {**rf.TINY_ROUND, "evaluation": {**rf.TINY_ROUND["evaluation"], "human_comparisons": 2}}
    rnd = launch(world, stages=["rejection_sampling", "sft"], config=config)
    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    evaluation = rnd.metrics["evaluation"]
    held_out = rnd.metrics["eval_prompt_ids"]
    assert evaluation["n"] == len(held_out) == 2
    for key in ("helpfulness_rm", "safety_rm"):
        row = evaluation[key]
        assert row["wins"] + row["losses"] + row["ties"] == 2 and 0 <= row["ci95"][0] <= row["ci95"][1] <= 1
    assert rnd.verdict == evaluation["verdict"] and rnd.verdict in ("improved", "no_difference", "regression")
    answers = [json.loads(line) for line in
               (rounds.round_dir(rnd) / "evaluation" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(set(a) == {"index", "prompt", "new", "parent"} for a in answers)
    assert rnd.checkpoint_out.held_back == (rnd.verdict == "regression")
    assert "held-out prompts" in rounds.evaluation_line(evaluation)
    # Pairs that differ went to people as comparisons of the new checkpoint against its parent.
    sent = list(rnd.human_eval_comparisons.select_related("response_a", "response_b"))
    differing = sum(a["new"] != a["parent"] for a in answers)
    assert len(sent) == differing
    assert all({c.response_a.checkpoint_id, c.response_b.checkpoint_id} == {rnd.checkpoint_out_id, rnd.policy_in_id}
               for c in sent)


@pytest.mark.django_db
def test_people_judge_the_evaluation_pairs(world, make_user):
    rnd = launch(world, stages=["rejection_sampling", "sft"])
    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    assert selectors.round_human_win_rate(rnd=rnd) is None
    prompt = world["prompts"][0]
    from annotation.models import Comparison, Response

    pairs = []
    for text in ("x", "y", "z"):
        new = Response.objects.create(prompt=prompt, checkpoint=rnd.checkpoint_out, text=f"new {text}")
        old = Response.objects.create(prompt=prompt, checkpoint=rnd.policy_in, text=f"old {text}")
        pairs.append(annotation_services.comparison_create(prompt=prompt, response_a=old, response_b=new,
                                                           origin=Comparison.Origin.SAMPLING))
    rnd.human_eval_comparisons.set(pairs)
    person = make_user("judge")
    for comparison, (chosen, strength) in zip(pairs, [("B", 3), ("B", 1), ("A", 0)]):
        assignment = annotation_services.assignment_lease_next(annotator=person)
        assert assignment.comparison_id == comparison.pk
        annotation_services.judgment_submit(assignment=assignment, annotator=person, chosen=chosen, strength=strength,
                                            safety=annotation_services.SafetyLabels(True, True),
                                            idempotency_key=f"k-{comparison.pk}")
    row = selectors.round_human_win_rate(rnd=rnd)
    assert (row["wins"], row["losses"], row["ties"], row["n"]) == (2, 0, 1, 3)  # B is the new one; strength 0 ties
    assert Judgment.objects.count() == 3


@pytest.mark.django_db
def test_a_regression_is_held_back_and_the_parent_answers_next_week(world, monkeypatch):
    from policy import round_eval

    real = round_eval.evaluate_against_parent

    def worse(*args, **kwargs):
        result = real(*args, **kwargs)
        result.update(verdict="regression", helpfulness_rm=win_rate_summary(0, 40, 0), verdict_source="reward_models")
        return result

    monkeypatch.setattr(round_eval, "evaluate_against_parent", worse)
    rnd = launch(world, stages=["rejection_sampling", "sft"])
    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    assert rnd.verdict == RLHFRound.Verdict.REGRESSION and rnd.checkpoint_out.held_back
    job = GenerationJob.objects.get(pk=rnd.metrics["next_batch_job"])
    assert job.arm_a_checkpoint_id == job.arm_b_checkpoint_id == rnd.policy_in_id
    assert "regression" in rnd.progress_message
    assert any("worse than its parent" in w for w in rounds.round_warnings(rnd))
    # Default arms leave the held-back checkpoint out until an admin releases it.
    assert rnd.checkpoint_out not in [arm.checkpoint for arm in services.generation_arms_default()]
    services.checkpoint_release(checkpoint=rnd.checkpoint_out)
    assert services.generation_arms_default()[0].checkpoint == rnd.checkpoint_out
    with pytest.raises(ValidationError):
        services.checkpoint_release(checkpoint=rnd.checkpoint_out)


def test_ppo_that_kept_iteration_0_says_why():
    rnd = RLHFRound(config=RoundConfig().to_dict(), status=JobStatus.SUCCEEDED, verdict="no_difference", metrics={
        "prompts": 40, "ppo": {"iterations": 12, "best_iteration": 0,
                               "curve": [{"iteration": i, "clipfrac": 0.0, "kl": 0.01} for i in range(1, 13)]}})
    found = rounds.round_warnings(rnd)
    assert any("iteration 0" in w and "raise ppo.lr" in w for w in found), found
    rnd.metrics["ppo"]["curve"] = [{"iteration": 1, "clipfrac": 0.2, "kl": 30.0}]
    assert any("lower ppo.kl_coef" in w for w in rounds.round_warnings(rnd))
    rnd.metrics["ppo"]["best_iteration"] = 5
    assert not any("iteration 0" in w for w in rounds.round_warnings(rnd))


def test_reward_model_warnings():
    from rewards.evaluate import accuracy_warnings

    def run(accuracy, n, baseline):
        return {"all": {"accuracy": accuracy, "n": n, "length_baseline": {"accuracy": baseline}}}

    assert accuracy_warnings(run(0.72, 180, 0.45)) == []
    below = accuracy_warnings(run(0.492, 60, 0.635))
    assert len(below) == 2 and "not above chance" in below[0] and "length-only baseline" in below[1]
    assert "not above chance" in accuracy_warnings(run(0.58, 30, 0.4))[0]  # CI 40-74%
    assert "No held-out pairs" in accuracy_warnings({})[0]


# --- the whole loop as one command ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_demo_loop_fast_runs_the_readme_loop(round_world, settings, tmp_path, monkeypatch, capsys):
    settings.TANDEM_MODEL_ROOTS = [tmp_path / "models", rf.MODEL_ROOT]
    settings.TANDEM_DEFAULT_ARMS = ""
    monkeypatch.setattr(rounds, "_enqueue_round", lambda round_id: None)
    monkeypatch.setattr(services, "_enqueue_generation", lambda job_id: None)
    torch.set_num_threads(1)
    base, sft = services.demo_checkpoints_register(built=round_world["checkpoints"])
    out = tmp_path / "loop.json"
    call_command("demo_loop", "--fast", "--policy", base.name, "--rm-base", sft.name, "--json", str(out))
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [s["step"] for s in result["steps"]] == ["policy answers", "simulated judgments", "freeze", "reward models",
                                                    "round"]
    assert {rm["kind"] for rm in result["reward_models"]} == {"helpfulness", "safety"}
    assert result["round"]["evaluation"]["n"] >= 2 and result["round"]["checkpoint"].startswith(base.name)
    for label in ("reward model", "held-out acc", "length baseline", "win rate", "95% CI", "total"):
        assert label in printed
    assert Checkpoint.objects.filter(name=result["round"]["checkpoint"], parent=base).exists()


@pytest.mark.django_db
def test_a_round_without_stages_runs_the_recipes(world):
    rnd = rounds.round_launch(policy=world["policy"], helpfulness_rm=world["helpful"], safety_rm=world["safety"],
                              prompts=world["prompts"], config=rf.TINY_ROUND)
    assert rnd.stages == ["rejection_sampling", "sft"]  # a small policy: PPO only when asked for
    assert recipes.ROUND_STAGES["paper"] == ["rejection_sampling", "sft", "ppo"]
