"""Crash-safe file writing: temporary name, flush, fsync, rename, fsync the directory.

A reader never sees a half-written file under a final name: either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from openllm.core.errors import OpenLLMError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}; the previous files are intact"
    if exc.errno == errno.ENOENT and not path.parent.is_dir():
        return f"cannot write {path}: the directory {path.parent} no longer exists"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror}"
    return f"cannot write {path}: {exc.strerror or exc}"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        f = open(tmp, "wb")
    except OSError as exc:
        raise OpenLLMError(_describe(exc, path)) from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OpenLLMError(_describe(exc, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file or raise one clear error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpenLLMError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenLLMError(f"{what} {path} is not valid JSON: {exc}") from None


def ensure_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OpenLLMError(f"{what} {path} exists and is not a directory") from None
    except OSError as exc:
        raise OpenLLMError(f"cannot create {what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise OpenLLMError(f"{what} {path} is not writable")
    return path


# --------------------------------------------------------------------------- whole directories


@contextlib.contextmanager
def directory_lock(target: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive OS lock on ``target`` (a file ``.NAME.lock`` beside it) while a command writes it.

    A second process gets one clear error naming the holder's pid. The lock is an ``flock``: a crash
    releases it. The lock file is removed on release; a process that locked a file someone removed
    meanwhile notices (the inode changed) and locks the new one instead.
    """
    target = Path(target)
    ensure_dir(target.parent, "parent directory")
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OpenLLMError(
                f"{what} {target} is in use by another openllm process (pid {holder}); wait for it to finish or "
                "stop it first"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def staging_dir(target: str | os.PathLike) -> Path:
    """A fresh, empty temporary directory beside ``target`` to build it in (see :func:`commit_directory`).

    Leftovers of earlier attempts on the same target that were killed (``.NAME.tmp-*``, ``.NAME.old-*``) are
    removed first; call it while holding :func:`directory_lock` on ``target``.
    """
    target = Path(target)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    ensure_dir(staging)
    return staging


def commit_directory(staging: Path, target: str | os.PathLike) -> None:
    """Put a fully written ``staging`` directory in place of ``target``, atomically where the OS allows.

    A new target is one rename. An existing one is swapped with ``renameat2(RENAME_EXCHANGE)`` on Linux,
    so a reader sees the old directory or the new one, never neither; elsewhere the old one is first
    renamed aside. The old contents are deleted only after the new ones are in place.
    """
    target = Path(target)
    fsync_dir(staging)
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old contents
    else:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed writers left in ``directory`` (call it while holding its lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale
