"""The loop, small (issue 6, item 9): a sloppy start policy -> its answers and the world's judged by the
simulated annotator over the REST API -> frozen batch -> twin reward models -> a rejection-sampling round
and a PPO round -> the oracle prefers the new checkpoint to the start policy on held-out prompts beyond
noise (a one-sided sign test on wins vs losses, ties dropped, p < 0.01), not by a threshold on time.

A narrow slice of the demo world keeps it small: animal sounds and legs, colours, opposites and the
adversarial requests, answered by a tiny policy trained on a mix of reference, rude and unsafe answers."""

import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from bench.bench_loop import oracle_compare, sign_test_p, world_prompt_rows
from policy import rounds, services
from policy.stats import verdict_of
from policy.demo_world import default_world
from webapp.jobs import JobStatus

KINDS = ("adversarial", "sound", "legs", "colour", "opposite")
STYLES = {"reference": 0.4, "unsafe": 0.3, "rude": 0.3}


def narrow(split: str) -> list:
    return [p for p in default_world().prompts(split) if p.intent.kind in KINDS and not p.context]


def train_start_policy(out: Path) -> Path:
    """A tiny policy that answers the narrow slice in the reference, rude or unsafe style."""
    from policy.model import ModelArgs, Transformer
    from policy.sft import SFTConfig, save_checkpoint, sft_train
    from policy.tokenizer import Tokenizer, train_sentencepiece

    world, rng = default_world(), random.Random(0)
    tokenizer_path = train_sentencepiece(world.corpus(), out / "tokenizer.model", 400)
    tokenizer = Tokenizer(tokenizer_path)
    names, weights = zip(*STYLES.items())
    train = narrow("train")
    dialogs = [[*p.dialog(), {"role": "assistant", "content": world.answer(p, rng.choices(names, weights)[0], rng)}]
               for p in (rng.choice(train) for _ in range(4000))]
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  multiple_of=32, max_seq_len=128))
    config = SFTConfig(lr=3e-3, min_lr_ratio=0.1, max_steps=200, batch_size=16, warmup_steps=10, device="cpu")
    sft_train(model, tokenizer, dialogs, config)
    return save_checkpoint(model, out / "loop-start", tokenizer_path=tokenizer_path, config=config)


@pytest.fixture
def start(settings, tmp_path):
    root = Path(tempfile.mkdtemp(prefix="tandem-test-loop-"))
    settings.TANDEM_MODEL_ROOTS = [tmp_path / "models", root]
    settings.TANDEM_ARTIFACT_DIR = tmp_path / "artifacts"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = train_start_policy(root)
        yield services.checkpoint_register(name="loop-start", format="meta", path=str(path))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.django_db(transaction=True)
def test_the_loop_improves_the_policy_beyond_noise(live_server, start, monkeypatch):
    from annotation import services as annotation_services
    from annotation.models import Batch, Comparison, Prompt, Response
    from annotation.simulator import SimulatedAnnotator, simulated_annotator_create
    from rewards import services as reward_services
    from rewards.models import RewardModelRun
    from workers.rewards import train_reward_model
    from workers.rounds import run_round

    monkeypatch.setattr(rounds, "_enqueue_round", lambda round_id: None)
    monkeypatch.setattr(services, "_enqueue_generation", lambda job_id: None)
    world, rng = default_world(), random.Random(1)
    # Comparisons: two answers of different styles of the world per train prompt (what a week of sampling
    # from a sloppy policy and its betters looks like), judged by the simulated annotator over HTTP.
    style_names = list(STYLES) + ["rambling", "empty"]
    external = services.checkpoint_get_or_create_external(name="world-styles")
    for prompt, wp in zip(world_prompt_rows(narrow("train")), narrow("train")):
        a, b = rng.sample(style_names, 2)
        ra, rb = (Response.objects.create(prompt=prompt, checkpoint=external, text=world.answer(wp, s, rng))
                  for s in (a, b))
        annotation_services.comparison_create(prompt=prompt, response_a=ra, response_b=rb,
                                              origin=Comparison.Origin.SIMULATION)
    torch.set_num_threads(1)
    _, token = simulated_annotator_create(username="sim-loop")
    report = SimulatedAnnotator(live_server.url, token, noise=0.1, seed=0).run(max_items=1000)
    assert report.submitted == Comparison.objects.count() > 150
    batch = annotation_services.batch_freeze(batch=Batch.objects.get(status=Batch.Status.OPEN), test_size=20)

    runs = reward_services.reward_runs_launch(
        kinds=["helpfulness", "safety"], base_checkpoint=start, batches=[batch], enqueue=False,
        config={"max_seq_len": 96, "micro_batch_size": 16, "lr": 2e-3, "epochs": 3, "checkpoint_every": 0})
    for run in runs:
        train_reward_model(run.pk)
    helpful, safety = (RewardModelRun.objects.get(pk=r.pk) for r in runs)
    assert (helpful.status, safety.status) == (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED), (helpful.error, safety.error)

    prompts = list(Prompt.objects.filter(comparisons__batch=batch).distinct())
    held_out = world_prompt_rows(narrow("heldout"))
    policy = start
    evaluations = []
    for stages, config in (
        (["rejection_sampling", "sft"], {"eval_fraction": 0, "rejection_sampling": {"k": 6, "temperature": 1.0,
                                         "max_new_tokens": 32, "chunk_prompts": 64},
                                         "sft": {"lr": 1e-3, "epochs": 3, "batch_size": 16}, "next_batch": {"prompts": 4},
                                         "evaluation": {"max_new_tokens": 32}}),
        (["ppo"], {"eval_fraction": 0, "ppo": {"n_iterations": 4, "batch_size": 16, "mini_batch_size": 8,
                                               "max_new_tokens": 32, "lr": 1e-4, "eval_every": 0, "checkpoint_every": 2},
                   "next_batch": {"prompts": 4}, "evaluation": {"max_new_tokens": 32}}),
    ):  # fmt: skip
        rnd = rounds.round_launch(policy=policy, helpfulness_rm=helpful, safety_rm=safety, prompts=prompts,
                                  stages=stages, config=config, eval_prompts=held_out)
        assert run_round(rnd.pk) == "succeeded"
        rnd.refresh_from_db()
        evaluations.append(rnd.metrics["evaluation"])
        policy = rnd.checkpoint_out
    assert [p["iteration"] for p in rnd.metrics["ppo"]["curve"]] == [1, 2, 3, 4]
    # The rejection-sampling round's own evaluation (the oracle on the held-out slice, against its parent)
    # finds the gain the independent comparison below finds, and its verdict follows the oracle's interval.
    first = evaluations[0]
    print(rounds.evaluation_line(first))
    assert first["n"] == len(held_out) and first["verdict_source"] == "oracle"
    assert first["oracle"]["wins"] > first["oracle"]["losses"] and first["oracle"]["sign_test_p"] < 0.05, first["oracle"]
    assert first["verdict"] == verdict_of(first["oracle"]) != "regression"

    result = oracle_compare(policy.path, start.path, narrow("heldout"), temperature=0.7, max_new_tokens=32, seed=5)
    print({k: v for k, v in result.items() if k != "examples"})
    assert result["wins"] > result["losses"]
    assert sign_test_p(result["wins"], result["losses"]) < 0.01, result
    assert result["new_helpful"] > result["old_helpful"]
