"""Fixtures shared by the whole suite: users in their roles, a small comparison world, and a real
Celery worker process for the tests that go through the broker."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file of ../shared/data, or a clean skip when this machine does not have it."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def required(kind: str) -> bool:
    """CI sets TANDEM_REQUIRE_<KIND>=1 so that a missing browser or broker fails instead of skips."""
    return os.environ.get(f"TANDEM_REQUIRE_{kind.upper()}") == "1"


@pytest.fixture
def private_cache(settings):
    """A private in-memory cache: throttle and auth-failure counters never leak between tests, and
    clearing it never flushes a shared Redis that CACHE_URL may name."""
    from django.core.cache import cache

    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": "tests"}}
    cache.clear()
    yield cache
    cache.clear()


def assert_imports_no_torch(statements: str) -> None:
    """Run `statements` after django.setup() in a fresh interpreter and fail if torch got imported:
    the web process imports these modules, and torch must stay in the workers."""
    code = (f"import django, sys; django.setup(); {statements}; "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings"})
    assert result.returncode == 0, result.stderr[-2000:] or result.stdout


@pytest.fixture
def make_user(db):
    def make(username: str, *, role: str = "annotator", password: str = "pw-for-tests-1") -> User:
        user = User.objects.create_user(username=username, password=password, is_staff=role == "admin",
                                        is_superuser=role == "admin")
        if role in ("annotator", "researcher"):
            user.groups.add(Group.objects.get_or_create(name=role)[0])
        return user

    return make


@pytest.fixture
def annotator(make_user):
    return make_user("ann")


@pytest.fixture
def other_annotator(make_user):
    return make_user("ann2")


@pytest.fixture
def admin_user(make_user):
    return make_user("boss", role="admin")


@pytest.fixture
def checkpoints(db):
    from policy.models import Checkpoint

    return (
        Checkpoint.objects.create(name="model-a", format=Checkpoint.Format.EXTERNAL),
        Checkpoint.objects.create(name="model-b", format=Checkpoint.Format.EXTERNAL),
    )


@pytest.fixture
def make_comparison(db, checkpoints):
    from annotation import services
    from annotation.models import Comparison, Prompt, Response

    counter = iter(range(10**6))

    def make(*, text: str | None = None, a: str = "Answer A", b: str = "Answer B", overlap: int = 1,
             adversarial: bool = False) -> Comparison:
        n = next(counter)
        prompt = services.prompt_create(text=text or f"Question {n}?", source=Prompt.Source.DEMO,
                                        is_adversarial=adversarial)
        ra = Response.objects.create(prompt=prompt, checkpoint=checkpoints[0], temperature=0.7, text=a)
        rb = Response.objects.create(prompt=prompt, checkpoint=checkpoints[1], temperature=1.0, text=b)
        return services.comparison_create(prompt=prompt, response_a=ra, response_b=rb,
                                          origin=Comparison.Origin.DEMO, overlap=overlap)

    return make


def _worker_database_url() -> str:
    """The URL of the test database pytest-django created, for a worker in another process."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    url = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(url._replace(path="/" + db["NAME"]))


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `celery worker` process on the configured broker and the test database.

    Tests that use it must commit their data (`transactional_db`) so the worker can read it.
    """
    broker = settings.CELERY_BROKER_URL
    if broker.startswith("redis"):
        import redis

        try:
            redis.Redis.from_url(broker, socket_connect_timeout=2).ping()
        except redis.exceptions.ConnectionError:
            if required("worker"):
                raise
            pytest.skip(f"Redis broker {broker} is not reachable")
    env = {**os.environ, "DATABASE_URL": _worker_database_url(), "PYTHONUNBUFFERED": "1"}
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", "default,gpu", "--pool=solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info", "-n", f"test-{os.getpid()}@%h"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while "ready." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"celery worker did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    yield process
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    from django.db import connections

    connections.close_all()


def wait_for(predicate, *, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll until predicate() is truthy (work done by another process), or fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(autouse=True)
def _sqlite_flush_past_frozen_guards(request):
    """Let SQLite's post-test flush delete frozen rows in transactional tests.

    PostgreSQL flushes with TRUNCATE, which row triggers do not see; SQLite flushes with DELETE,
    which the frozen-batch guards refuse. So there the guards are lifted just for the flush and
    put back before the next test.
    """
    from django.db import connection

    marker = request.node.get_closest_marker("django_db")
    transactional = (marker and marker.kwargs.get("transaction")) or "transactional_db" in request.fixturenames \
        or "live_server" in request.fixturenames
    if not transactional or connection.vendor != "sqlite":
        yield
        return
    request.getfixturevalue("_django_db_helper")
    from importlib import import_module

    guards = import_module("annotation.migrations.0003_frozen_batch_guards")

    with connection.schema_editor() as editor:
        guards.install(None, editor)
    yield
    with connection.schema_editor() as editor:
        guards.uninstall(None, editor)
