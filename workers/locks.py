"""One worker per job folder: an exclusive flock on a file in the job's folder.

The operating system releases the lock when the holding process dies, however it dies, so a held
lock means a live worker is on the job and a free lock on a running job means its worker is gone.
Workers and the sweeper must see the same files: one host, or a shared file system that honours
flock across machines.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".worker.lock"


@contextmanager
def folder_lock(folder: Path) -> Iterator[bool]:
    """Yields True while this process holds the folder's lock, False when another live process does."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking at the folder
        yield True
    finally:
        os.close(fd)  # releases the lock


def folder_is_locked(folder: Path) -> bool:
    """Whether a live process holds the folder's lock now (a folder that does not exist is not locked)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)
