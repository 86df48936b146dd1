"""Snapshots: frozen batches materialized as one jsonl.gz file, byte-for-byte reproducible.

Rows are the export rows (annotation.exports) of every judgment in the batches, with fixed
options: conversational, margin "none" (0) with the strength kept, so a consumer picks its own
margin scale; and *every* judgment, the unsafe-chosen ones included (safety_bin says which), so
the snapshot is the whole frozen data and the paper's exclusion is the consumer's filter.

Determinism: rows sorted by judgment id, canonical JSON (sorted keys, no spaces, UTF-8), gzip
with mtime 0 and no file name. The snapshot's sha256 is that of the *uncompressed* JSONL content
(independent of the zlib version); the manifest also records the .gz file's own sha256.
Files are written atomically (temp file, fsync, rename, fsync of the folder).
"""
import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import exports
from .models import Batch, Judgment, Snapshot

SNAPSHOT_OPTIONS = exports.ExportOptions(conversational=True, margin="none", include_unsafe_chosen=True)
GZIP_LEVEL = 6


def snapshot_lines(*, batches: Sequence[Batch]) -> Iterator[bytes]:
    judgments = Judgment.objects.filter(comparison__batch__in=[b.pk for b in batches])
    for row in exports.export_rows(judgments, options=SNAPSHOT_OPTIONS):
        yield orjson.dumps(row, option=orjson.OPT_SORT_KEYS) + b"\n"


def snapshot_content_sha256(*, batches: Sequence[Batch]) -> str:
    """The hash a snapshot of these batches has, recomputed from the database without writing."""
    digest = hashlib.sha256()
    for line in snapshot_lines(batches=batches):
        digest.update(line)
    return digest.hexdigest()


def _frozen_batches(batches: Sequence[Batch]) -> list[Batch]:
    if not batches:
        raise ValidationError({"batches": "Name at least one frozen batch."})
    fresh = list(Batch.objects.filter(pk__in=[b.pk for b in batches]).order_by("label"))
    if open_ := [b.label for b in fresh if not b.is_frozen]:
        raise ValidationError({"batches": f"Only frozen batches can be snapshotted; open: {', '.join(open_)}."})
    return fresh


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def snapshot_create(*, batches: Sequence[Batch]) -> Snapshot:
    """Materialize frozen batches; the same batches give the same file and hash, and asking again
    returns the existing snapshot."""
    batches = _frozen_batches(batches)
    folder = Path(settings.TANDEM_SNAPSHOT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    content = hashlib.sha256()
    rows = 0
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".snapshot-", suffix=".jsonl.gz.tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                for line in snapshot_lines(batches=batches):
                    content.update(line)
                    gz.write(line)
                    rows += 1
            raw.flush()
            os.fsync(raw.fileno())
        sha256 = content.hexdigest()
        path = folder / f"{sha256}.jsonl.gz"
        existing = Snapshot.objects.filter(sha256=sha256).first()
        if existing is not None and Path(existing.path).is_file():
            tmp.unlink()
            return existing
        file_sha256 = _file_sha256(tmp)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest = {
        "sha256": sha256, "file": path.name, "file_sha256": file_sha256, "row_count": rows,
        "schema_version": exports.SCHEMA_VERSION, "created_at": timezone.now().isoformat(),
        "export_options": {"format": "conversational", "margin": SNAPSHOT_OPTIONS.margin,
                           "include_unsafe_chosen": SNAPSHOT_OPTIONS.include_unsafe_chosen},
        "batches": [{"label": b.label, "kind": b.kind, "content_hash": b.content_hash,
                     "frozen_at": b.frozen_at.isoformat(), "test_size": b.test_size} for b in batches],
    }
    _write_atomically(folder / f"{sha256}.manifest.json",
                      lambda f: f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)))
    try:
        with transaction.atomic():
            if existing is not None:  # its file had gone missing: this run wrote it again
                existing.path = str(path)
                existing.save(update_fields=["path"])
                return existing
            snapshot = Snapshot.objects.create(sha256=sha256, path=str(path), row_count=rows,
                                               schema_version=exports.SCHEMA_VERSION, manifest=manifest)
            snapshot.batches.set(batches)
            return snapshot
    except IntegrityError:  # the same snapshot, made concurrently
        return Snapshot.objects.get(sha256=sha256)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_file(snapshot: Snapshot) -> Path:
    """The snapshot's file, refused if its recorded path left the snapshot folder or is gone."""
    path = Path(snapshot.path).resolve()
    if not path.is_relative_to(Path(settings.TANDEM_SNAPSHOT_DIR).resolve()) or not path.is_file():
        raise FileNotFoundError(f"snapshot file {snapshot.path} is missing")
    return path
