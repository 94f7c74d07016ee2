"""One live process per run directory: an exclusive, non-blocking lock on ``<run>/.lock``.

* POSIX: ``fcntl.flock``; Windows: ``msvcrt.locking`` on the file's first byte. The operating
  system releases either when the process ends, even by SIGKILL or a crash, so a killed run never
  leaves its directory locked.
* Where neither works (no such module, or a file system without locks, e.g. some network file
  systems): ``<run>/.lock.excl`` created with ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+
  file systems) holding the owner, removed on release. A process killed by SIGKILL leaves it
  behind: the next launch on the same host takes it over when that process is gone; from another
  host it names the owner and the file to remove.

The lock file holds the owner (``pid N on HOST``) after its first byte, which is the one
``msvcrt`` locks, so a refused launch can name the process in the way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ddpm.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
EXCLUSIVE_FILE = ".lock.excl"
_HELD = (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK))


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _read_owner(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(1)
            return f.read(200).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _refuse(run_dir: Path, owner: str, extra: str = "") -> ConfigError:
    return ConfigError(
        f"{run_dir} is in use by another training process ({owner}); a run never writes into "
        f"another run's directory. Wait for it to end or stop it first.{extra}"
    )


def os_lock(fd: int) -> bool | None:
    """Lock the file ``fd`` exclusively without waiting: True when locked, False when another
    process holds it, None when this system or file system has no such lock."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            return None
    except OSError as e:
        return False if e.errno in _HELD else None
    return True


def _gone(owner: str) -> bool:
    """Whether ``owner`` (``pid N on HOST``) is a process of this host that no longer runs."""
    words = owner.split()
    if os.name != "posix" or len(words) != 4 or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


@contextlib.contextmanager
def _exclusive_file(run_dir: Path) -> Iterator[None]:
    """The lock of last resort: a file that only one process can create."""
    path = run_dir / EXCLUSIVE_FILE
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if attempt == 1 and _gone(owner):
                log.warning("%s was left by %s, which is gone: taking it over", path, owner)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise _refuse(run_dir, owner, f" (If it is gone, remove {path}.)") from None
        break
    try:
        os.write(fd, f"\n{_owner()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (module docstring) for the body; :class:`ConfigError`
    naming the owner when another live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = os_lock(fd)
        if locked is False:
            raise _refuse(run_dir, _read_owner(path))
        if locked is None:
            with _exclusive_file(run_dir):
                yield
            return
        os.ftruncate(fd, 1)
        os.lseek(fd, 1, os.SEEK_SET)
        os.write(fd, f"{_owner()}\n".encode())
        try:
            yield
        finally:
            if fcntl is None and msvcrt is not None:  # Windows: unlock before closing
                os.lseek(fd, 0, os.SEEK_SET)
                with contextlib.suppress(OSError):
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)  # releases the lock (POSIX)
