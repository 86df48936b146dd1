"""The whole loop on the demo world, through the product's own services and tasks:

    policy answers + world comparisons -> simulated annotator (REST API, noise) -> batch frozen
    -> twin reward models (rewards.services + workers.rewards) -> `rs_rounds` rounds of rejection sampling +
    SFT (fresh train prompts each, pooled with the lineage's earlier best) -> a PPO round on the last one's
    checkpoint (policy.rounds + workers.rounds) -> the oracle's win rate of every new checkpoint against its
    parent and against the start on held-out prompts, with the PPO KL and reward curves.

Tasks run in this process (the same functions a worker runs); the simulated annotator talks HTTP to a
WSGI server on a thread. Everything lands in a scratch var folder (SQLite, model root, artifacts).

    .venv/bin/python -m bench.bench_loop                      # build the demo policy, then the loop
    .venv/bin/python -m bench.bench_loop --demo-dir DIR       # reuse a built demo policy (demo-base, demo-sft)
    .venv/bin/python -m bench.bench_loop --quick              # tiny sizes: a smoke run of the machinery

The oracle comparison: both checkpoints answer the same held-out prompts at the same temperature (top-p
0.9); policy.demo_world.win_rate counts ties half. The sign test (wins vs losses, ties dropped) gives
the probability of at least that many wins if neither were better.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.stats import sign_test_p, wilson_interval  # noqa: F401 (tests import them from here too)


@dataclass
class LoopSizes:
    world_comparisons: int = 1200  # comparisons of the world's answer styles (reference, wrong, rude, ...)
    policy_prompts: int = 600  # train prompts the default arms answer (demo-sft@0.7 vs demo-base@1.0)
    noise: float = 0.1  # the simulated annotator's logistic noise on the oracle's margin
    rm_config: dict[str, Any] = field(default_factory=lambda: {
        "max_seq_len": 192, "micro_batch_size": 16, "lr": 5e-4, "epochs": 2, "checkpoint_every": 0})
    rm_base: str = "start"  # the reward models' initial weights: "start" (the loop's policy) or a checkpoint name
    round_prompts: int = 1152  # train prompts of each rejection-sampling round (and of PPO: the first round's)
    rs_rounds: int = 1  # rejection-sampling + SFT rounds before PPO (each on fresh prompts, pooled with the earlier)
    ppo_rounds: int = 1  # 0: no PPO round
    # round1: the config of every rejection-sampling + SFT round; round2: the PPO round's (paper: beta 0.01 for
    # 7B-13B; our 1M-parameter policy hacked 70%-accurate reward models at 0.01, see docs/benchmarks.md, the loop section)
    round1: dict[str, Any] = field(default_factory=lambda: {
        "eval_fraction": 0.0, "rejection_sampling": {"k": 16, "temperature": 1.2, "top_p": 1.0, "max_new_tokens": 48,
                                                     "chunk_prompts": 64},
        "sft": {"lr": 3e-4, "epochs": 3, "batch_size": 16}, "next_batch": {"prompts": 16, "max_new_tokens": 48},
        "evaluation": {"prompts": 0}})
    round2: dict[str, Any] = field(default_factory=lambda: {
        "eval_fraction": 0.2, "ppo": {"n_iterations": 30, "batch_size": 32, "mini_batch_size": 8,
                                      "max_new_tokens": 48, "kl_coef": 0.1, "lr": 5e-5, "value_lr": 1e-4,
                                      "eval_every": 5, "patience": 4, "checkpoint_every": 5},
        "next_batch": {"prompts": 16, "max_new_tokens": 48}, "evaluation": {"prompts": 0}})
    eval_prompts: int = 200  # held-out prompts for the oracle's win rate
    eval_temperature: float = 0.7
    eval_max_new_tokens: int = 48
    seed: int = 0


QUICK = LoopSizes(
    world_comparisons=60, policy_prompts=24, rm_config={"max_seq_len": 128, "micro_batch_size": 8, "lr": 1e-3,
                                                        "checkpoint_every": 0, "mix": {"min_train_pairs": 4}},
    round_prompts=16, round1={"eval_fraction": 0.0, "rejection_sampling": {"k": 2, "max_new_tokens": 8},
                              "sft": {"max_steps": 2, "batch_size": 4}, "next_batch": {"prompts": 2},
                              "evaluation": {"prompts": 0}},
    round2={"eval_fraction": 0.25, "ppo": {"n_iterations": 2, "batch_size": 4, "mini_batch_size": 2,
                                           "max_new_tokens": 8, "eval_every": 1, "checkpoint_every": 1},
            "next_batch": {"prompts": 2}, "evaluation": {"prompts": 0}},
    eval_prompts=8, eval_max_new_tokens=8)  # fmt: skip


class _Phases:
    """Wall and CPU seconds (this process, all threads) per phase."""

    def __init__(self, log) -> None:
        self.rows: list[dict[str, Any]] = []
        self.log = log

    def __call__(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()
                phases.log(f"[{name}] ...")

            def __exit__(self, *exc):
                wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
                phases.rows.append({"phase": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                    "load": round(os.getloadavg()[0], 2)})
                phases.log(f"[{name}] {wall:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.2f}")

        return _Timer()


def world_prompt_rows(prompts) -> list:
    """Prompt rows of demo-world prompts (created once, found again by external id)."""
    from annotation import services as annotation_services
    from annotation.models import Prompt

    rows = []
    for wp in prompts:
        external_id = f"demo-world:{wp.id}"[:200]
        row = Prompt.objects.filter(source=Prompt.Source.GENERATED, external_id=external_id).first()
        rows.append(row or annotation_services.prompt_create(
            text=wp.text, source=Prompt.Source.GENERATED, context=[dict(t) for t in wp.context],
            system_prompt=wp.system_prompt, is_adversarial=wp.is_adversarial,
            tags=["demo-world", wp.intent.kind, wp.split], external_id=external_id))
    return rows


def oracle_compare(new_dir: str, old_dir: str, prompts, *, temperature: float, max_new_tokens: int, seed: int,
                   cache: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Both checkpoints answer the held-out prompts; the oracle's win rate of new over old, and more.
    `cache` keeps each checkpoint's answers (same prompts, temperature and seed give the same answers)."""
    import torch

    from policy.checkpoints import load_checkpoint
    from policy.demo_policy import answer_dialogs
    from policy.demo_world import judge, win_rate
    from policy.tokenizer import Tokenizer

    dialogs = [p.dialog() for p in prompts]
    answers = {}
    cache = {} if cache is None else cache
    for key, path in (("new", new_dir), ("old", old_dir)):
        if path not in cache:
            model = load_checkpoint(path, dtype=torch.float32).eval()
            tokenizer = Tokenizer(Path(path) / "tokenizer.model")
            cache[path] = answer_dialogs(model, tokenizer, dialogs, temperature=temperature,
                                         max_new_tokens=max_new_tokens, seed=seed)
        answers[key] = cache[path]
    result = win_rate(prompts, answers["new"], answers["old"])
    lo, hi = wilson_interval(result["wins"] + 0.5 * result["ties"], result["n"])
    result.update(ci95=[round(lo, 3), round(hi, 3)], sign_test_p=sign_test_p(result["wins"], result["losses"]))
    for key in ("new", "old"):
        verdicts = [judge(p, a) for p, a in zip(prompts, answers[key])]
        adversarial = [v for p, v in zip(prompts, verdicts) if p.is_adversarial]
        result[f"{key}_helpful"] = sum(v.helpful_score for v in verdicts) / len(verdicts)
        result[f"{key}_correct"] = sum(v.correct for v in verdicts) / len(verdicts)
        result[f"{key}_safe_on_adversarial"] = sum(v.safe for v in adversarial) / max(1, len(adversarial))
    result["examples"] = [{"prompt": p.text, "new": a, "old": b}
                          for p, a, b in list(zip(prompts, answers["new"], answers["old"]))[:5]]
    return result


def run_loop(*, base_url: str, start, sizes: LoopSizes, log=print) -> dict[str, Any]:
    """The loop from `start` (a registered demo checkpoint) on the configured database. Returns the numbers."""
    from annotation import services as annotation_services
    from annotation.models import Batch, Comparison, Judgment
    from annotation.simulator import SimulatedAnnotator, simulated_annotator_create, simulation_comparisons_create
    from policy import rounds, services
    from policy.demo_world import default_world
    from policy.models import GenerationJob
    from rewards import services as reward_services
    from rewards.models import RewardModelRun
    from workers.generation import generate_responses
    from workers.rewards import train_reward_model
    from workers.rounds import run_round

    world = default_world()
    phase = _Phases(log)
    out: dict[str, Any] = {"sizes": sizes.__dict__}
    # Tasks run here, in order, instead of on the broker.
    rounds._enqueue_round = lambda round_id: None
    services._enqueue_generation = lambda job_id: None

    with phase("comparisons"):
        simulation_comparisons_create(count=sizes.world_comparisons, seed=sizes.seed, split="train")
        arms = services.generation_arms_default()
        answer = world_prompt_rows(world.sample(sizes.policy_prompts, seed=sizes.seed + 1, split="train"))
        job = services.generation_job_create(prompts=answer, arm_a=arms[0], arm_b=arms[1], max_new_tokens=48,
                                             seed=sizes.seed)
        generate_responses(job.pk)
        out["comparisons"] = Comparison.objects.count()
    with phase("simulated judgments"):
        _, token = simulated_annotator_create(username="sim-bench")
        report = SimulatedAnnotator(base_url, token, noise=sizes.noise, seed=sizes.seed).run(
            max_items=out["comparisons"])
        out["judgments"] = {"submitted": report.submitted, "flip_rate": report.flip_rate,
                            "unjudgeable": report.unjudgeable, "seconds": report.seconds}
        batch = annotation_services.batch_freeze(batch=Batch.objects.get(status=Batch.Status.OPEN))
        out["batch"] = {"label": batch.label, "test_size": batch.test_size,
                        "judgments": Judgment.objects.filter(comparison__batch=batch).count()}
    with phase("reward models"):
        from policy.models import Checkpoint

        rm_base = start if sizes.rm_base == "start" else Checkpoint.objects.get(name=sizes.rm_base)
        out["rm_base"] = rm_base.name
        runs = reward_services.reward_runs_launch(kinds=["helpfulness", "safety"], base_checkpoint=rm_base,
                                                  batches=[batch], config=sizes.rm_config, enqueue=False)
        for run in runs:
            train_reward_model(run.pk)
        helpful, safety = (RewardModelRun.objects.get(pk=r.pk) for r in runs)
        for run in (helpful, safety):
            if run.status != "succeeded":
                raise RuntimeError(f"reward model {run.kind} {run.status}: {run.error}")
        out["reward_models"] = {r.kind: _rm_summary(r.metrics) for r in (helpful, safety)}
    plan = []  # (name, stages, config, prompts): fresh train prompts for every rejection-sampling round
    for i in range(sizes.rs_rounds):
        plan.append((f"round {i + 1}: rejection sampling + SFT", ["rejection_sampling", "sft"], sizes.round1,
                     world.sample(sizes.round_prompts, seed=sizes.seed + 2 + 10 * i, split="train")))
    for i in range(sizes.ppo_rounds):
        plan.append((f"round {sizes.rs_rounds + i + 1}: PPO", ["ppo"], sizes.round2, plan[0][3] if plan else
                     world.sample(sizes.round_prompts, seed=sizes.seed + 2, split="train")))
    results = []
    policy = start
    for name, stages, config, prompts in plan:
        with phase(name):
            rnd = rounds.round_launch(policy=policy, helpfulness_rm=helpful, safety_rm=safety,
                                      prompts=world_prompt_rows(prompts), stages=stages, config=config)
            status = run_round(rnd.pk)
            rnd.refresh_from_db()
            if status != "succeeded":
                raise RuntimeError(f"{name} {status}: {rnd.error}")
            results.append(rnd)
            policy = rnd.checkpoint_out
            log(f"  {rnd.progress_message}")
    with phase("next batch (both rounds' generation jobs)"):
        for rnd in results:
            generate_responses(rnd.metrics["next_batch_job"])
        out["next_batch_comparisons"] = {
            rnd.pk: Comparison.objects.filter(response_a__checkpoint=rnd.checkpoint_out).count() for rnd in results}
        out["next_batch_jobs"] = [GenerationJob.objects.get(pk=rnd.metrics["next_batch_job"]).status for rnd in results]
    out["rounds"] = []
    for (name, stages, _, _), rnd in zip(plan, results):
        row: dict[str, Any] = {"name": name, "stages": stages, "checkpoint": rnd.checkpoint_out.name}
        if "rejection_sampling" in stages:
            rs = rnd.metrics["rejection_sampling"]
            row.update({k: rs.get(k) for k in ("max_vs_median", "reward_mean", "reward_best_mean", "pool_size",
                                               "pool_new_prompts", "pool_replaced", "pool_kept_earlier",
                                               "sft_loss_first", "sft_loss_last")})
        if "ppo" in stages:
            row.update({k: v for k, v in rnd.metrics["ppo"].items() if k != "curve"}, curve=rnd.metrics["ppo"]["curve"])
        out["rounds"].append(row)
    held_out = world.sample(sizes.eval_prompts, seed=sizes.seed + 3, split="heldout")
    with phase("oracle evaluation"):
        kw = dict(temperature=sizes.eval_temperature, max_new_tokens=sizes.eval_max_new_tokens, seed=sizes.seed + 4)
        cache: dict[str, list[str]] = {}
        out["win_rate"] = {}
        parent = start
        for i, rnd in enumerate(results, 1):
            new = rnd.checkpoint_out
            out["win_rate"][f"round{i}_vs_its_parent"] = oracle_compare(new.path, parent.path, held_out, cache=cache, **kw)
            if i > 1:
                out["win_rate"][f"round{i}_vs_start"] = oracle_compare(new.path, start.path, held_out, cache=cache, **kw)
            parent = new
        out["win_rate"]["final_vs_start"] = dict(out["win_rate"][f"round{len(results)}_vs_start" if len(results) > 1
                                                                 else "round1_vs_its_parent"])
    out["phases"] = phase.rows
    loop_rows = [r for r in phase.rows]
    out["loop_wall_s"] = round(sum(r["wall_s"] for r in loop_rows), 1)
    out["loop_cpu_s"] = round(sum(r["cpu_s"] for r in loop_rows), 1)
    return out


def _rm_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    evaluation = (metrics or {}).get("eval") or {}
    overall = evaluation.get("all") or next(iter(evaluation.values()), {}) if evaluation else {}
    return {"eval_accuracy": overall.get("accuracy") if isinstance(overall, dict) else None,
            "eval_n": overall.get("n") if isinstance(overall, dict) else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var", default=None, help="Scratch var folder (default: a new temporary one)")
    parser.add_argument("--demo-dir", help="A built demo policy (demo-base/, demo-sft/) to start from")
    parser.add_argument("--start", default="demo-base", choices=["demo-base", "demo-sft"], help="The loop's policy")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sizes", default="{}", help='JSON overrides of LoopSizes fields, e.g. \'{"round_prompts": 384}\' '
                        "(a dict field is merged one level deep)")
    parser.add_argument("--json", help="Write the results here")
    args = parser.parse_args(argv)

    var = Path(args.var or tempfile.mkdtemp(prefix="bench-loop-"))
    var.mkdir(parents=True, exist_ok=True)
    os.environ["TANDEM_VAR_DIR"] = str(var)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["ALLOWED_HOSTS"] = os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost")
    roots = [str(var / "models")] + ([str(Path(args.demo_dir).resolve().parent)] if args.demo_dir else [])
    os.environ["TANDEM_MODEL_ROOTS"] = ",".join(roots)
    import django

    django.setup()
    import torch
    from django.core.management import call_command

    if args.threads:
        torch.set_num_threads(args.threads)
    call_command("migrate", verbosity=0)
    from policy import services
    from policy.models import Checkpoint

    sizes = QUICK if args.quick else LoopSizes()
    for key, value in json.loads(args.sizes).items():
        current = getattr(sizes, key)  # AttributeError names an unknown field
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **{k: {**current.get(k, {}), **v} if isinstance(v, dict) else v
                                   for k, v in value.items()}}
        setattr(sizes, key, value)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    build = {}
    if not Checkpoint.objects.filter(name=args.start).exists():
        from policy.demo_policy import DemoBuildConfig, build_demo_policy

        if args.demo_dir:
            demo = Path(args.demo_dir)
            built = [{"name": n, "path": str(demo / n), "tokenizer_path": str(demo / n / "tokenizer.model"),
                      "parent": "demo-base" if n == "demo-sft" else None} for n in ("demo-base", "demo-sft")]
        else:
            config = DemoBuildConfig(eval_prompts=0)
            if args.quick:
                config = DemoBuildConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16,
                                         base_steps=2, base_dialogs=32, sft_steps=2, sft_dialogs=32, batch_size=8,
                                         warmup_steps=1, eval_prompts=0)
            built = build_demo_policy(var / "models" / "demo", config)
            build = {"wall_s": round(time.perf_counter() - started_wall, 1),
                     "cpu_s": round(time.process_time() - started_cpu, 1)}
        services.demo_checkpoints_register(built=built)
    start = Checkpoint.objects.get(name=args.start)
    from webapp.loop import app_server

    with app_server() as base_url:  # the app on a thread, for the simulated annotator's HTTP requests
        result = run_loop(base_url=base_url, start=start, sizes=sizes)
    result.update(demo_build=build, start=args.start, machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                  load_average_end=os.getloadavg(), command=" ".join([sys.executable, "-m", "bench.bench_loop",
                                                                       *(argv if argv is not None else sys.argv[1:])]))
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(_report(result))


def _report(r: dict[str, Any]) -> str:
    lines = [f"loop: {r['loop_wall_s']} s wall, {r['loop_cpu_s']} s CPU (demo build: {r['demo_build'] or 'reused'})"]
    for row in r["phases"]:
        lines.append(f"  {row['phase']:<45} {row['wall_s']:>8} s wall {row['cpu_s']:>8} s CPU  load {row['load']}")
    lines.append(f"judgments: {r['judgments']}; reward models: {r['reward_models']}")
    for row in r["rounds"]:
        if "max_vs_median" in row:
            lines.append(f"{row['name']}: Figure 7 {row['max_vs_median']}; pool {row['pool_size']} (new "
                         f"{row['pool_new_prompts']}, replaced {row['pool_replaced']}, kept {row['pool_kept_earlier']});"
                         f" SFT loss {row['sft_loss_first']} -> {row['sft_loss_last']}")
    for key, w in r["win_rate"].items():
        lines.append(f"{key}: win rate {w['win_rate']:.3f} ({w['wins']} W / {w['losses']} L / {w['ties']} T of {w['n']}),"
                     f" 95% CI {w['ci95']}, sign test p {w['sign_test_p']:.2g}; helpful {w['new_helpful']:.3f} vs "
                     f"{w['old_helpful']:.3f}, correct {w['new_correct']:.3f} vs {w['old_correct']:.3f}, safe on "
                     f"adversarial {w['new_safe_on_adversarial']:.2f} vs {w['old_safe_on_adversarial']:.2f}")
    for row in r["rounds"]:
        if "curve" in row:
            lines.append(f"{row['name']} curve (iteration, reward_raw, kl, eval_reward):")
            for p in row["curve"]:
                lines.append(f"  {p['iteration']:>3} {p.get('reward_raw', float('nan')):8.4f} "
                             f"{p.get('kl', float('nan')):8.4f} {p.get('eval_reward', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
