"""The README's loop on the demo, unattended: simulated judgments over the REST API, the week's batch frozen,
twin reward models, one RLHF round and its evaluation against its parent, with one table at the end.

It runs the same commands and services the README shows, in order, in this process: the simulated
annotators through `manage.py simulate_annotators` against a server (the running one, or one started
here on a thread), the batch through `batch_freeze`, and the reward models and the round through the
functions a worker runs (`workers.rewards.train_reward_model`, `workers.rounds.run_round`), so nothing
waits on a broker. The project layer: it is the one module that drives annotation, rewards and rounds.
"""
from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoopSizes:
    policy_prompts: int = 600  # demo-world prompts the demo policy answers first (policy_demo_build --answer)
    seed_world: int = 600  # demo-world comparisons created to judge (simulate_annotators --seed-world)
    annotators: int = 3  # simulated people (--annotators)
    items: int = 400  # judgments each at most (--items)
    noise: float = 0.1  # the simulated people's noise on the oracle's margin
    round_config: dict[str, Any] = field(default_factory=dict)  # over the recipe of the policy's size
    rm_config: dict[str, Any] = field(default_factory=dict)  # over the reward-model recipe
    stages: list[str] | None = None  # the round's stages (None: the recipe's)


# --fast: the machinery end to end in seconds on a tiny model (tests); numbers mean nothing at this size.
FAST = LoopSizes(
    policy_prompts=8, seed_world=40, annotators=1, items=60, rm_config={"max_seq_len": 96, "micro_batch_size": 4, "checkpoint_every": 0,
                                                      "mix": {"min_train_pairs": 4}},
    round_config={"rejection_sampling": {"k": 2, "max_new_tokens": 8, "chunk_prompts": 8},
                  "sft": {"max_steps": 2, "batch_size": 4},
                  "ppo": {"n_iterations": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8,
                          "eval_every": 1, "checkpoint_every": 1},
                  "next_batch": {"prompts": 2, "max_new_tokens": 8},
                  "evaluation": {"min_prompts": 2, "max_new_tokens": 8}})  # fmt: skip


@contextmanager
def app_server(base_url: str | None = None):
    """The given server, or the app on a thread of this process (wsgiref) for the simulated annotators."""
    if base_url:
        yield base_url.rstrip("/")
        return
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def run_loop(*, policy: str, rm_base: str, sizes: LoopSizes, seed: int = 0, base_url: str | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The loop once; returns what the table shows (steps with wall seconds, reward models, the round)."""
    from django.core.management import call_command

    from annotation import services as annotation_services
    from annotation.models import Batch
    from policy import rounds
    from policy.models import Checkpoint, RLHFRound
    from rewards import services as reward_services
    from rewards.models import RewardModelRun
    from policy import services as policy_services
    from workers.generation import generate_responses
    from workers.rewards import train_reward_model
    from workers.rounds import run_round

    start = Checkpoint.objects.filter(name=policy).first()
    base = Checkpoint.objects.filter(name=rm_base).first()
    if start is None or base is None:
        raise ValueError(f"No checkpoint named {policy if start is None else rm_base!r}: build the demo policy first "
                         "(scripts/run does, or manage.py policy_demo_build).")
    steps: list[dict[str, Any]] = []

    @contextmanager
    def step(name: str):
        log(f"[{name}] ...")
        began = time.perf_counter()
        yield
        steps.append({"step": name, "wall_s": round(time.perf_counter() - began, 1)})
        log(f"[{name}] {steps[-1]['wall_s']} s")

    if sizes.policy_prompts:
        with step("policy answers"):
            # The paper's point: reward models learn to rank the policy's own samples from comparisons of them.
            job = policy_services.demo_prompts_answer(count=sizes.policy_prompts, seed=seed)
            if job is not None:  # a worker that also gets the job pairs nothing twice (generation_pair_record)
                made = generate_responses(job.pk)
                log(f"The default arms answered {job.prompts.count()} demo-world prompts: {made} comparisons.")
    with step("simulated judgments"), app_server(base_url) as url:
        out = io.StringIO()
        call_command("simulate_annotators", "--base-url", url, "--annotators", str(sizes.annotators),
                     "--items", str(sizes.items), "--seed-world", str(sizes.seed_world), "--seed", str(seed),
                     "--noise", str(sizes.noise), stdout=out)
        log(out.getvalue().rstrip())
    with step("freeze"):
        batch = annotation_services.batch_open_for()
        batch = annotation_services.batch_freeze(batch=Batch.objects.get(pk=batch.pk))
        log(f"Froze {batch.label}: {batch.comparisons.count()} comparisons, {batch.test_size} held out.")
    with step("reward models"):
        runs = reward_services.reward_runs_launch(kinds=["helpfulness", "safety"], base_checkpoint=base,
                                                  batches=[batch], config={**sizes.rm_config, "seed": seed},
                                                  enqueue=False)
        for run in runs:
            train_reward_model(run.pk)
        runs = [RewardModelRun.objects.get(pk=r.pk) for r in runs]
        if failed := [r for r in runs if r.status != "succeeded"]:
            raise RuntimeError(f"{failed[0].kind} reward model {failed[0].status}: {failed[0].error}")
    with step("round"):
        prompts = rounds.prompts_for_round(batches=[batch])
        rnd = rounds.round_launch(policy=start, helpfulness_rm=runs[0], safety_rm=runs[1], prompts=prompts,
                                  stages=sizes.stages, config={**sizes.round_config, "seed": seed})
        # The round's message goes to the broker after the commit; this process runs it now, and a worker
        # that gets the message later finds it finished and does nothing.
        status = run_round(rnd.pk)
        rnd = RLHFRound.objects.get(pk=rnd.pk)
        if status != "succeeded":
            raise RuntimeError(f"round {rnd.pk} {status}: {rnd.error}")
    return {"steps": steps, "batch": batch.label, "reward_models": [_rm_row(r) for r in runs],
            "round": {"id": rnd.pk, "checkpoint": rnd.checkpoint_out.name, "parent": start.name,
                      "stages": rnd.stages, "verdict": rnd.verdict, "evaluation": rnd.metrics.get("evaluation"),
                      "summary": rounds.evaluation_line(rnd.metrics.get("evaluation")),
                      "warnings": rounds.round_warnings(rnd)}}


def _rm_row(run) -> dict[str, Any]:
    from rewards.evaluate import accuracy_warnings

    overall = ((run.metrics or {}).get("eval") or {}).get("all") or {}
    return {"kind": run.kind, "id": run.pk, "accuracy": overall.get("accuracy"), "n": overall.get("n"),
            "length_baseline": (overall.get("length_baseline") or {}).get("accuracy"),
            "warnings": accuracy_warnings((run.metrics or {}).get("eval"))}


def report(result: dict[str, Any]) -> str:
    """The table the command prints at the end."""
    lines = ["", f"{'step':<24}{'wall s':>8}"]
    lines += [f"{s['step']:<24}{s['wall_s']:>8.1f}" for s in result["steps"]]
    lines.append(f"{'total':<24}{sum(s['wall_s'] for s in result['steps']):>8.1f}")
    lines += ["", f"{'reward model':<14}{'held-out acc':>13}{'length baseline':>17}{'pairs':>7}"]
    for rm in result["reward_models"]:
        acc = "-" if rm["accuracy"] is None else f"{rm['accuracy']:.3f}"
        base = "-" if rm["length_baseline"] is None else f"{rm['length_baseline']:.3f}"
        lines.append(f"{rm['kind']:<14}{acc:>13}{base:>17}{rm['n'] or 0:>7}")
        lines += [f"  warning: {w}" for w in rm["warnings"]]
    rnd = result["round"]
    lines += ["", f"round {rnd['id']} ({', '.join(rnd['stages'])}): {rnd['checkpoint']} against its parent {rnd['parent']}"]
    evaluation = rnd["evaluation"] or {}
    lines.append(f"{'judge':<16}{'win rate':>9}{'95% CI':>15}{'W / L / T':>16}{'n':>6}")
    for key, label in (("oracle", "oracle"), ("helpfulness_rm", "helpfulness RM"), ("safety_rm", "safety RM")):
        row = evaluation.get(key)
        if row and row.get("n"):
            ci = f"{row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}"
            counts = f"{row['wins']} / {row['losses']} / {row['ties']}"
            lines.append(f"{label:<16}{row['win_rate']:>9.3f}{ci:>15}{counts:>16}{row['n']:>6}")
    lines.append(rnd["summary"])
    lines += [f"  warning: {w}" for w in rnd["warnings"]]
    return "\n".join(lines)
