"""Crash-safe file writing: temporary name, flush, fsync, rename, fsync the directory.

A reader never sees a half-written file under a final name: either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from openllm.core import untrusted
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


NEARLY_FULL = 64 * 2**20  # free bytes below which a failed write is taken to be the full disk's doing


def write_failure(exc: BaseException, path: str | os.PathLike) -> str | None:
    """The one wording of a failed write of ``path``, whoever raised it. An OSError with an errno says why
    (ENOSPC: the disk is full). Writers that report a full disk in their own way (torch's RuntimeError,
    safetensors' SafetensorError, numpy's "N requested and M written" OSError) are recognised by the OS's
    words in their message or by the file system that holds ``path`` being (nearly) full when they fail.
    None: not a failure of writing (a bug)."""
    path = Path(path)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and not full:
        return _describe(exc, path)
    if isinstance(exc, OSError) and full:  # the OS said so: no need to look at the free space
        return f"disk full while writing {path}; the previous files are intact"
    free = _free_bytes(path)
    if full or (free is not None and free < NEARLY_FULL):
        shown = f" ({free / 2**20:.1f} MB free)" if free is not None else ""
        return f"disk full while writing {path}{shown}; the previous files are intact"
    if isinstance(exc, OSError):
        return f"could not write {path} ({exc}); the previous files are intact"
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def write_failures(path: str | os.PathLike) -> Iterator[None]:
    """Whatever the writes inside raise because writing failed becomes one error naming ``path``
    (:func:`write_failure`); other exceptions pass unchanged. Wrap the writing before any cleanup that
    frees space, so that a full disk is still seen as full."""
    try:
        yield
    except OpenLLMError:
        raise
    except Exception as exc:
        message = write_failure(exc, path)
        if message is None:
            raise
        raise OpenLLMError(message) from None


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
        message = write_failure(exc, path)  # before the unlink, which frees the space a full disk lacked
        tmp.unlink(missing_ok=True)
        raise OpenLLMError(message or _describe(exc, path)) from None
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
    """Parse a JSON file or raise one clear error naming it (the bounded reader of :mod:`openllm.core.untrusted`:
    depth, number size and valid text are checked, since any file may come from elsewhere)."""
    return untrusted.read_json(path, what)


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


_HELD: set[int] = set()  # descriptors of the locks (and lock guards) this process holds


def _close_inherited_locks() -> None:
    """In a forked child, close its copies of the parent's lock descriptors: an ``flock`` lasts until every
    descriptor of it is closed, so a child that kept one (an encoding worker of ``prepare``) would keep the
    parent's lock after the parent died, and refuse the rerun."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def directory_lock(target: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive OS lock on ``target`` (a file ``.NAME.lock`` beside it) while a command writes it.

    A second process gets one clear error naming the holder's pid. The lock is an ``flock``: a crash
    releases it, and forked children do not keep it. The lock file is removed on release; a process that
    locked a file someone removed meanwhile notices (the inode changed) and locks the new one instead. A
    lock whose holder, as its file names it, is no longer running is stale (only processes it left behind can
    still hold the flock) and is taken over (:func:`_take_over`).
    """
    target = Path(target)
    ensure_dir(target.parent, "parent directory")
    lock = target.parent / f".{target.name}.lock"
    fd = _acquire(lock, what, target)
    try:
        yield
    finally:
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, what: str, target: Path) -> int:
    while True:
        with _guard(lock.parent, fcntl.LOCK_SH):  # a lock is taken and its pid written before any take-over looks
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, inode = _holder(fd), os.fstat(fd).st_ino
                os.close(fd)
            else:
                if _is_the_file(fd, lock):
                    return _own(fd)
                os.close(fd)
                continue
        busy = (
            f"{what} {target} is in use by another openllm process (pid {holder or 'unknown'}); wait for it to "
            "finish or stop it first"
        )
        if holder is None or _running(holder):
            raise OpenLLMError(busy)
        taken = _take_over(lock, inode)
        if taken is None:
            continue  # the lock file changed meanwhile: look again
        if taken < 0:
            raise OpenLLMError(f"{busy} (pid {holder} is no longer running; stop what it left behind)")
        return taken


def _is_the_file(fd: int, lock: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        return False


def _own(fd: int) -> int:
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD.add(fd)
    return fd


def _holder(fd: int) -> int | None:
    """The pid a lock file names (None when it names none)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, but not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _guard(directory: Path, mode: int) -> Iterator[bool]:
    """An ``flock`` on the directory that holds the lock files, held while a lock is taken (shared) or taken
    over (exclusive); yields whether it is held (some file systems cannot lock a directory)."""
    fd = None
    try:
        fd = os.open(directory, os.O_RDONLY)
        fcntl.flock(fd, mode)
    except OSError:
        if fd is not None:
            os.close(fd)
        yield False
        return
    _HELD.add(fd)
    try:
        yield True
    finally:
        _HELD.discard(fd)
        os.close(fd)


def _take_over(lock: Path, inode: int) -> int | None:
    """Replace the stale lock file ``lock`` (still the file ``inode``) with a new one held by this process:
    created under a temporary name, locked, given this pid and renamed over the old one. Under the directory's
    exclusive guard, so that no two processes take over together and no lock being taken looks stale.
    Returns the new lock's descriptor, None if the lock file changed meanwhile, -1 if it cannot be done."""
    with _guard(lock.parent, fcntl.LOCK_EX) as guarded:
        if not guarded:
            return -1
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_ino != inode:
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if holder is None or _running(holder):
                return None  # taken meanwhile by a live process: look again (and be refused)
        else:
            if _is_the_file(fd, lock):
                return _own(fd)  # what held it is gone now
            os.close(fd)  # released meanwhile (its holder removes the file)
            return None
        fresh = lock.with_name(f"{lock.name}.tmp-{os.getpid()}")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _own(fd)
        os.replace(fresh, lock)
        return fd


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


# --------------------------------------------------------------------------- output directories

# What `openllm train` writes into a run directory (openllm.checkpoint.rundir names them). Known at this layer
# so that every command writing an --output-dir, whatever its layer, can refuse to write over a training run.
RUN_FILES = (
    "best_model.pt",
    "final_model.pt",
    "checkpoint_step_*.pt",
    "checkpoint_step_*",
    "training_config.json",
    "training_log.json",
    "metrics.jsonl",
    "train.log",
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _listing(names: Iterable[str], most: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _entries(directory: Path) -> list[str]:
    return [p.name + "/" if p.is_dir() else p.name for p in directory.iterdir()]


def training_run_files(directory: str | os.PathLike) -> list[str]:
    """The entries of ``directory`` that show it holds a training run (none when it does not exist)."""
    directory = Path(directory)
    return [n for n in _entries(directory) if _matches(n, RUN_FILES)] if directory.is_dir() else []


@dataclass(frozen=True)
class OutputDir:
    """An ``--output-dir`` that a command (``export``, ``convert``) builds whole and puts in place.

    Replacing a directory deletes what was in it, so the rules are checked before anything is touched
    (:meth:`check`) and again under the directory's lock (:meth:`replacing`):

    - it may not be, contain or lie inside anything the command reads (``reads``);
    - an existing non-empty directory must be an earlier output of the same command (every entry is one the
      command writes, ``owns``, glob patterns; and its ``mark`` file, where it names one, is there), and is
      replaced only with ``force``. Anything else, above all a training run, is refused by name with or
      without ``force``: ``--force`` never deletes what the command did not write.
    """

    path: Path
    command: str  # named in the errors: "export", "convert"
    owns: tuple[str, ...]
    reads: tuple[Path, ...] = ()
    force: bool = False
    mark: str | None = None  # a file every output of the command holds (convert: provenance.json)

    def check(self) -> None:
        out, flag = self.path.resolve(), f"--output-dir {self.path}"
        reads = list(dict.fromkeys(Path(p).resolve() for p in self.reads))
        if out in reads:
            raise OpenLLMError(f"{flag} is the input {out}; write the {self.command} output elsewhere")
        for src in reads:
            if out in src.parents:
                raise OpenLLMError(f"{flag} contains the input {src}; choose a directory outside it")
            if src in out.parents:
                raise OpenLLMError(f"{flag} lies inside the input {src}; choose a directory outside it")
        if not out.exists():
            return
        if not out.is_dir():
            raise OpenLLMError(f"{flag} exists and is not a directory")
        entries = _entries(out)
        if not entries:
            return
        foreign = [n for n in entries if not _matches(n, self.owns)]
        earlier = self.mark is None or self.mark in entries
        mine = f"the output of an earlier openllm {self.command}"
        run = [n for n in training_run_files(out) if n in foreign or not earlier]
        if run:
            raise OpenLLMError(
                f"{flag} holds a training run ({_listing(run)}); {self.command} replaces only {mine}, never a "
                "run: choose another --output-dir"
            )
        if foreign:
            raise OpenLLMError(
                f"{flag} holds files openllm {self.command} does not write ({_listing(foreign)}); it replaces only "
                f"{mine}: move them or choose another --output-dir"
            )
        if not earlier:
            raise OpenLLMError(f"{flag} is not {mine} (it has no {self.mark}); choose another --output-dir")
        if not self.force:
            raise OpenLLMError(f"{flag} already holds {mine}; choose another or pass --force to replace it")

    @contextlib.contextmanager
    def replacing(self, what: str = "output directory") -> Iterator[Path]:
        """Lock the directory, check it again, and yield a fresh staging directory to write the output in; when
        the block succeeds, the staging directory replaces the output (:func:`commit_directory`)."""
        with directory_lock(self.path, what):
            self.check()
            staging = staging_dir(self.path)
            try:
                with write_failures(self.path):  # a full disk in any writer, said one way
                    yield staging
                    commit_directory(staging, self.path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise


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


def ordinary_file_mode(path: Path) -> None:
    """Give a file another library created the mode ``open()`` gives new files (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
