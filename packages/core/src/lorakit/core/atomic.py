"""Atomic writes of files and of whole folders (used by checkpoints and exports).

A checkpoint folder is replaced as a whole, never file by file (every instant of a
``kill -9`` leaves the old or the new checkpoint, optimizer state included):

1. A writer (``checkpoint.save``) writes every file into a fresh hidden sibling ``.NAME.partial-<pid>-<rand>``
   (files there that are not lorakit's, e.g. a trainer's, are hard-linked in first),
   fsyncs it and renames it to ``.NAME.new-…``: from then on it is complete.
2. It swaps it in with two renames: ``NAME`` → ``.NAME.old-…``, ``.NAME.new-…`` → ``NAME``.
   A concurrent saver's folder found at ``NAME`` is pushed aside the same way, so the
   last rename wins and two savers leave one complete checkpoint.
3. Superseded folders are renamed to ``.NAME.trash-…`` and only then deleted, so a
   half-deleted folder never carries a name that means "complete".

Between the two renames of step 2, ``NAME`` is missing. A reader (``checkpoint.load``)
reads the newest complete ``.new-``/``.old-`` sibling in its place (:func:`readable`) and
renames nothing; the next writer (``checkpoint.save``, a resumed run, ``lorakit recover
PATH``) runs :func:`recover`, which renames that sibling back to ``NAME`` and deletes
leftovers of writers that no longer run.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
import shutil
from pathlib import Path


def _token() -> str:
    """Unique per writer: the pid (to tell leftovers of dead writers) and random bits."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folder itself to disk."""
    for entry in folder.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_dir():
            fsync_tree(entry)
        else:
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it over ``path``:
    a process killed mid-write leaves the previous file intact, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp{_token()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|new|old|trash)-(?P<pid>\d+)-[0-9a-f]+(?:-\d+)?")


def staging_folder(dst: Path) -> Path:
    """A new empty hidden folder beside ``dst`` to build its next version in."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    folder = dst.with_name(f".{dst.name}.partial-{_token()}")
    folder.mkdir()
    return folder


def publish(folder: Path, dst: Path) -> Path:
    """Put the complete ``folder`` (a sibling of ``dst``) at ``dst``, replacing what is there.

    At every instant ``dst`` is the old or the new folder, or is missing while both
    lie beside it under complete hidden names for :func:`recover`.
    """
    fsync_tree(folder)
    token = _token()
    ready = dst.with_name(f".{dst.name}.new-{token}")
    os.rename(folder, ready)
    aside = []
    for attempt in itertools.count():
        old = dst.with_name(f".{dst.name}.old-{token}-{attempt}")
        try:
            os.rename(dst, old)
            aside.append(old)
        except FileNotFoundError:
            pass
        try:
            os.rename(ready, dst)
            break
        except FileNotFoundError:  # a reader's recover() installed it for us
            break
        except OSError as exc:  # another saver's folder landed in between: push it aside too
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt >= 100:
                raise
    _fsync_dir(dst.parent)
    for old in aside:
        discard(old, dst.name)
    return dst


def discard(folder: Path, name: str | None = None) -> None:
    """Delete ``folder`` (whose target is ``name``), never leaving a half-deleted folder
    under a name that :func:`recover` would take for complete."""
    trash = folder.with_name(f".{name or folder.name}.trash-{_token()}")
    try:
        os.rename(folder, trash)  # first out of reach of recover(), then deleted
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _leftovers(dst: Path) -> list[tuple[str, int, Path]]:
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return []
    return [(m["kind"], int(m["pid"]), e) for e in entries
            if (m := _LEFTOVER.fullmatch(e.name)) and m["target"] == dst.name]


def readable(dst: str | os.PathLike) -> Path:
    """The folder a reader should read for ``dst``, renaming nothing: ``dst`` itself, or,
    between the two renames of a killed :func:`publish`, the complete hidden version that
    :func:`recover` would put back. Reading never writes; the next writer recovers."""
    dst = Path(dst)
    if os.path.lexists(dst):
        return dst
    complete = [e for kind, _, e in _leftovers(dst) if kind in ("new", "old")]
    return max(complete, key=lambda e: (".new-" in e.name, _mtime(e))) if complete else dst


def recover(dst: str | os.PathLike) -> None:
    """Undo what a killed :func:`publish` left: if ``dst`` is missing, rename its newest
    complete hidden version back; then delete leftovers of writers no longer running."""
    dst = Path(dst)
    for _ in range(10):  # a rename can lose a race with another process: look again
        if os.path.lexists(dst):
            break
        complete = [e for kind, _, e in _leftovers(dst) if kind in ("new", "old")]
        if not complete:
            break
        best = max(complete, key=lambda e: (".new-" in e.name, _mtime(e)))  # .new- is newer than .old-
        try:
            os.rename(best, dst)
        except OSError:
            continue
    for kind, pid, entry in _leftovers(dst):
        if not _alive(pid) and (kind in ("partial", "trash") or os.path.lexists(dst)):
            discard(entry, dst.name)


def recover_all(parent: Path) -> None:
    """:func:`recover` every folder of ``parent`` that has leftovers beside it."""
    try:
        names = {m["target"] for e in parent.iterdir() if (m := _LEFTOVER.fullmatch(e.name))}
    except OSError:
        return
    for name in names:
        recover(parent / name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def carry_over(old: Path, new: Path, own: tuple[str, ...]) -> None:
    """Hard-link (or copy) the entries of ``old`` not named in ``own`` (the writer's own files) into ``new``.

    A concurrent writer may move ``old`` away meanwhile (its own swap). The entries are then
    carried from where they went: the folder now under ``old``'s name (that writer's, which
    carried them too) or the newest complete hidden version. Whichever writer publishes last,
    the other tools' files are in its folder (assuming the other writer carried them was wrong
    when this one's rename came last)."""
    source = old
    for _ in range(10):  # each retry follows a rename of another writer
        try:
            _carry(source, new, own)
            return
        except FileNotFoundError:
            source = readable(old)
            if not os.path.lexists(source):
                return  # no complete version left to carry from


def _carry(old: Path, new: Path, own: tuple[str, ...]) -> None:
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # no hard links on this filesystem
            shutil.copy2(src, dst)

    shutil.copymode(old, new)
    for entry in old.iterdir():
        target = new / entry.name
        if entry.name in own or (os.path.lexists(target) and not entry.is_dir()):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():  # completes a copy a moved-away source interrupted
            shutil.copytree(entry, target, symlinks=True, copy_function=link, dirs_exist_ok=True)
        else:
            link(entry, target)
