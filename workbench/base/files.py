"""Writing files safely: atomically (temp file + rename), with the permissions the user's umask gives
ordinary files (``tempfile.mkstemp`` would leave 0600), and only inside a chosen directory.

Every writer of run directories, result stores and the model cache goes through these helpers, so a
symlink planted inside a run directory can neither redirect a write nor a delete outside it."""
from __future__ import annotations

import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutsideRootError

__all__ = ["OutsideRootError", "atomic_path", "confined", "untrusted_part", "confined_dir", "dir_mode", "file_mode", "inside", "umask", "write_bytes", "write_text"]


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


def confined_file(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """:func:`confined`, and a regular file: what every reader under a root opens. A folder named like a file
    (``evil.parquet/``) is refused: Parquet and DuckDB readers take a folder as a dataset of every file in it,
    links to files outside the root included."""
    resolved = confined(root, path)
    if not resolved.is_file():
        kind = "a folder" if resolved.is_dir() else "missing" if not resolved.exists() else "not a regular file"
        raise OutsideRootError(f"refused: {path} is {kind}, not a file")
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


def _visited(path: str) -> list[str]:
    """Every file system entry the OS walks through to open ``path``: each component of the absolute path, and
    where a component is a symlink, every entry of its target's walk too (links to links included)."""
    seen: list[str] = []
    todo = Path(os.path.abspath(path)).parts
    current = todo[0]
    pending = list(todo[1:])
    hops = 0
    while pending:
        part = pending.pop(0)
        entry = os.path.join(current, part)
        seen.append(entry)
        if os.path.islink(entry):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks under {path}")
            target = os.path.join(current, os.readlink(entry))
            parts = Path(os.path.abspath(target)).parts
            current, pending = parts[0], list(parts[1:]) + pending
            continue
        current = entry
    return seen


def untrusted_part(path: str | os.PathLike) -> str | None:
    """Why code at ``path`` must not be loaded, or ``None``: the first entry on the way to it (each directory
    from ``/``, each symlink and its target's directories, the file itself) that another user could change,
    i.e. one owned by someone other than this user or root, or writable by its group or others. A sticky
    directory (``/tmp``) may be world-writable: only an entry's owner can rename or delete it there."""
    if not hasattr(os, "getuid"):
        return None
    me = os.getuid()
    for entry in ["/", *_visited(os.fspath(path))]:
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; the directory holding it and its target are checked
        if st.st_uid not in (me, 0):
            return f"{entry} belongs to another user (uid {st.st_uid})"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"{entry} is writable by its group or other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


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
