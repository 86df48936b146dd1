"""Snapshots: frozen batches only, deterministic bytes, a hash anyone can recompute, atomic files,
listing and streamed download over the API, and the management command."""
import gzip
import hashlib
import json
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from rest_framework.test import APIClient

from annotation import services, snapshots
from annotation.models import Batch, Judgment, Snapshot
from annotation.services import SafetyLabels
from webapp.auth import api_token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _snapshot_dir(settings, tmp_path, private_cache):
    settings.TANDEM_SNAPSHOT_DIR = tmp_path / "snapshots"


@pytest.fixture
def frozen(make_comparison, annotator):
    """A frozen batch of three judgments, one of them chosen-unsafe."""
    for chosen, a_safe, b_safe in (("A", True, True), ("B", False, True), ("A", False, True)):
        make_comparison()
        services.judgment_submit(assignment=services.assignment_lease_next(annotator=annotator), annotator=annotator,
                                 chosen=chosen, strength=2, safety=SafetyLabels(a_safe=a_safe, b_safe=b_safe))
    return services.batch_freeze(batch=Batch.objects.get(), test_size=1)


def client_for(user) -> APIClient:
    _, token = api_token_issue(user=user, name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


class TestCreate:
    def test_refuses_open_batches(self, make_comparison, annotator):
        make_comparison()
        services.judgment_submit(assignment=services.assignment_lease_next(annotator=annotator), annotator=annotator,
                                 chosen="A", strength=1, safety=SafetyLabels(a_safe=True, b_safe=True))
        with pytest.raises(ValidationError, match="Only frozen batches"):
            snapshots.snapshot_create(batches=[Batch.objects.get()])
        with pytest.raises(ValidationError, match="at least one"):
            snapshots.snapshot_create(batches=[])
        assert not Snapshot.objects.exists()

    def test_file_content_hash_and_manifest(self, frozen, settings):
        snapshot = snapshots.snapshot_create(batches=[frozen])
        path = settings.TANDEM_SNAPSHOT_DIR / f"{snapshot.sha256}.jsonl.gz"
        raw = path.read_bytes()
        assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, mtime 0
        content = gzip.decompress(raw)
        assert hashlib.sha256(content).hexdigest() == snapshot.sha256  # independent recomputation
        lines = content.decode().splitlines()
        rows = [json.loads(line) for line in lines]
        # canonical JSON: sorted keys, no spaces, UTF-8; rows in judgment order; every judgment kept
        assert lines == [json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for r in rows]
        assert [r["id"] for r in rows] == sorted(Judgment.objects.values_list("id", flat=True))
        assert {r["safety_bin"] for r in rows} == {"both_safe", "chosen_safe_other_unsafe", "chosen_unsafe_other_safe"}
        assert {r["margin"] for r in rows} == {0.0} and {r["strength"] for r in rows} == {2}
        assert sorted(r["split"] for r in rows) == ["test", "train", "train"]
        manifest = json.loads((settings.TANDEM_SNAPSHOT_DIR / f"{snapshot.sha256}.manifest.json").read_text())
        assert manifest == snapshot.manifest
        assert manifest["row_count"] == snapshot.row_count == 3 and manifest["schema_version"] == 1
        assert manifest["batches"] == [{"label": frozen.label, "kind": "weekly", "content_hash": frozen.content_hash,
                                        "frozen_at": frozen.frozen_at.isoformat(), "test_size": 1}]
        assert manifest["file_sha256"] == hashlib.sha256(raw).hexdigest() and manifest["created_at"]
        assert list(snapshot.batches.all()) == [frozen]
        assert not [p for p in settings.TANDEM_SNAPSHOT_DIR.iterdir() if p.name.startswith(".")]  # no temp left

    def test_recomputing_gives_the_same_hash_and_bytes(self, frozen, settings):
        snapshot = snapshots.snapshot_create(batches=[frozen])
        first_bytes = (settings.TANDEM_SNAPSHOT_DIR / f"{snapshot.sha256}.jsonl.gz").read_bytes()
        assert snapshots.snapshot_content_sha256(batches=[frozen]) == snapshot.sha256
        assert snapshots.snapshot_create(batches=[frozen]) == snapshot  # asking again: the same snapshot
        # from scratch: the row and the file gone, made again -> identical bytes
        sha = snapshot.sha256
        snapshot.delete()
        for p in settings.TANDEM_SNAPSHOT_DIR.iterdir():
            p.unlink()
        again = snapshots.snapshot_create(batches=[frozen])
        assert again.sha256 == sha
        assert (settings.TANDEM_SNAPSHOT_DIR / f"{sha}.jsonl.gz").read_bytes() == first_bytes

    def test_command(self, frozen):
        out = StringIO()
        call_command("snapshot_create", frozen.label, stdout=out)
        assert out.getvalue().startswith(Snapshot.objects.get().sha256)
        call_command("snapshot_create", "--all-frozen", stdout=StringIO())
        assert Snapshot.objects.count() == 1


class TestApi:
    def test_list_download_and_create(self, frozen, make_user, admin_user):
        researcher = client_for(make_user("res", role="researcher"))
        admin = client_for(admin_user)
        assert researcher.post("/api/v1/snapshots", {"batches": [frozen.label]}, format="json").status_code == 403
        made = admin.post("/api/v1/snapshots", {"batches": [frozen.label]}, format="json")
        assert made.status_code == 201, made.content
        sha = made.json()["sha256"]
        listed = researcher.get("/api/v1/snapshots").json()["results"]
        assert [(s["sha256"], s["batches"], s["row_count"]) for s in listed] == [(sha, [frozen.label], 3)]
        download = researcher.get(listed[0]["download"])
        assert download.status_code == 200 and download["Content-Type"] == "application/gzip"
        body = b"".join(download.streaming_content)
        assert hashlib.sha256(gzip.decompress(body)).hexdigest() == sha
        assert researcher.get(f"/api/v1/snapshots/{sha}").json()["manifest"]["sha256"] == sha
        assert researcher.get(f"/api/v1/export/snapshots/{'0' * 64}").status_code == 404
        assert researcher.get(f"/api/v1/export/snapshots/{sha}?x=1").status_code == 400
        assert admin.post("/api/v1/snapshots", {"batches": ["nope"]}, format="json").status_code == 400

    def test_annotators_cannot_download(self, frozen, annotator):
        sha = snapshots.snapshot_create(batches=[frozen]).sha256
        assert client_for(annotator).get(f"/api/v1/export/snapshots/{sha}").status_code == 403
