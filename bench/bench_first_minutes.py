"""The first minutes of `scripts/run` on a fresh clone: installation, the site's first answer, the demo
policy ready.

Clones the repository's HEAD (or --rev) into a temporary folder (no .venv, no var/: what a newcomer
has), runs scripts/run there on its own port in its own process group, and times from the start and
from the end of the installation (scripts/run prints "Installed in N s." after python -m venv, pip
and byte-compiling; pip's cache is reused):

  first answer  GET / answers 200 (after the redirect to the login page)
  demo policy   demo-base and demo-sft are registered (read from the clone's SQLite database) and
                /jobs/ shows their build succeeded
  30 answers    the sampling jobs (the 30 demo-world prompts) succeeded, as /jobs/ shows them

It also checks that the address and the logins are the last lines before the server's log, records
when the build entered each phase, and prints the machine (cores, CPU model, load average). Then it
stops everything: SIGTERM to the process group, SIGKILL after a grace period; every wait is bounded.

    python3 bench/bench_first_minutes.py                      # HEAD, port 8123
    python3 bench/bench_first_minutes.py --rev f134a42        # before the demo policy became a job
    python3 bench/bench_first_minutes.py --port 8124 --keep   # keep the clone for a look afterwards
"""
from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOGIN = ("researcher", "research-me")  # a demo login that may read /jobs/


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {"nproc": str(os.cpu_count()), "cpu": model.group(1).strip() if model else platform.processor(),
            "python": platform.python_version()}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Output(threading.Thread):
    """scripts/run's merged stdout and stderr, line by line, each with the second it appeared."""

    def __init__(self, stream, started: float, echo: bool):
        super().__init__(daemon=True)
        self.stream, self.started, self.echo = stream, started, echo
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((time.monotonic() - self.started, line))
            if self.echo:
                print(f"  [{self.lines[-1][0]:6.1f}] {line}", flush=True)

    def first(self, pattern: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in self.lines if re.search(pattern, line)), None)


class Site:
    """An HTTP client with a session: the login form, then the researchers' JSON."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def status(self, path: str) -> int | None:
        try:
            with self.opener.open(self.base + path, timeout=5) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def login(self) -> bool:
        if self.status("login/") != 200:
            return False
        token = next((c.value for c in self.jar if c.name == "csrftoken"), "")
        data = urllib.parse.urlencode({"username": LOGIN[0], "password": LOGIN[1],
                                       "csrfmiddlewaretoken": token}).encode()
        request = urllib.request.Request(self.base + "login/", data=data, headers={"Referer": self.base + "login/"})
        try:
            with self.opener.open(request, timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError):
            return False
        return self.jobs() is not None

    def jobs(self) -> list[dict] | None:
        try:
            with self.opener.open(self.base + "jobs/status.json", timeout=5) as response:
                return json.loads(response.read())["jobs"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None


def registered(database: Path) -> set[str]:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute("SELECT name FROM policy_checkpoint WHERE name IN ('demo-base', 'demo-sft')").fetchall()
    except sqlite3.Error:
        return set()
    return {name for (name,) in rows}


def wait(what: str, predicate, timeout: float, process: subprocess.Popen, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise RuntimeError(f"scripts/run exited ({process.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 20.0) -> float:
    """SIGTERM to scripts/run's process group (server, worker), SIGKILL after `grace`; seconds it took."""
    started = time.monotonic()
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything left in the group (a worker child)
    except ProcessLookupError:
        pass
    process.wait()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(REPO), help="The repository to clone.")
    parser.add_argument("--rev", help="Check this commit out in the clone (default: HEAD), e.g. one from before.")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--start-timeout", type=float, default=1200, help="Seconds allowed until the site answers.")
    parser.add_argument("--policy-timeout", type=float, default=900, help="Then for the demo policy.")
    parser.add_argument("--answers-timeout", type=float, default=600, help="Then for the 30 demo prompts.")
    parser.add_argument("--keep", action="store_true", help="Keep the clone (its path is printed).")
    parser.add_argument("--quiet", action="store_true", help="Do not echo scripts/run's output.")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, Python {info['python']}; load average {load()}")
    workdir = Path(tempfile.mkdtemp(prefix="tandem-first-minutes-"))
    clone = workdir / "tandem"
    subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
    if args.rev:
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", args.rev], check=True)
    head = subprocess.run(["git", "-C", str(clone), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()
    print(f"clone of {args.repo} at {head[:100]}\n  in {clone}")
    # Only what a newcomer's shell would have: none of this session's database, broker or model roots.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "CELERY_", "TANDEM_", "DJANGO_", "VIRTUAL_ENV"))}
    env.update(HOST=args.host, PORT=str(args.port), PYTHONUNBUFFERED="1")
    site = Site(f"http://{args.host}:{args.port}/")
    database = clone / "var" / "tandem.sqlite3"
    since_start: dict[str, float] = {}
    phases: list[tuple[float, str]] = []
    loads = {"start": load()}
    started = time.monotonic()
    process = subprocess.Popen(["scripts/run"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    out = Output(process.stdout, started, echo=not args.quiet)
    out.start()
    error = None
    try:
        # Before this change scripts/run printed no "Installed" line and trained before serving: the
        # first answer is timed from the start either way.
        wait("HTTP 200 on /", lambda: site.status("") == 200, args.start_timeout, process, interval=0.1)
        since_start["first_answer"] = time.monotonic() - started
        loads["first answer"] = load()
        wait("login as researcher", site.login, 30, process)

        def demo_done():
            rows = [job for job in site.jobs() or [] if job["key"].startswith("demo-")]
            phase = rows[0]["message"].split(":")[0][:60] if rows else ""
            if phase and (not phases or phases[-1][1] != phase):
                phases.append((time.monotonic() - started, phase))
            if rows and rows[0]["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"the demo policy build {rows[0]['status']}: {rows[0]['error']}")
            # Its build succeeded (where there is one: before this change there was none) and both registered.
            return (not rows or rows[0]["status"] == "succeeded") and registered(database) == {"demo-base", "demo-sft"}

        wait("demo policy build", demo_done, args.policy_timeout, process, interval=1.0)
        since_start["demo_policy"] = time.monotonic() - started
        loads["demo policy"] = load()

        def answered():
            jobs = [job for job in site.jobs() or [] if job["key"].startswith("generation-")]
            return jobs and all(job["status"] == "succeeded" for job in jobs)

        wait("the 30 demo prompts answered", answered, args.answers_timeout, process, interval=1.0)
        since_start["answers"] = time.monotonic() - started
        loads["answers"] = load()
    except (RuntimeError, TimeoutError) as caught:
        error = caught
    finally:
        stopped = stop(process)
        out.join(timeout=5)

    marker = out.first(r"^Installed in \d+ s\.$")
    install = marker[0] if marker else None
    lines = [line for _, line in out.lines]
    banner = next((i for i, line in enumerate(lines) if line.startswith("Tandem is at ")), None)
    server = next((i for i, line in enumerate(lines) if "Performing system checks" in line
                   or "Starting development server" in line), None)
    shown = banner is not None and server is not None and server > banner
    between = [line for line in lines[banner + 1 : server] if line.strip()] if shown else []
    logins_last = (shown and len(between) >= 4
                   and all(re.fullmatch(r"\s+\S+\s+\S+ / \S+", line) for line in between))

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print()
    print("| step | seconds after the start | seconds after the installation |")
    print("| --- | ---: | ---: |")
    print(f"| installation (venv, pip, byte-compiling) | {cell(install)} | |")
    for key, name in (("first_answer", "first HTTP 200 on / (target: 30 s after the installation)"),
                      ("demo_policy", "demo policy registered (its build succeeded on /jobs/)"),
                      ("answers", "its 30 demo prompts answered")):
        value = since_start.get(key)
        after = value - install if value is not None and install is not None else None
        print(f"| {name} | {cell(value)} | {cell(after)} |")
    print()
    if phases:
        print("demo policy build, seconds after the start: " + "; ".join(f"{t:.0f} {p}" for t, p in phases))
    print(f"address and logins the last lines before the server log: {'yes' if logins_last else 'no'}")
    print("load average: " + "; ".join(f"{k} {v}" for k, v in loads.items()) + f"; end {load()}")
    print(f"stopped in {stopped:.1f} s (exit code {process.returncode})")
    if args.keep:
        print(f"clone kept: {clone}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if error is not None:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
