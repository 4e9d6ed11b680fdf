"""Writing run files so that a failed write never leaves a partial or missing file.

Every writer goes through :func:`atomic_target`: the data goes to a temporary file beside the
target (same filesystem), is flushed to disk, then renamed over the target with ``os.replace``
(atomic on POSIX), so a reader sees the old version or the new one, never half of one. When the
write fails (a full disk, a read-only or vanished folder, an interrupt), the temporary file is
removed, the previous version stays untouched and :class:`FileWriteError` is raised: an
``OSError`` whose one-line message names the path, the cause and the space left there.

:func:`state_digest` fingerprints a saved dict of tensors, so a loader can tell a damaged file
from a good one (torch.load does not notice every flipped bit).

Appending a line (``metrics.jsonl``) cannot use a rename; :func:`append_line` truncates the file
back to its previous length when the write fails, so a partial line is never left behind.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

TEMP_MARK = ".tmp-"  # every temporary name holds it: ``.NAME.tmp-<pid>-<random>``


class FileWriteError(OSError):
    """A run file could not be written; ``str()`` is a one-line message naming the path, the cause
    and the free space; ``errno`` is the underlying OS error number when there is one."""

    def __init__(self, path, cause: BaseException):
        self.path = Path(path)
        self.cause = cause
        os_error = underlying_os_error(cause)
        super().__init__(getattr(os_error, "errno", None), describe_write_failure(self.path, cause))

    def __str__(self) -> str:
        return self.strerror

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def underlying_os_error(err: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``err``: torch.save reports a failed write of a file object as a
    ``RuntimeError`` raised while handling the OSError, so the chain is searched."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and not isinstance(err, FileWriteError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def free_bytes(path) -> int | None:
    """Free space on the filesystem that holds ``path`` (its nearest existing ancestor)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def format_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_write_failure(path: Path, err: BaseException) -> str:
    os_error = underlying_os_error(err)
    if os_error is not None and os_error.strerror:
        cause = os_error.strerror
    else:
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    free = free_bytes(path)
    where = f" ({format_bytes(free)} free there)" if free is not None else ""
    return f"could not write {path}: {cause}{where}"


def is_write_failure(err: BaseException) -> bool:
    """OS errors, and torch's RuntimeErrors of a failed write (its zip writer wraps them)."""
    if isinstance(err, OSError):
        return True
    # torch's zip writer on a path reports "[enforce fail at inline_container.cc:...] ... file
    # write failed" with no errno
    return isinstance(err, RuntimeError) and (underlying_os_error(err) is not None
                                              or "inline_container" in str(err))


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on a directory.
    try:
        _fsync_path(path)
    except OSError:
        pass


@contextmanager
def atomic_target(path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed
    and write failures are raised as :class:`FileWriteError`. ``durable``: fsync the file (and its
    folder) so a power cut cannot leave an empty file under the final name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileWriteError(path, err) from err
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable and tmp.is_file():
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _remove_quietly(tmp)
        if isinstance(err, FileWriteError) or not is_write_failure(err):
            raise
        raise FileWriteError(path, err) from err
    if durable:
        _fsync_directory(path.parent)


def atomic_write(path, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """``write(tmp)`` fills a temporary file (or folder), which then replaces ``path``."""
    with atomic_target(path, durable=durable) as tmp:
        write(tmp)
    return Path(path)


def atomic_torch_save(payload, path, *, verify: Callable[[Path], None] | None = None) -> Path:
    """``torch.save(payload, path)``, atomically. ``verify(tmp)`` may read the written file back
    and raise; the target is replaced only when it returns."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: a failed write keeps its errno (see above)
            torch.save(payload, handle)
        if verify is not None:
            verify(tmp)
    return atomic_write(path, write)


def atomic_write_text(text: str, path) -> Path:
    """``path.write_text(text)``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(data: bytes, path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def append_line(path, line: str) -> None:
    """Append ``line`` (a newline is added) to ``path``; on failure the file is cut back to its
    previous length and :class:`FileWriteError` is raised."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise FileWriteError(path, err) from err
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise FileWriteError(path, err) from err
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except PermissionError:          # exists, owned by someone else
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_abandoned_temporaries(folder, name: str | None = None) -> list:
    """Delete the temporaries in ``folder`` (of the target ``name`` only, when given) whose writing
    process is gone: a killed write leaves a partial file, a killed cache build a whole folder.
    Those of a live process are kept, since another process may be writing the same target."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefix = f".{name}{TEMP_MARK}" if name is not None else "."
    removed = []
    for p in folder.iterdir():
        if not p.name.startswith(prefix) or TEMP_MARK not in p.name:
            continue
        try:
            pid = int(p.name.rpartition(TEMP_MARK)[2].split("-")[0])
        except ValueError:
            continue
        if not process_alive(pid):
            _remove_quietly(p)
            removed.append(p)
    return removed


def move_aside(target) -> None:
    """Remove the directory ``target`` by renaming it to a temporary name first, then deleting
    it: ``os.replace`` installs a new directory only over a missing or empty one, and the rename
    makes the old one disappear at once, not file by file under the name readers use."""
    aside = temporary_path(Path(target))
    try:
        os.replace(target, aside)
    except FileNotFoundError:        # another process moved it first
        return
    _remove_quietly(aside)


# ---------------------------------------------------------------- integrity of saved states
def _digest_update(h, value) -> None:
    """Feed ``value`` (nested dicts / lists / tuples of tensors and plain values) into ``h`` in
    order; types are hashed too, so ``1`` and ``1.0`` or a list and a tuple differ."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest_update(h, key)
            _digest_update(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _digest_update(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def file_sha256(path) -> str:
    """The sha256 (hex) of the file at ``path``, read in blocks: cache arrays can be gigabytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def state_digest(state: dict) -> str:
    """BLAKE2b of every entry of ``state`` but ``digest`` itself."""
    h = hashlib.blake2b(digest_size=32)
    _digest_update(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()
