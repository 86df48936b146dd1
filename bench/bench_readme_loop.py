"""The README's loop on its defaults, as a newcomer runs it, at several seeds: `manage.py demo_loop` (the
same steps and defaults as the README's commands) in a scratch var folder per seed, each in a fresh
process, reusing one built demo policy. Prints one row per seed and the issue's targets beside them.

    .venv/bin/python -m bench.bench_readme_loop --demo-dir /tmp/demo/models/demo --seeds 0,1,2
    .venv/bin/python -m bench.bench_readme_loop --demo-dir DIR --seeds 0 --sizes '{"stages": ["rejection_sampling", "sft", "ppo"]}'

--demo-dir is a folder holding demo-base/ and demo-sft/ as policy_demo_build writes them (build one with
`manage.py policy_demo_build --out DIR`). Wall and CPU seconds are the loop's (demo policy excluded),
measured around the child process; the load average is printed beside them, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGISTER = """
import json, os, sys, django
django.setup()
from policy import services
demo = sys.argv[1]
built = [{"name": n, "path": f"{demo}/{n}", "tokenizer_path": f"{demo}/{n}/tokenizer.model",
          "parent": "demo-base" if n == "demo-sft" else None} for n in ("demo-base", "demo-sft")]
services.demo_checkpoints_register(built=built)
"""


def run_seed(demo_dir: Path, seed: int, sizes: str, threads: int, keep: bool) -> dict:
    var = Path(tempfile.mkdtemp(prefix=f"readme-loop-s{seed}-"))
    shutil.copytree(demo_dir, var / "models" / "demo")
    env = {**os.environ, "TANDEM_VAR_DIR": str(var), "TANDEM_MODEL_ROOTS": str(var / "models"),
           "DJANGO_SETTINGS_MODULE": "webapp.settings", "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": str(threads)}
    for name in ("DATABASE_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)  # embedded defaults, as the README runs
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    subprocess.run([python, "-c", REGISTER, str(var / "models" / "demo")], cwd=REPO, env=env, check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = var / "loop.json"
    subprocess.run([python, "manage.py", "demo_loop", "--seed", str(seed), "--sizes", sizes, "--json", str(out)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.read_text())
    result.update(seed=seed, wall_s=round(time.perf_counter() - started, 1),
                  cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                  load=round(os.getloadavg()[0], 2), var=str(var))
    if not keep:
        shutil.rmtree(var, ignore_errors=True)
    return result


def row(r: dict) -> str:
    rms = {rm["kind"]: rm for rm in r["reward_models"]}
    ev = r["round"]["evaluation"] or {}
    oracle = ev.get("oracle") or {}
    h, s = rms["helpfulness"], rms["safety"]
    lo, hi = oracle.get("ci95") or (float("nan"), float("nan"))
    return (f"| {r['seed']} | {h['accuracy']:.3f} / {h['length_baseline']:.3f} (n {h['n']}) | "
            f"{s['accuracy']:.3f} / {s['length_baseline']:.3f} | {oracle.get('win_rate', float('nan')):.3f} "
            f"({oracle.get('wins')} W / {oracle.get('losses')} L / {oracle.get('ties')} T of {oracle.get('n')}) | "
            f"{lo:.3f}-{hi:.3f} | {oracle.get('new_safe_on_adversarial')} vs {oracle.get('parent_safe_on_adversarial')} | "
            f"{r['wall_s']} | {r['cpu_s']} | {r['load']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="Folder with demo-base/ and demo-sft/")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sizes", default="{}", help="JSON over webapp.loop.LoopSizes (default: the README's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop (default 2: the machine)")
    parser.add_argument("--keep", action="store_true", help="Keep each seed's scratch folder")
    parser.add_argument("--json", help="Write every result here")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir).resolve()
    results = [run_seed(demo, int(s), args.sizes, args.threads, args.keep) for s in args.seeds.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; sizes {args.sizes}")
    print("| seed | helpfulness RM acc / length baseline | safety RM acc / baseline | oracle win rate vs parent | "
          "95% CI | safe on adversarial new vs parent | wall s | CPU s | load |")
    print("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for r in results:
        print(row(r))
    print("targets: helpfulness RM >= length baseline + 0.05; oracle win rate >= 0.60 with the CI above 0.50; "
          "wall <= 600 s on 2 cores")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
