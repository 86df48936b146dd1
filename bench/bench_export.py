"""Preference export throughput and memory on PostgreSQL: rows/s and peak RSS for 100k and 1M judgments.

Generates judged comparisons with COPY into a dedicated database (default tandem_bench, created and
migrated here; every table of it is emptied first), then measures, each in a fresh process so that
peak RSS belongs to the export alone:

- generator: annotation.exports.export_rows + stream_jsonl, in-process, chunks discarded (the code
  the endpoint runs, without HTTP);
- http: GET /api/v1/export/preferences through gunicorn (one sync worker), read and discarded by
  this process; RSS is the gunicorn worker's.

Rows look like production's: a prompt of ~150 characters (a third with a two-turn context), two
answers of ~400 characters from 4 checkpoints, strengths 0-3, safety labels; 40 comparisons per prompt.
Peak RSS is sampled every 20 ms with psutil; "growth" is the peak minus the RSS before the export.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/tandem_bench .venv/bin/python bench/bench_export.py
    ... --sizes 100000 --modes generator     # a quicker run
"""
from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/tandem_bench"
os.environ.setdefault("DATABASE_URL", DEFAULT_URL)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

COMPARISONS_PER_PROMPT = 40  # pairs among 10 answers per prompt (45 possible)
ANSWERS_PER_PROMPT = 10
WORDS = ("the model answer data human reward safety policy weekly batch token prompt context response helpful "
         "harmless judgment strength margin checkpoint sample temperature annotator dialogue").split()


def ensure_database() -> None:
    import psycopg2
    from urllib.parse import urlsplit

    url = urlsplit(os.environ["DATABASE_URL"])
    name = url.path.lstrip("/")
    admin = psycopg2.connect(host=url.hostname, port=url.port or 5432, user=url.username or "postgres",
                             password=url.password, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if not cur.fetchone():
            cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()


def setup_django():
    import django

    django.setup()


def _text(rng: random.Random, n_chars: int) -> str:
    words = []
    size = 0
    while size < n_chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words).capitalize() + "."


def _copy(cursor, table: str, columns: list[str], rows) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(r"\N" if v is None else str(v).replace("\\", "\\\\").replace("\t", " ")
                               .replace("\n", "\\n") for v in row))
        buffer.write("\n")
        if buffer.tell() > 32 << 20:
            buffer.seek(0)
            cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buffer)
            buffer = io.StringIO()
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buffer)


def generate(n_judgments: int) -> None:
    """Exactly n_judgments human judgments (each with its comparison and assignment), via COPY."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    with connection.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'django_migrations'"
                    " AND tablename NOT LIKE 'auth_%%' AND tablename NOT LIKE 'django_%%'")
        tables = [r[0] for r in cur.fetchall()]
        cur.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    rng = random.Random(0)
    now = "2026-11-16 12:00:00+00"
    annotators = [User.objects.get_or_create(username=f"bench-ann-{i}")[0].id for i in range(50)]
    n_prompts = -(-n_judgments // COMPARISONS_PER_PROMPT)
    t0 = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("INSERT INTO policy_checkpoint (name, format, path, tokenizer_path, tokenizer_sha256, params, "
                    "sha256, created_at) SELECT 'bench-' || g, 'external', '', '', '', '{}', '', now() "
                    "FROM generate_series(1, 4) g")
        cur.execute("INSERT INTO annotation_batch (label, kind, iso_year, iso_week, status, created_at, content_hash, "
                    "test_size) VALUES ('2026-W47', 'weekly', 2026, 47, 'open', now(), '', 0)")
        raw = connection.connection  # the psycopg2 connection under Django's wrapper
        pcur = raw.cursor()
        context = '[{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]'
        _copy(pcur, "annotation_prompt",
              ["id", "text", "context", "system_prompt", "source", "language", "tags", "is_adversarial",
               "awaiting_responses", "external_id", "created_at"],
              ((p, _text(rng, 150), context % (_text(rng, 80), _text(rng, 200)) if p % 3 == 0 else "[]",
                "", "demo", "en", "[]", "t" if p % 5 == 0 else "f", "f", "", now) for p in range(1, n_prompts + 1)))
        _copy(pcur, "annotation_response",
              ["id", "prompt_id", "checkpoint_id", "temperature", "sampling", "text", "created_at"],
              ((p * ANSWERS_PER_PROMPT + k, p, 1 + k % 4, 0.7 + 0.1 * (k % 5), "{}", _text(rng, 300 + 20 * k), now)
               for p in range(1, n_prompts + 1) for k in range(ANSWERS_PER_PROMPT)))
        pairs = [(a, b) for a in range(ANSWERS_PER_PROMPT) for b in range(a + 1, ANSWERS_PER_PROMPT)]
        pairs = pairs[:COMPARISONS_PER_PROMPT]

        def comparison_rows():
            for c in range(n_judgments):
                p, (a, b) = 1 + c // COMPARISONS_PER_PROMPT, pairs[c % COMPARISONS_PER_PROMPT]
                yield (c + 1, p, p * ANSWERS_PER_PROMPT + a, p * ANSWERS_PER_PROMPT + b, 1, "sampling", 1,
                       "t" if c % 20 == 0 else "f", now)

        _copy(pcur, "annotation_comparison",
              ["id", "prompt_id", "response_a_id", "response_b_id", "batch_id", "origin", "overlap", "is_test",
               "created_at"], comparison_rows())
        _copy(pcur, "annotation_assignment",
              ["id", "comparison_id", "annotator_id", "displayed_order", "status", "leased_at", "submitted_at"],
              ((c, c, annotators[c % 50], "AB", "submitted", now, now) for c in range(1, n_judgments + 1)))

        def judgment_rows():
            bins = {(True, True): "both_safe", (False, False): "both_unsafe"}
            for c in range(1, n_judgments + 1):
                chosen = "A" if rng.random() < 0.5 else "B"
                a_safe, b_safe = rng.random() < 0.9, rng.random() < 0.9
                cs, os_ = (a_safe, b_safe) if chosen == "A" else (b_safe, a_safe)
                bin_ = bins.get((cs, os_)) or ("chosen_safe_other_unsafe" if cs else "chosen_unsafe_other_safe")
                yield (c, c, c, annotators[c % 50], "human", chosen, rng.randint(0, 3), "t" if a_safe else "f",
                       "t" if b_safe else "f", bin_, "[]", "", 12.5, "", now)

        _copy(pcur, "annotation_judgment",
              ["id", "comparison_id", "assignment_id", "annotator_id", "source", "chosen", "strength", "a_safe",
               "b_safe", "safety_bin", "harm_categories", "note", "seconds_spent", "idempotency_key", "created_at"],
              judgment_rows())
        for table in ("annotation_prompt", "annotation_response", "annotation_comparison", "annotation_assignment",
                      "annotation_judgment"):
            pcur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        pcur.execute("ANALYZE")
    print(f"generated {n_judgments:,} judgments ({n_prompts:,} prompts) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)


class PeakRSS:
    """Samples a process's RSS every 20 ms on a thread; .peak in bytes."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure_generator(export_format: str) -> dict:
    setup_django()
    from annotation import exports
    from annotation.models import Judgment

    options = exports.ExportOptions(include_unsafe_chosen=True)
    n_rows = n_bytes = 0
    with PeakRSS(os.getpid()) as rss:
        t0 = time.perf_counter()
        rows = exports.export_rows(Judgment.objects.all(), options=options)
        chunks = exports.stream_csv(rows) if export_format == "csv" else exports.stream_jsonl(rows)
        for chunk in chunks:
            n_bytes += len(chunk)
            n_rows += chunk.count(b"\n")
        seconds = time.perf_counter() - t0
    if export_format == "csv":
        n_rows -= 1  # the header (rows hold no raw newlines: they are quoted as \r\n only at row ends)
    return {"rows": n_rows, "seconds": seconds, "bytes": n_bytes, "baseline": rss.baseline, "peak": rss.peak}


def measure_http(port: int = 8765) -> dict:
    """GET the export through gunicorn (1 sync worker) and discard it; RSS of the worker."""
    import http.client

    import psutil

    setup_django()
    from annotation.models import Judgment
    from django.contrib.auth.models import Group, User
    from webapp.auth import api_token_issue

    user, _ = User.objects.get_or_create(username="bench-researcher")
    user.groups.add(Group.objects.get_or_create(name="researcher")[0])
    user.api_tokens.all().delete()
    _, token = api_token_issue(user=user, name="bench")
    env = {**os.environ, "DEBUG": "0", "TANDEM_API_USER_RATE": "100000/min"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1", "--timeout", "900",
         "--log-level", "warning"], cwd=REPO, env=env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
                conn.request("GET", "/api/v1/checkpoints", headers={"Authorization": f"Bearer {token}"})
                conn.getresponse().read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        worker = psutil.Process(server.pid).children()[0]
        n_bytes = n_rows = 0
        with PeakRSS(worker.pid) as rss:
            t0 = time.perf_counter()
            conn.request("GET", "/api/v1/export/preferences?include_unsafe_chosen=true",
                         headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            assert response.status == 200, response.status
            while chunk := response.read(1 << 20):
                n_bytes += len(chunk)
                n_rows += chunk.count(b"\n")
            seconds = time.perf_counter() - t0
        assert n_rows == Judgment.objects.count()
        return {"rows": n_rows, "seconds": seconds, "bytes": n_bytes, "baseline": rss.baseline, "peak": rss.peak}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--modes", default="generator,csv,http")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement in a fresh process
        import json

        mode = args.child
        result = measure_http() if mode == "http" else measure_generator("csv" if mode == "csv" else "jsonl")
        print(json.dumps(result))
        return
    ensure_database()
    import json

    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        subprocess.run([sys.executable, "-c", f"import bench.bench_export as b; b.setup_django(); b.generate({size})"],
                       cwd=REPO, check=True)
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, str(Path(__file__)), "--child", mode], cwd=REPO, check=True,
                                 capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["load"] = os.getloadavg()[0]  # the machine is shared: how busy it was meanwhile
            results.append((size, mode, result))
            print(f"  {size:>9,} {mode:<9} {result['rows'] / result['seconds']:>10,.0f} rows/s", file=sys.stderr)
    print()
    print("| judgments | path | rows/s | MB/s | seconds | RSS before (MB) | peak RSS (MB) | growth (MB) | load after |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"generator": "JSONL, in-process", "csv": "CSV, in-process", "http": "JSONL over HTTP (gunicorn)"}
    for size, mode, r in results:
        mb = 1024 * 1024
        print(f"| {size:,} | {names[mode]} | {r['rows'] / r['seconds']:,.0f} | {r['bytes'] / mb / r['seconds']:,.1f} | "
              f"{r['seconds']:.1f} | {r['baseline'] / mb:.0f} | {r['peak'] / mb:.0f} | "
              f"{(r['peak'] - r['baseline']) / mb:.1f} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
