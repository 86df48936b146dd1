"""RLHF rounds on the Django side: the typed config, launch refusals (nothing created), a tiny round run
in-process end to end (checkpoint with lineage, next-batch comparisons), duplicates, cancellation,
divergence, resume after a crash; the admin, the API and the management command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse
from rest_framework.test import APIClient

from annotation.models import Comparison
from policy import rounds
from policy.checkpoints import sha256_of_checkpoint
from policy.models import Checkpoint, GenerationJob, RLHFRound
from policy.round_config import ConfigError, RoundConfig
from tests.conftest import assert_imports_no_torch
from tests.policy import round_fixtures as rf
from webapp.auth import api_token_issue
from webapp.jobs import JobStatus
from workers import rounds as round_worker
from workers.generation import generate_responses


@pytest.fixture(scope="session")
def round_world():
    yield rf.build_world("in-process")
    shutil.rmtree(rf.MODEL_ROOT / "in-process", ignore_errors=True)


@pytest.fixture
def world(round_world, settings, tmp_path, monkeypatch):
    """Rows for the tiny policy and reward models; rounds write under a fresh first model root; nothing goes
    to the broker; one torch thread."""
    settings.TANDEM_MODEL_ROOTS = [tmp_path / "models", rf.MODEL_ROOT]
    settings.TANDEM_DEFAULT_ARMS = ""
    monkeypatch.setattr(rounds, "_enqueue_round", lambda round_id: None)
    from policy import services

    monkeypatch.setattr(services, "_enqueue_generation", lambda job_id: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sft, helpful, safety = rf.register(round_world)
    yield {"policy": sft, "helpful": helpful, "safety": safety, "prompts": rf.demo_prompts(8)}
    torch.set_num_threads(threads)


def launch(world, **overrides):
    kwargs = dict(policy=world["policy"], helpfulness_rm=world["helpful"], safety_rm=world["safety"],
                  prompts=world["prompts"], config=rf.TINY_ROUND, stages=["rejection_sampling", "sft", "ppo"])
    return rounds.round_launch(**{**kwargs, **overrides})


# --- config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, field", [
    ({"ppo": {"kl_coef": -0.01}}, "ppo.kl_coef"),
    ({"rejection_sampling": {"k": 0}}, "rejection_sampling.k"),
    ({"rejection_sampling": {"temperature": 0}}, "rejection_sampling.temperature"),
    ({"rejection_sampling": {"temperature": -1.2}}, "rejection_sampling.temperature"),
    ({"ppo": {"batch_size": 6, "mini_batch_size": 4}}, "ppo.mini_batch_size"),
    ({"ppo": {"n_iterations": "many"}}, "ppo.n_iterations"),
    ({"ppo": {"lr": float("nan")}}, "ppo.lr"),
    ({"seed": True}, "seed"),
    ({"safety_threshold": 1.5}, "safety_threshold"),
    ({"ppo": {"kl": 0.1}}, "ppo.kl"),
    ({"nonsense": 1}, "nonsense"),
    ({"ppo": [1, 2]}, "ppo"),
])  # fmt: skip
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as caught:
        RoundConfig.from_dict(data)
    assert caught.value.field == field


def test_accepted_configs_are_accepted_by_the_algorithms_too():
    """The edge's checks are at least as strict as the torch configs': a config launched is never refused
    by the worker. Defaults and the boundary values of every checked field."""
    edges = [{}, {"rejection_sampling": {"k": 1, "temperature": 1e-3, "top_p": 1.0}},
             {"ppo": {"kl_coef": 0.0, "batch_size": 2, "mini_batch_size": 1, "eval_every": 0, "gamma": 0, "lam": 1}},
             {"sft": {"grad_clip": 0, "max_steps": 1}, "safety_threshold": 0.999, "eval_fraction": 0}]
    for data in edges:
        config = RoundConfig.from_dict(data)
        assert config.ppo_config().kl_coef == config.ppo.kl_coef
        rs = config.rejection_sampling_config(round_number=3)
        assert (rs.k, rs.temperature, rs.round, rs.reward.safety_threshold) == (
            config.rejection_sampling.k, config.rejection_sampling.temperature, 3, config.safety_threshold)
    assert RoundConfig.from_dict(RoundConfig().to_dict()) == RoundConfig()


# --- launch refusals ---------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_bad_launches_are_refused_with_the_field_and_create_nothing(world):
    from rewards.models import RewardModelRun

    def refused(field, **overrides):
        with pytest.raises(ValidationError) as caught:
            launch(world, **overrides)
        assert field in caught.value.message_dict, caught.value.message_dict
        assert not RLHFRound.objects.exists()
        return " ".join(caught.value.message_dict[field])

    other = RewardModelRun.objects.create(kind="helpfulness", base_checkpoint=world["policy"], status="succeeded",
                                          manifest_sha256="a" * 64, tokenizer_sha256="b" * 64, artifact_path="/x")
    assert "another tokenizer" in refused("helpfulness_rm", helpfulness_rm=other)
    running = RewardModelRun.objects.create(kind="safety", base_checkpoint=world["policy"], status="running",
                                            manifest_sha256="c" * 64, tokenizer_sha256=world["policy"].tokenizer_sha256)
    assert "not succeeded" in refused("safety_rm", safety_rm=running)
    assert "not a safety" in refused("safety_rm", safety_rm=world["helpful"])
    assert "empty" in refused("prompts", prompts=[])
    assert "beta" in refused("config.ppo.kl_coef", config={"ppo": {"kl_coef": -1}})
    refused("config.rejection_sampling.k", config={"rejection_sampling": {"k": 0}})
    refused("config.rejection_sampling.temperature", config={"rejection_sampling": {"temperature": 0}})
    assert "add the sft stage" in refused("stages", stages=["rejection_sampling", "ppo"])
    refused("stages", stages=["ppo", "distillation"])
    assert "no earlier round" in refused("stages", stages=["sft"])
    external = Checkpoint.objects.create(name="answers-only", format=Checkpoint.Format.EXTERNAL)
    refused("policy", policy=external)

    first = launch(world)  # on round-sft, whose lineage starts at round-base
    base = world["policy"].parent
    with pytest.raises(ValidationError) as caught:
        launch(world, policy=base)
    assert f"Round {first.pk} is still queued" in caught.value.message_dict["policy"][0]
    assert RLHFRound.objects.count() == 1
    rounds.round_cancel(rnd=first)
    assert launch(world, policy=base).lineage_root == base


@pytest.mark.django_db
def test_launch_records_the_round_and_enqueues_after_commit(world, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr(rounds, "_enqueue_round", sent.append)
    with django_capture_on_commit_callbacks(execute=True):
        rnd = launch(world, stages=["rejection_sampling", "sft"])
        assert sent == []  # not before the commit
    assert sent == [rnd.pk]
    assert (rnd.status, rnd.stages, rnd.lineage_root.name) == (JobStatus.QUEUED, ["rejection_sampling", "sft"],
                                                               "round-base")
    assert rnd.config["rejection_sampling"]["k"] == 2 and rnd.config["ppo"]["kl_coef"] == 0.1  # recipe filled in
    assert set(rnd.prompts.all()) == set(world["prompts"])


# --- the round, in-process ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_round_runs_end_to_end_and_its_checkpoint_answers_the_next_batch(world):
    rnd = launch(world)
    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    out = rnd.checkpoint_out
    assert (rnd.status, rnd.progress, rnd.error) == (JobStatus.SUCCEEDED, 1.0, "")
    assert (out.format, out.parent, out.produced_by_id) == (Checkpoint.Format.TRAINED, world["policy"], rnd.pk)
    assert out.sha256 == sha256_of_checkpoint(out.path) and out.tokenizer_sha256 == world["policy"].tokenizer_sha256
    assert Path(out.path).is_relative_to(rounds.round_dir(rnd))
    record = json.loads((Path(out.path) / "training.json").read_text())
    lineage = record["lineage"]
    assert lineage["parent"] == {"id": world["policy"].pk, "name": "round-sft", "sha256": world["policy"].sha256}
    assert lineage["reward_models"]["helpfulness"]["run"] == world["helpful"].pk
    assert lineage["reward_models"]["safety"]["manifest_sha256"] == world["safety"].manifest_sha256
    assert lineage["config"] == rnd.config and record["config"]["ppo"]["n_iterations"] == 3
    # Metrics: Figure 7 for K = 1, 2 and the PPO curves, one point per iteration.
    figure7 = rnd.metrics["rejection_sampling"]["max_vs_median"]
    assert [row["n"] for row in figure7] == [1, 2] and figure7[1]["max"] >= figure7[1]["median"]
    curve = rnd.metrics["ppo"]["curve"]
    assert [p["iteration"] for p in curve] == [1, 2, 3]
    assert {"reward_raw", "kl", "entropy", "clipfrac", "value_loss"} <= set(curve[0])
    held_out = rnd.metrics["eval_prompt_ids"]
    assert len(held_out) == 2 and rnd.metrics["prompts"] == 6  # 25% of 8 held out for PPO's early stopping
    # The next batch: the new checkpoint against its parent at the config's temperatures, held-out prompts first.
    job = GenerationJob.objects.get(pk=rnd.metrics["next_batch_job"])
    assert (job.arm_a_checkpoint, job.arm_a_temperature, job.arm_b_checkpoint, job.arm_b_temperature) == (
        out, 0.7, world["policy"], 1.0)
    assert job.prompts.count() == 3 and set(held_out) <= set(job.prompts.values_list("id", flat=True))
    assert generate_responses(job.pk) == 3
    made = Comparison.objects.filter(response_a__checkpoint=out)
    # Unbatched comparisons are what annotators lease next; a judgment puts them in the week's open batch.
    assert made.count() == 3 and all(c.batch is None for c in made)
    assert all(c.response_b.checkpoint == world["policy"] for c in made)

    # A duplicate delivery of the finished round, and the success service called again, add nothing.
    assert round_worker.run_round(rnd.pk) == "skipped"
    assert rounds.round_succeed(rnd=rnd, checkpoint_dir=out.path, metrics={}) == out
    assert Checkpoint.objects.filter(produced_by=rnd).count() == 1

    # The lineage's second round pools with the first round's best samples.
    second = launch(world, policy=out)
    assert round_worker.run_round(second.pk) == "succeeded"
    second.refresh_from_db()
    assert second.metrics["round_number"] == 2 and second.lineage_root.name == "round-base"
    assert second.metrics["rejection_sampling"]["pool_size"] == 6
    assert second.metrics["rejection_sampling"]["pool_new_prompts"] == 0  # the same prompts: compared, not added


@pytest.mark.django_db
def test_a_delivery_while_another_worker_holds_the_round_does_nothing(world):
    rnd = launch(world)
    with round_worker.folder_lock(rounds.round_dir(rnd)) as held:
        assert held
        assert round_worker.run_round(rnd.pk) == "busy"
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.QUEUED and rnd.started_at is None and not Checkpoint.objects.filter(produced_by=rnd)


@pytest.mark.django_db
def test_cancel_is_honoured_between_steps(world, monkeypatch):
    rnd = launch(world)
    progress = rounds.round_progress

    def cancel_once_ppo_runs(**kwargs):
        if kwargs.get("stage") == "ppo" and kwargs["rnd"].status == JobStatus.RUNNING:
            rounds.round_cancel(rnd=kwargs["rnd"])
        return progress(**kwargs)

    monkeypatch.setattr(rounds, "round_progress", cancel_once_ppo_runs)
    assert round_worker.run_round(rnd.pk) == "cancelled"
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.CANCELLED and rnd.current_stage == "rejection_sampling"
    assert rnd.checkpoint_out is None and not (rounds.round_dir(rnd) / "result.json").exists()
    assert (rounds.round_dir(rnd) / "rejection_sampling" / "result.json").exists()  # the stage before stays done
    assert round_worker.run_round(rnd.pk) == "skipped"
    with pytest.raises(ValidationError):
        rounds.round_cancel(rnd=rnd)


@pytest.mark.django_db
def test_kl_runaway_fails_the_round_keeping_the_last_good_state(world):
    config = json.loads(json.dumps(rf.TINY_ROUND))
    config["ppo"].update(max_kl=1e-7, lr=5e-2, n_iterations=4)
    rnd = launch(world, stages=["ppo"], config=config)
    assert round_worker.run_round(rnd.pk) == "failed"
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.FAILED and "exceeds max_kl" in rnd.error and rnd.checkpoint_out is None
    ppo = rnd.metrics["ppo"]
    assert ppo["last_good_iteration"] == ppo["diverged_at"] - 1 == len(ppo["curve"])
    state = torch.load(ppo["state"], weights_only=True)
    assert state["loop"]["iteration"] == ppo["last_good_iteration"]
    assert not Checkpoint.objects.filter(produced_by=rnd).exists()


@pytest.mark.django_db
def test_a_crash_midway_resumes_from_the_last_complete_point(world, monkeypatch):
    from policy import ppo

    config = json.loads(json.dumps(rf.TINY_ROUND))
    config["ppo"]["n_iterations"] = 4
    rnd = launch(world, config=config)
    real_iteration, calls = ppo._iteration, []

    def killed_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as abrupt as a kill: nothing in the task handles it
        return real_iteration(*args, **kwargs)

    monkeypatch.setattr(ppo, "_iteration", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        round_worker.run_round(rnd.pk)
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.RUNNING and rnd.current_stage == "ppo"
    chunks = sorted((rounds.round_dir(rnd) / "rejection_sampling" / "samples").iterdir())
    written = {p: p.stat().st_mtime_ns for p in chunks}
    assert len(chunks) == 2

    monkeypatch.setattr(ppo, "_iteration", real_iteration)
    assert round_worker.run_round(rnd.pk) == "succeeded"  # redelivered (or round_resume)
    rnd.refresh_from_db()
    assert rnd.metrics["ppo"]["resumed_from_iteration"] == 2
    assert [p["iteration"] for p in rnd.metrics["ppo"]["curve"]] == [1, 2, 3, 4]
    assert {p: p.stat().st_mtime_ns for p in chunks} == written  # sampling was not redone
    assert Checkpoint.objects.filter(produced_by=rnd).count() == 1


# --- admin ---------------------------------------------------------------------------------------------------

@pytest.fixture
def admin_client_(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.django_db
def test_admin_launches_lists_shows_metrics_and_cancels(world, admin_client_):
    add = reverse("admin:policy_rlhfround_add")
    page = admin_client_.get(add)
    assert page.status_code == 200 and "kl_coef" in page.content.decode()
    ids = ",".join(str(p.pk) for p in world["prompts"])
    form = {"policy": world["policy"].pk, "helpfulness_rm": world["helpful"].pk, "safety_rm": world["safety"].pk,
            "prompt_ids": ids, "stage_list": ["rejection_sampling", "sft", "ppo"],
            "round_config": json.dumps({"ppo": {"kl_coef": -0.5}})}
    refused = admin_client_.post(add, form)
    assert refused.status_code == 200 and "ppo.kl_coef" in refused.content.decode()
    assert not RLHFRound.objects.exists()
    empty = admin_client_.post(add, {**form, "prompt_ids": "", "round_config": "{}"})
    assert "prompt set is empty" in empty.content.decode() and not RLHFRound.objects.exists()

    created = admin_client_.post(add, {**form, "round_config": json.dumps(rf.TINY_ROUND)})
    rnd = RLHFRound.objects.get()
    assert created.status_code == 302 and rnd.created_by.username == "boss" and rnd.prompts.count() == 8
    listing = admin_client_.get(reverse("admin:policy_rlhfround_changelist")).content.decode()
    assert '<progress value="0.000"' in listing and 'http-equiv="refresh"' in listing  # live while active

    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    detail = admin_client_.get(reverse("admin:policy_rlhfround_change", args=[rnd.pk])).content.decode()
    for text in ("PPO curves", "<polyline", "clip fraction", "value loss", "Figure 7", "<th>median</th>",
                 rnd.checkpoint_out.name):
        assert text in detail
    assert 'http-equiv="refresh"' not in detail

    second = rounds.round_launch(policy=rnd.checkpoint_out, helpfulness_rm=world["helpful"],
                                 safety_rm=world["safety"], prompts=world["prompts"], config=rf.TINY_ROUND)
    admin_client_.post(reverse("admin:policy_rlhfround_changelist"),
                       {"action": "cancel_selected", "_selected_action": [second.pk]})
    second.refresh_from_db()
    assert second.status == JobStatus.CANCELLED


# --- API -------------------------------------------------------------------------------------------------------

@pytest.fixture
def api(db, private_cache):

    def client_for(user):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_issue(user=user, name='t')[1]}")
        return client

    return client_for


@pytest.mark.django_db
def test_api_researchers_read_admins_launch_and_cancel(world, api, make_user, admin_user, annotator):
    researcher, boss = api(make_user("res", role="researcher")), api(admin_user)
    body = {"policy": "round-sft", "helpfulness_rm": world["helpful"].pk, "safety_rm": world["safety"].pk,
            "prompt_ids": [p.pk for p in world["prompts"]], "config": rf.TINY_ROUND}
    assert researcher.post("/api/v1/rounds", body, format="json").status_code == 403
    assert api(annotator).get("/api/v1/rounds").status_code == 403
    for config, field in [({"ppo": {"kl_coef": -1}}, "config.ppo.kl_coef"),
                          ({"rejection_sampling": {"k": 0}}, "config.rejection_sampling.k"),
                          ({"rejection_sampling": {"temperature": 0}}, "config.rejection_sampling.temperature")]:
        response = boss.post("/api/v1/rounds", {**body, "config": config}, format="json")
        assert response.status_code == 400 and list(response.json()) == [field], response.json()
    response = boss.post("/api/v1/rounds", {**body, "prompt_ids": []}, format="json")
    assert response.status_code == 400 and "empty" in response.json()["prompts"][0]
    response = boss.post("/api/v1/rounds", {**body, "stages": ["ppo", "bogus"]}, format="json")
    assert response.status_code == 400 and "stages" in response.json()
    assert not RLHFRound.objects.exists()

    created = boss.post("/api/v1/rounds", {**body, "tags": ["demo-world"], "prompt_limit": 8}, format="json")
    assert created.status_code == 201, created.json()
    rnd = RLHFRound.objects.get(pk=created.json()["id"])
    assert rnd.prompts.count() == 8 and created.json()["policy_in"] == "round-sft"
    again = boss.post("/api/v1/rounds", body, format="json")
    assert again.status_code == 400 and "still queued" in again.json()["policy"][0]

    listing = researcher.get("/api/v1/rounds").json()["results"]
    assert [r["id"] for r in listing] == [rnd.pk] and "metrics" not in listing[0]
    assert researcher.get("/api/v1/rounds?status=queued&policy=round-sft").json()["results"][0]["id"] == rnd.pk
    assert researcher.get("/api/v1/rounds?bogus=1").status_code == 400
    detail = researcher.get(f"/api/v1/rounds/{rnd.pk}").json()
    assert detail["metrics"] == {} and detail["config"]["rejection_sampling"]["k"] == 2
    assert researcher.post(f"/api/v1/rounds/{rnd.pk}/cancel").status_code == 403
    cancelled = boss.post(f"/api/v1/rounds/{rnd.pk}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert boss.post(f"/api/v1/rounds/{rnd.pk}/cancel").json() == {
        "status": [f"Round {rnd.pk} is cancelled; only queued or running rounds can be cancelled."]}
    schema = boss.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert {"/api/v1/rounds", "/api/v1/rounds/{id}", "/api/v1/rounds/{id}/cancel"} <= set(schema["paths"])


# --- management command ------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_command_refuses_with_the_field_named(world):
    with pytest.raises(CommandError, match=r"config\.ppo\.kl_coef"):
        call_command("round_launch", "--tag", "demo-world", "--set", "ppo.kl_coef=-0.1")
    with pytest.raises(CommandError, match="prompts: The prompt set is empty"):
        call_command("round_launch", "--tag", "no-such-tag")
    with pytest.raises(CommandError, match="Unknown batch"):
        call_command("round_launch", "--batch", "1999-W01")
    assert not RLHFRound.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_command_launches_and_waits_with_a_progress_bar(world, monkeypatch, capsys, tmp_path):
    # The "worker" runs the round as soon as the launch commits, so --wait sees it finish.
    monkeypatch.setattr(rounds, "_enqueue_round", lambda round_id: round_worker.run_round(round_id))
    config = tmp_path / "cmd-config.json"
    config.write_text(json.dumps(rf.TINY_ROUND))
    call_command("round_launch", "--policy", "round-sft", "--tag", "demo-world", "--limit", "6", "--config",
                 str(config), "--set", "ppo.n_iterations=2", "--stages", "rejection_sampling,sft,ppo", "--wait")
    out = capsys.readouterr().out
    rnd = RLHFRound.objects.get()
    assert rnd.status == JobStatus.SUCCEEDED and rnd.config["ppo"]["n_iterations"] == 2 and rnd.prompts.count() == 6
    assert f"Round {rnd.pk} launched on round-sft (6 prompts" in out and f"succeeded: {rnd.checkpoint_out.name}" in out
    assert rnd.helpfulness_rm == world["helpful"]  # the newest succeeded run on the policy's tokenizer


def test_the_web_side_of_rounds_imports_no_torch():
    assert_imports_no_torch("import webapp.urls, webapp.celery, workers.rounds, policy.rounds, policy.round_config, "
                            "policy.api, policy.admin, policy.management.commands.round_launch; "
                            "policy.round_config.RoundConfig.from_dict({'ppo': {'kl_coef': 0.02}})")


@pytest.mark.django_db
def test_round_lists_do_not_grow_queries_with_rows(world, admin_client_, api, admin_user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    boss = api(admin_user)

    def queries(get) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert get().status_code == 200
        return len(ctx)

    def add_round():
        rnd = launch(world)
        rounds.round_cancel(rnd=rnd)

    add_round()
    boss.get("/api/v1/rounds")  # the token's first use records itself once
    few = (queries(lambda: admin_client_.get(reverse("admin:policy_rlhfround_changelist"))),
           queries(lambda: boss.get("/api/v1/rounds")))
    for _ in range(4):
        add_round()
    assert (queries(lambda: admin_client_.get(reverse("admin:policy_rlhfround_changelist"))),
            queries(lambda: boss.get("/api/v1/rounds"))) == few


@pytest.mark.django_db
@pytest.mark.parametrize("stages", [["ppo"], ["rejection_sampling", "sft"]])
def test_non_finite_rewards_fail_the_round_with_the_reason(world, monkeypatch, stages):
    from policy.reward import TwinRewardModels

    def nan_scores(self, prompts, responses, tokens):
        return torch.full((len(prompts),), float("nan"), dtype=torch.float64), torch.ones(len(prompts))

    monkeypatch.setattr(TwinRewardModels, "__call__", nan_scores)
    rnd = launch(world, stages=stages)
    assert round_worker.run_round(rnd.pk) == "failed"
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.FAILED and "non-finite" in rnd.error and rnd.checkpoint_out is None
    assert not Checkpoint.objects.filter(produced_by=rnd).exists()
