"""Judgment submission over the API: requests/s and p50/p90/p99 latency with concurrent clients against
gunicorn on PostgreSQL.

Setup (a dedicated database, default tandem_bench_submit, emptied first): 32 annotators, each with an
API token and a stock of pre-leased assignments (one per comparison), so the measured request is the
submission itself: POST /api/v1/assignments/{id}/judgment with an Idempotency-Key, through token
authentication, the role check, the throttle, judgment_submit (row locks, the batch, the insert) and
the serializer.

The load generator is one asyncio process speaking raw HTTP/1.1 (keep-alive where the server allows it),
each connection acting for one annotator; it costs a few percent of a core. Requests are timed from
the first byte written to the last byte read; the first --warmup requests are not counted. gunicorn,
PostgreSQL and the client share the machine's cores.

    .venv/bin/python bench/bench_submit.py                       # the reported configurations
    .venv/bin/python bench/bench_submit.py --configs sync:4 --concurrency 8 --requests 3000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tandem_bench_submit")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
N_ANNOTATORS = 32
BODY = b'{"chosen": "A", "strength": 2, "a_safe": true, "b_safe": false, "seconds_spent": 12.5}'


def setup(n_requests: int) -> dict[str, list[int]]:
    """Fresh data: tokens and pre-leased assignment ids per annotator."""
    import django

    sys.path.insert(0, str(REPO / "bench"))
    from bench_export import ensure_database  # same folder

    ensure_database()
    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from annotation.models import Assignment, Comparison, Prompt, Response
    from policy.models import Checkpoint
    from webapp.auth import api_token_issue

    call_command("migrate", verbosity=0)
    with connection.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'django_migrations'"
                    " AND tablename NOT LIKE 'django_%%' AND tablename <> 'auth_permission' "
                    " AND tablename <> 'django_content_type'")
        cur.execute(f"TRUNCATE {', '.join(r[0] for r in cur.fetchall())} RESTART IDENTITY CASCADE")
    group = Group.objects.get_or_create(name="annotator")[0]
    a, b = (Checkpoint.objects.create(name=f"bench-{n}", format="external") for n in "ab")
    prompts = Prompt.objects.bulk_create(Prompt(text=f"Question {i}: how do tides work?", source="demo")
                                         for i in range(n_requests))
    responses = Response.objects.bulk_create(
        Response(prompt=p, checkpoint=c, text=f"{c.name} answers {p.id}: " + "the moon pulls the sea. " * 20)
        for p in prompts for c in (a, b))
    comparisons = Comparison.objects.bulk_create(
        Comparison(prompt=p, response_a=responses[2 * i], response_b=responses[2 * i + 1], origin="demo")
        for i, p in enumerate(prompts))
    plan: dict[str, list[int]] = {}
    now = timezone.now()
    for k in range(N_ANNOTATORS):
        user = User.objects.create_user(username=f"bench-ann-{k}")
        user.groups.add(group)
        _, token = api_token_issue(user=user, name="bench")
        mine = comparisons[k::N_ANNOTATORS]
        leased = Assignment.objects.bulk_create(
            Assignment(comparison=c, annotator=user, displayed_order="AB", leased_at=now) for c in mine)
        plan[token] = [x.id for x in leased]
    connection.close()
    return plan


async def _client(port: int, work: list[tuple[str, int]], latencies: list[float], errors: list[str]) -> None:
    """One keep-alive connection submitting `work` ((token, assignment id) pairs) one after another."""
    reader = writer = None
    for token, assignment_id in work:
        request = (f"POST /api/v1/assignments/{assignment_id}/judgment HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                   f"Idempotency-Key: bench-{assignment_id}\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter()
        writer.write(request)
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers.get("content-length", 0)))
        latencies.append(time.perf_counter() - start)
        if not status_line.startswith(b"HTTP/1.1 201"):
            errors.append(status_line.decode().strip())
        if headers.get("connection", "").lower() == "close":
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(port: int, plan: dict[str, list[int]], concurrency: int) -> tuple[list[float], list[str], float]:
    """`concurrency` connections; connection i works for annotators i, i + concurrency, ... in turn."""
    tokens = list(plan)
    work = [[(t, a) for t in tokens[i::concurrency] for a in plan[t]] for i in range(concurrency)]
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(port, w, latencies, errors) for w in work))
    return latencies, errors, time.perf_counter() - start


def _cpu_by_owner(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of gunicorn, the bench database's PostgreSQL backends, this client, and
    everything else on the machine (other people's work shares these cores)."""
    import psutil

    db = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
    gunicorn = {server_pid, *(c.pid for c in psutil.Process(server_pid).children())}
    totals = {"gunicorn": 0.0, "postgres": 0.0, "client": 0.0, "others": 0.0}
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            times, cmd = process.info["cpu_times"], " ".join(process.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if times is None:
            continue
        owner = ("gunicorn" if process.info["pid"] in gunicorn else "postgres" if f" {db} " in cmd
                 else "client" if process.info["pid"] == os.getpid() else "others")
        totals[owner] += times.user + times.system
    return totals


def run_config(worker_class: str, workers: int, threads: int, concurrency: int, n_requests: int, warmup: int,
               port: int) -> dict:
    plan = setup(n_requests)
    env = {**os.environ, "DEBUG": "0", "TANDEM_API_USER_RATE": "1000000/min", "LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-b", f"127.0.0.1:{port}", "-w", str(workers),
           "-k", worker_class, "--log-level", "warning", "--keep-alive", "30"]
    if worker_class == "gthread":
        cmd += ["--threads", str(threads)]
    server = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        import http.client

        deadline = time.time() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/v1/assignments")
                conn.getresponse().read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        before = _cpu_by_owner(server.pid)
        load_before = os.getloadavg()[0]
        latencies, errors, seconds = asyncio.run(_load(port, plan, concurrency))
        after = _cpu_by_owner(server.pid)
        load_after = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    measured = sorted(latencies[warmup:])
    q = statistics.quantiles(measured, n=100, method="inclusive")
    # Throughput over the measured part: requests after warm-up / their share of the wall time.
    return {"config": f"{worker_class} x{workers}" + (f" ({threads} threads)" if worker_class == "gthread" else ""),
            "concurrency": concurrency, "requests": len(measured), "seconds": seconds,
            "rps": len(latencies) / seconds, "p50": q[49] * 1000, "p90": q[89] * 1000, "p99": q[98] * 1000,
            "errors": len(errors), "first_error": errors[0] if errors else "", "load": (load_before, load_after),
            "cpu": {k: (after[k] - before.get(k, 0.0)) / seconds * 100 for k in after}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sync:3,sync:5,gthread:3x4",
                        help="worker_class:workers[xthreads], comma-separated")
    parser.add_argument("--concurrency", default="4,8,16")
    parser.add_argument("--requests", type=int, default=4000, help="submissions per run")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    args = parser.parse_args()
    results = []
    for config in args.configs.split(","):
        worker_class, _, sizes = config.partition(":")
        workers, _, threads = sizes.partition("x")
        for concurrency in [int(c) for c in args.concurrency.split(",") for _ in range(args.repeats)]:
            r = run_config(worker_class, int(workers), int(threads or 1), concurrency, args.requests, args.warmup,
                           args.port)
            results.append(r)
            print(f"  {r['config']:<22} c={concurrency:<3} {r['rps']:7.0f} req/s  p50 {r['p50']:6.1f} ms  "
                  f"p99 {r['p99']:6.1f} ms  errors {r['errors']} {r['first_error']}  cpu {r['cpu']}", file=sys.stderr)
    print()
    # CPU ms per submission = CPU % / 100 * 1000 / (req/s): what a submission costs, whatever else runs.
    print("| gunicorn | clients | submissions | req/s | p50 (ms) | p90 (ms) | p99 (ms) | errors "
          "| CPU % gunicorn / postgres / client / others | CPU ms per submission gunicorn / postgres | load before, after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        cpu = r["cpu"]
        print(f"| {r['config']} | {r['concurrency']} | {r['requests']:,} | {r['rps']:,.0f} | {r['p50']:.1f} | "
              f"{r['p90']:.1f} | {r['p99']:.1f} | {r['errors']} | {cpu['gunicorn']:.0f} / {cpu['postgres']:.0f} / "
              f"{cpu['client']:.0f} / {cpu['others']:.0f} | {10 * cpu['gunicorn'] / r['rps']:.1f} / "
              f"{10 * cpu['postgres'] / r['rps']:.1f} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
