"""Safe writes of shared outputs: lock files, atomic directory publication, digests.

Every output that several runs may share (a directions store, a landscape store) is written
under a lock to a temporary sibling and renamed into place, so a reader sees either nothing,
the old complete output, or the new complete output, never a half-written one.

The conventions, shared with the pipeline (``pipelines/stages/evaluate.py`` locks a store the
same way):

- the lock of ``<dir>/<name>`` is the file ``<dir>/<name>.lock`` beside it (``fcntl.flock``:
  released by the operating system when its process dies, even by SIGKILL);
- temporary copies are ``<dir>/.<name>.tmp-<pid>-<random>``; they exist only while a writer
  holds the lock, so any found by the next holder are leftovers of a killed writer and are
  removed;
- digests are SHA-256, written as lowercase hex.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from landscapes.errors import LockTimeoutError, StoreError, StoreWriteError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "file_lock",
    "fsync_tree",
    "lock_path",
    "remove_leftovers",
    "sha256_file",
    "write_error",
]

_HASH_BLOCK = 1 << 20
_held = threading.local()  # paths of locks this thread holds: {path: "shared" | "exclusive"}


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``<target>.lock`` in the same directory."""
    t = Path(os.fspath(target)).absolute()
    return t.parent / f"{t.name}.lock"


@contextlib.contextmanager
def file_lock(
    target: str | os.PathLike,
    *,
    shared: bool = False,
    timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Hold the lock of ``target`` (the file ``<target>.lock`` beside it).

    Writers take it exclusively, readers shared. Re-entering a lock this thread already holds
    exclusively is a no-op (so a caller may hold it around library calls that take it too).

    Args:
        target: the shared output (a store directory); need not exist yet.
        shared: take a shared (reader) lock instead of an exclusive one.
        timeout: seconds to wait; None waits as long as it takes.
        on_wait: called once if the lock is busy, before waiting (e.g. to print a message).

    Yields:
        The lock file's path.

    Raises:
        LockTimeoutError: the lock stayed busy for ``timeout`` seconds.
        StoreError: a shared lock is held by this thread and an exclusive one is asked for.
    """
    path = lock_path(target)
    key = str(path)
    held = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    if key in held:
        if held[key] == "exclusive" or shared:
            yield path
            return
        raise StoreError(
            f"file_lock: this thread holds a shared lock on {target} and asked for an exclusive "
            "one; release the shared lock first (upgrading in place could deadlock)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        flag = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, flag | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            _wait_for(handle, flag, timeout, target)
        held[key] = "shared" if shared else "exclusive"
        try:
            yield path
        finally:
            del held[key]
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(handle, flag: int, timeout: float | None, target) -> None:
    if timeout is None:
        fcntl.flock(handle, flag)
        return
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fcntl.flock(handle, flag | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"another process has held the lock {lock_path(target)} of {target} for more "
                    f"than {timeout:g} s; wait for it to finish (or stop it) and re-run."
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _temp_sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Delete temporary siblings of ``dest`` left by killed writers; call holding its lock."""
    d = Path(os.fspath(dest)).absolute()
    removed = []
    if not d.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in d.parent.glob(f".{d.name}.{kind}-*"):
            _remove(p)
            removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def fsync_tree(root: str | os.PathLike) -> None:
    """``fsync`` every file under ``root``, then every directory bottom-up, then ``root``."""
    root = Path(os.fspath(root))
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # some file systems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; on success rename it to ``dest``.

    The caller writes everything into the yielded (empty) directory. When the ``with`` block
    ends normally, the tree is fsynced and renamed to ``dest`` (the parent is fsynced too);
    when it raises, the temporary directory is removed and ``dest`` is untouched. Hold
    :func:`file_lock` of ``dest`` around it when other processes may write ``dest`` too.

    Args:
        dest: the directory to publish.
        replace: replace an existing ``dest`` (renamed aside, then deleted); otherwise an
            existing non-empty ``dest`` raises.

    Raises:
        StoreError: ``dest`` exists (and is not an empty directory) and ``replace`` is false,
            or it is a file.
        StoreWriteError: the file system refused a write (disk full, ...).
    """
    d = Path(os.fspath(dest)).absolute()
    if d.exists() and not d.is_dir():
        raise StoreError(f"cannot write a directory at {d}: a file is there; choose another path.")
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(d, "tmp")
        tmp.mkdir()
    except OSError as err:
        raise write_error(
            err, d, "atomic_directory: cannot create a temporary directory", kept="nothing changed"
        ) from err
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, d, replace)
        _fsync_dir(d.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(
                exc, d, "atomic_directory: cannot write", kept=f"{d} is unchanged"
            ) from exc
        raise


def _publish(tmp: Path, d: Path, replace: bool) -> None:
    try:
        os.rename(tmp, d)  # replaces an empty directory; fails on a non-empty one
        return
    except OSError as err:
        if err.errno not in (_errno.ENOTEMPTY, _errno.EEXIST):
            raise
    if not replace:
        raise StoreError(
            f"cannot publish {d}: it already exists and is not empty; delete it, or pass "
            "replace=True."
        )
    old = _temp_sibling(d, "old")
    os.rename(d, old)
    os.rename(tmp, d)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``target`` (same suffix, so writers that read the format from
    it still work), renamed onto ``target`` when the block succeeds and removed otherwise."""
    target = Path(os.fspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to a temporary sibling, then rename it to ``path`` (never half-written).

    Raises:
        OSError: as the file system raises it (callers turn it into :class:`StoreWriteError`).
    """
    p = Path(os.fspath(path))
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def sha256_file(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex digest)`` of a file's contents."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_HASH_BLOCK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def write_error(
    err: OSError, store: str | os.PathLike, what: str, *, kept: str = "finished tiles are kept"
) -> StoreWriteError:
    """A :class:`StoreWriteError` for ``err``: names the store, the errno text and the fix.

    Args:
        err: the file system's error.
        store: the store (or output) being written.
        what: ``"<function>: <what failed>"``, e.g. ``"mark_done: cannot write the done mask"``.
        kept: what survives the failure, said last.
    """
    code = err.errno
    text = os.strerror(code) if code else (str(err) or type(err).__name__)
    name = _errno.errorcode.get(code, "") if code else ""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if code in (_errno.ENOSPC, _errno.EDQUOT):
        fix = "free space (or raise the quota) and re-run the same command to resume"
    elif code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        fix = "make the store writable and re-run the same command to resume"
    else:
        fix = "fix the cause and re-run the same command to resume"
    error = StoreWriteError(
        f"{what} of {os.fspath(store)}: [Errno {code}{' ' + name if name else ''}] {text}{where}; "
        f"{fix}; {kept}."
    )
    error.errno = code
    return error
