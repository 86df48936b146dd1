"""Reward-model accuracy through the whole platform: data in, frozen batch, snapshot, launch service, the
worker task, the evaluation stored on the run. Two experiments, each in a scratch database and var folder:

demo   Simulated annotators (annotation/simulator.py, noise 0.1) judge demo-world comparisons through the
       real REST API of a server started here; the batch is frozen (--test-fraction held out); a
       helpfulness RM starts from the demo policy's demo-sft (built here: policy.demo_policy) and is
       evaluated on the held-out slice. Next to it: the length-only baseline and how often the simulated
       labels of the test slice agree with the noiseless oracle (the ceiling the noise sets).
hh     The real Anthropic HH harmless-base test file (../shared/data) imported through the importer with a
       third held out; a safety RM, random tiny Llama with the Llama 2 tokenizer (no chat model to start
       from), trained on the other two thirds, evaluated on the third, next to the length-only baseline
       and the paper's 74.7% (70B). Skipped cleanly when the data is absent.

    .venv/bin/python bench/bench_reward_accuracy.py demo [--comparisons 1200] [--quick]
    .venv/bin/python bench/bench_reward_accuracy.py hh [--epochs 1] [--dim 128] [--layers 4]

Prints one JSON object (also written to --out if given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
LLAMA_TOKENIZER = SHARED / "llama2-tokenizer" / "tokenizer.model"


def scratch_django(var_dir: Path, test_fraction: float) -> None:
    """Point the settings at a fresh var folder and SQLite file, then set Django up and migrate."""
    os.environ.update({
        "TANDEM_VAR_DIR": str(var_dir), "DATABASE_URL": f"sqlite:///{var_dir / 'bench.sqlite3'}",
        "TANDEM_TEST_SLICE_FRACTION": str(test_fraction), "TANDEM_TEST_SLICE_SIZE": "1000000",
        "CELERY_BROKER_URL": "memory://", "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "TANDEM_API_USER_RATE": "1000000/min", "OMP_WAIT_POLICY": "PASSIVE",
    })
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def serve(port: int = 0):
    """The Django WSGI app on a local port, one thread per request; returns (base url, server)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    class Threaded(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    server = make_server("127.0.0.1", port, get_wsgi_application(), server_class=Threaded, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def summary(run) -> dict:
    metrics = run.metrics
    pick = ("n", "accuracy", "loss", "by_strength", "by_safety_bin", "length_baseline")
    return {
        "run": run.pk, "kind": run.kind, "status": run.status, "error": run.error,
        "counts": run.data_manifest.get("counts"), "steps": metrics.get("steps"),
        "train_seconds": (metrics.get("train") or {}).get("seconds"),
        "pairs_per_s": (metrics.get("train") or {}).get("pairs_per_s"),
        "truncated_sequences": (metrics.get("train") or {}).get("truncated_sequences"),
        "final_loss": metrics.get("final_loss"),
        "eval": {name: {k: m.get(k) for k in pick} | {"ece": (m.get("calibration") or {}).get("ece"),
                                                       "calibration": (m.get("calibration") or {}).get("bins")}
                 for name, m in (metrics.get("eval") or {}).items()},
    }


# --- demo world ------------------------------------------------------------------------------------


def demo(args) -> dict:
    import torch

    from annotation import services as annotation_services
    from annotation.models import Batch, Judgment
    from annotation.simulator import SimulatedAnnotator, simulated_annotator_create, simulation_comparisons_create
    from policy import services as policy_services
    from policy.demo_policy import DemoBuildConfig, build_demo_policy
    from policy.demo_world import as_world_prompt, default_world, prefer
    from rewards import services
    from workers.rewards import train_reward_model

    torch.set_num_threads(args.threads)
    out: dict = {"experiment": "demo", "machine": machine(), "args": vars(args)}
    started = time.perf_counter()
    build = DemoBuildConfig(eval_prompts=0, device="cpu", **({"base_steps": 150, "sft_steps": 60} if args.quick else {}))
    built = build_demo_policy(Path(os.environ["TANDEM_VAR_DIR"]) / "models" / "demo", build)
    base, sft = policy_services.demo_checkpoints_register(built=built)
    out["policy_build_seconds"] = time.perf_counter() - started

    made = simulation_comparisons_create(count=args.comparisons, seed=args.seed)
    url, server = serve()
    people = [simulated_annotator_create(username=f"sim-{i}") for i in range(args.annotators)]
    t0 = time.perf_counter()
    reports = []
    threads = [threading.Thread(target=lambda i=i: reports.append(SimulatedAnnotator(
        url, people[i][1], noise=args.noise, seed=args.seed * 100 + i).run(len(made)))) for i in range(len(people))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    judged = sum(r.submitted for r in reports)
    out["simulation"] = {"comparisons": len(made), "judgments": judged, "seconds": time.perf_counter() - t0,
                         "flip_rate": sum(r.flipped for r in reports) / judged, "noise": args.noise}

    batch = annotation_services.batch_freeze(batch=Batch.objects.get(kind=Batch.Kind.WEEKLY))
    world = default_world()
    test = Judgment.objects.filter(comparison__batch=batch, comparison__is_test=True).select_related(
        "comparison__prompt", "comparison__response_a", "comparison__response_b")
    agree = sum(j.chosen == prefer(as_world_prompt(j.comparison.prompt, world), j.comparison.response_a.text,
                                   j.comparison.response_b.text, world).choice for j in test)
    out["test_labels_agree_with_oracle"] = agree / test.count()

    config = {"micro_batch_size": 8, "grad_accum_steps": 2, "lr": args.lr, "max_seq_len": 256, "device": "cpu",
              "checkpoint_every": 0, "seed": args.seed, "epochs": args.epochs}
    runs = services.reward_runs_launch(kinds=args.kinds, base_checkpoint=sft, batches=[batch], config=config,
                                       enqueue=False)
    out["runs"] = []
    for run in runs:
        train_reward_model(run.pk)
        run.refresh_from_db()
        out["runs"].append(summary(run))
    out["seconds"] = time.perf_counter() - started
    out["machine"]["load_average_after"] = os.getloadavg()
    return out


# --- Anthropic HH harmless-base ---------------------------------------------------------------------


def hh(args) -> dict:
    import torch

    from annotation.importers import import_hh_rlhf
    from policy import services as policy_services
    from policy.checkpoints import save_meta
    from policy.model import ModelArgs, Transformer
    from policy.models import Checkpoint
    from policy.tokenizer import Tokenizer
    from rewards import services
    from workers.rewards import train_reward_model

    torch.set_num_threads(args.threads)
    out: dict = {"experiment": "hh", "machine": machine(), "args": vars(args)}
    started = time.perf_counter()
    report = import_hh_rlhf(HH)
    out["import"] = {"pairs": report.pairs, "batch": report.batch, "skipped": dict(report.skipped_counts)}
    from annotation.models import Batch

    batch = Batch.objects.get(label=report.batch)
    out["import"]["test_size"] = batch.test_size

    folder = Path(os.environ["TANDEM_VAR_DIR"]) / "models" / "tiny-llama2-vocab"
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(LLAMA_TOKENIZER.read_bytes())
    torch.manual_seed(args.seed)
    vocab = Tokenizer(folder / "tokenizer.model").n_words
    model = Transformer(ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads // 2,
                                  vocab_size=vocab, multiple_of=64, max_seq_len=args.max_seq_len))
    save_meta(model, folder)
    base = policy_services.checkpoint_register(name="tiny-random", format=Checkpoint.Format.META, path=str(folder))
    config = {"micro_batch_size": 8, "grad_accum_steps": 4, "lr": args.lr, "max_seq_len": args.max_seq_len,
              "epochs": args.epochs, "device": "cpu", "checkpoint_every": 0, "seed": args.seed}
    (run,) = services.reward_runs_launch(kinds=["safety"], base_checkpoint=base, batches=[batch], config=config,
                                         enqueue=False)
    train_reward_model(run.pk)
    run.refresh_from_db()
    out["runs"] = [summary(run)]
    out["paper_safety_rm_anthropic_harmless"] = 0.747
    out["seconds"] = time.perf_counter() - started
    out["machine"]["load_average_after"] = os.getloadavg()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--comparisons", type=int, default=1200)
    d.add_argument("--annotators", type=int, default=3)
    d.add_argument("--noise", type=float, default=0.1)
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--kinds", nargs="+", default=["helpfulness"])
    d.add_argument("--quick", action="store_true", help="a shorter demo-policy build")
    h = sub.add_parser("hh")
    h.add_argument("--test-fraction", type=float, default=1 / 3)
    h.add_argument("--dim", type=int, default=128)
    h.add_argument("--layers", type=int, default=4)
    h.add_argument("--heads", type=int, default=4)
    h.add_argument("--max-seq-len", type=int, default=512)
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--epochs", type=int, default=1)
    for p in (d, h):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.experiment == "hh" and not (HH.is_file() and LLAMA_TOKENIZER.is_file()):
        print(json.dumps({"experiment": "hh", "skipped": f"real data not available: {HH} / {LLAMA_TOKENIZER}"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-reward-accuracy-") as scratch:
        scratch_django(Path(scratch), args.test_fraction)
        result = demo(args) if args.experiment == "demo" else hh(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
