"""Writing files safely: atomically (temp file + rename), with the permissions the user's umask gives
ordinary files (``tempfile.mkstemp`` would leave 0600), and only inside a chosen directory.

Every writer of run directories, result stores and the model cache goes through these helpers, so a
symlink planted inside a run directory can neither redirect a write nor a delete outside it."""
from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutsideRootError

__all__ = ["OutsideRootError", "atomic_path", "confined", "confined_dir", "dir_mode", "file_mode", "inside", "umask", "write_bytes", "write_text"]


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once (the only portable way to read it)
        current = os.umask(0o022)
        os.umask(current)
    return current


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0644 under the usual umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def confined(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved through every symlink, if it lies inside ``root`` (resolved too); otherwise
    :class:`OutsideRootError`. Relative paths are relative to the working directory, as everywhere."""
    base = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise OutsideRootError(f"refused: {path} resolves to {resolved}, outside {base}")
    return resolved


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (through symlinks) inside ``root``: :func:`confined` as a test."""
    try:
        confined(root, path)
    except OutsideRootError:
        return False
    return True


def confined_dir(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """:func:`confined`, then created (with its parents) when missing."""
    resolved = confined(root, path)
    resolved.mkdir(parents=True, exist_ok=True)
    return confined(root, resolved)  # a component swapped for a symlink meanwhile is caught here


@contextmanager
def atomic_path(target: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary path next to ``target`` to write to; on success it gets the umask's file mode and
    replaces ``target`` in one rename (a symlink at ``target`` is replaced, never written through).
    With ``root``, the target's directory must resolve inside it."""
    target = Path(target)
    parent = confined(root, target.parent) if root is not None else target.parent
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, parent / target.name)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(target: str | os.PathLike, text: str, *, root: str | os.PathLike | None = None) -> Path:
    """Atomically write ``text`` (UTF-8) to ``target`` (see :func:`atomic_path`)."""
    with atomic_path(target, root=root) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes, *, root: str | os.PathLike | None = None) -> Path:
    with atomic_path(target, root=root) as tmp:
        tmp.write_bytes(data)
    return Path(target)
