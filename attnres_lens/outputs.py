"""Output directories and files: nothing lost, nothing mixed, nothing left behind.

- :func:`check_output_dir`: the up-front check (before any work): the output does not exist,
  is empty, or ``overwrite`` is set.
- :func:`output_lock`: one writer per output directory (an advisory ``fcntl.flock`` on
  ``.NAME.lock`` beside it); a second writer is refused with the holder's pid.
- :func:`staged_output_dir`: a run writes into a staging directory; only once it is complete
  does it take the output's place. An output that does not exist yet is staged beside it and
  renamed into place; an existing one (a mount point, say) is staged inside it and its contents
  are replaced, the directory itself is never removed or renamed onto. Old results are removed
  only after the new ones are complete.
- :func:`atomic_file` / :func:`atomic_write_text`: one file written to a temporary file in the
  same directory, fsynced, renamed into place, and the directory fsynced.

Every staging directory carries an owner mark (:data:`OWNER_MARK`, with the writer's pid): a
later writer, holding the lock, removes the stale ones it finds (:func:`remove_stale`), and
nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

PathArg = Union[str, os.PathLike]
#: Staging directories (inside an output, or beside one: ``.NAME.partial-*``).
STAGING_PREFIX = ".attnres-partial-"
#: Old results set aside while new ones are committed; removed once the new ones are complete.
OLD_PREFIX = ".attnres-old-"
#: The file in every staging directory that says it is ours (and whose).
OWNER_MARK = ".attnres-lens-staging"
#: Test hook: ``NAME`` or ``NAME@STEP`` (see :func:`pause_point`).
PAUSE_AT_ENV = "ATTNRES_LENS_PAUSE_AT"


class OutputExistsError(FileExistsError):
    """The output directory already holds files, and replacing it was not asked for."""


class OutputLockedError(RuntimeError):
    """Another process is writing the same output directory."""


# ============================================================================ checks
def check_output_dir(out_dir: PathArg, *, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """``out_dir`` as a path, after checking a run may write it: it does not exist, is an
    empty directory (stale staging of an interrupted run does not count), or ``overwrite`` is
    set (then its contents are replaced, once the run succeeds)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output {str(out)!r} is a file, not a directory")
    if out.is_dir() and contents(out) and not overwrite:
        raise OutputExistsError(
            f"the output directory {str(out)!r} is not empty; choose another, or pass {flag} to "
            "replace it (a run never mixes its files with an earlier run's)"
        )
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK) and not (out.is_dir() and os.access(out, os.W_OK)):
        raise PermissionError(f"cannot create {str(out)!r}: {str(parent)!r} is not writable")
    return out


def contents(directory: Path) -> list[Path]:
    """The entries of ``directory`` that are results (not our own staging)."""
    return sorted(p for p in directory.iterdir() if not _is_staging(p) and p.name != OWNER_MARK)


def _is_staging(path: Path) -> bool:
    return path.name.startswith(STAGING_PREFIX) and (path / OWNER_MARK).is_file()


# ============================================================================ locking
_HELD: dict[str, list] = {}  # lock path -> [open file, depth]: reentrant within one process
_LIVE: set[str] = set()  # staging directories this process is writing


def lock_path(out_dir: PathArg) -> Path:
    """The lock file of an output directory: ``.NAME.lock`` beside it."""
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out_dir: PathArg) -> Iterator[Path]:
    """Hold the advisory lock of ``out_dir`` for the block (reentrant within a process), or
    raise :class:`OutputLockedError` naming the pid of the process that holds it."""
    path = lock_path(out_dir)
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path, out_dir)
    except OutputLockedError:
        raise
    except OSError as err:  # named by the user's path, not the lock file beside it
        raise type(err)(f"cannot create the output {str(out_dir)!r}: {err.strerror or err}") from None
    _HELD[key] = [handle, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()  # under the lock: a waiting writer re-checks the inode (see _acquire)
        handle.close()


def _acquire(path: Path, out_dir: PathArg):
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputLockedError(
                f"{str(out_dir)!r} is being written by another run (pid {holder}, lock {str(path)!r}); "
                "wait for it to finish, or choose another output directory"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we waited for it
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()


# ============================================================================ atomic files
def fsync_dir(directory: PathArg) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: PathArg) -> None:
    """fsync every file and directory under ``root`` (``root`` included)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_file(path: PathArg) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; when the block succeeds the file written
    there is fsynced and renamed onto ``path`` (and the directory fsynced), when it raises the
    temporary file is removed. ``path`` is never seen half-written."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def atomic_write_text(path: PathArg, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


# ============================================================================ staging
def new_staging(parent: Path, name: str = "") -> Path:
    """A fresh staging directory in ``parent`` carrying the owner mark."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}", dir=parent))
    (staging / OWNER_MARK).write_text(json.dumps({"pid": os.getpid(), "created": time.time()}) + "\n")
    _LIVE.add(str(staging.absolute()))
    return staging


def end_staging(staging: Path) -> None:
    """The staging directory is committed or removed: no longer this process's to protect."""
    _LIVE.discard(str(staging.absolute()))


def remove_stale(directory: PathArg) -> list[Path]:
    """Remove the staging directories in ``directory`` that a killed run left (call it only
    while holding the directory's lock: no live writer is using them). Returns what went."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if _is_staging(p) and not _is_live(p)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _is_live(staging: Path) -> bool:
    """Whether the staging directory is one this process is still writing."""
    return str(staging.absolute()) in _LIVE


def commit_into(staging: Path, target: Path) -> None:
    """Make ``staging``'s entries the contents of ``target`` (which exists): the new files are
    made durable, the old entries set aside, the new ones moved in, and only then the old
    ones removed. ``target`` itself is never removed or renamed (it may be a mount point)."""
    fsync_tree(staging)
    aside = target / f"{OLD_PREFIX}{secrets.token_hex(4)}"
    aside.mkdir()
    for entry in target.iterdir():
        if entry not in (staging, aside):
            os.rename(entry, aside / entry.name)
    for entry in staging.iterdir():
        if entry.name != OWNER_MARK:
            os.rename(entry, target / entry.name)
    fsync_dir(target)
    shutil.rmtree(staging)
    shutil.rmtree(aside)
    drop_set_aside(target)  # and any an interrupted commit left


@contextlib.contextmanager
def staged_output_dir(out_dir: PathArg, *, overwrite: bool, flag: str = "overwrite=True") -> Iterator[Path]:
    """Yield a fresh staging directory for ``out_dir``'s new contents; when the block succeeds
    they become ``out_dir``'s contents, when it raises they are removed, so a failed run
    leaves nothing behind and the old results stay until the new ones are complete. Holds the
    output's lock for the block (see :func:`output_lock`)."""
    out = check_output_dir(out_dir, overwrite=overwrite, flag=flag)
    with output_lock(out):
        remove_stale(out)
        remove_stale_siblings(out)
        inside = out.is_dir()
        try:
            staging = new_staging(out) if inside else new_staging(out.parent, f"{out.name}-")
        except OSError as err:  # named by the user's path, not the temporary one
            raise type(err)(f"cannot create the output {str(out_dir)!r}: {err.strerror or err}") from None
        try:
            yield staging
            check_output_dir(out, overwrite=overwrite, flag=flag)  # nothing appeared meanwhile
            if inside:
                commit_into(staging, out)
            else:
                fsync_tree(staging)
                os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
                os.rename(staging, out)
                (out / OWNER_MARK).unlink()
                fsync_dir(out)
                fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            end_staging(staging)


def remove_stale_siblings(out: Path) -> None:
    """Stale staging of ``out`` that was made beside it (``out`` did not exist then)."""
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.is_dir():
        return
    for path in parent.glob(f"{STAGING_PREFIX}{out.name}-*"):
        if _is_staging(path) and not _is_live(path):
            shutil.rmtree(path, ignore_errors=True)


def clear_contents(out_dir: PathArg) -> Optional[Path]:
    """Set ``out_dir``'s current contents aside (into a hidden ``.attnres-old-*`` directory
    inside it) so a run that writes as it goes (training) starts empty without removing the
    directory itself; :func:`drop_set_aside` removes them once the new results are complete,
    :func:`restore_set_aside` puts them back after a failure. Returns the aside directory."""
    out = Path(out_dir)
    entries = contents(out) if out.is_dir() else []
    if not entries:
        return None
    aside = out / f"{OLD_PREFIX}{secrets.token_hex(4)}"
    aside.mkdir()
    for entry in entries:
        os.rename(entry, aside / entry.name)
    fsync_dir(out)
    return aside


def drop_set_aside(out_dir: PathArg) -> None:
    """Remove every set-aside ``.attnres-old-*`` directory of ``out_dir``: the new results are
    complete."""
    for path in Path(out_dir).glob(f"{OLD_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def restore_set_aside(out_dir: PathArg, aside: Path) -> None:
    """After a failed run: remove what it wrote and put the old contents back."""
    out = Path(out_dir)
    for entry in contents(out):
        if entry != aside and not entry.name.startswith(OLD_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    for entry in aside.iterdir():
        os.rename(entry, out / entry.name)
    aside.rmdir()


# ============================================================================ modes
def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(paths: Iterable[PathArg]) -> None:
    """Give files the mode an ordinary ``open()`` would (0644 under the usual umask 022).

    safetensors writes through a private temporary file (mode 0600), so without this a checkpoint
    on a shared cluster is unreadable to colleagues while its config.json is not."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


# ============================================================================ test hook
def pause_point(name: str, step: Optional[int] = None) -> None:
    """With ``ATTNRES_LENS_PAUSE_AT=NAME`` (or ``NAME@STEP``) set, print ``paused at NAME`` and
    wait to be killed here: a deterministic kill point for the fault tests."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted:
        return
    here = name if step is None else f"{name}@{step}"
    if wanted in (name, here):
        print(f"paused at {here}", flush=True)
        while True:
            time.sleep(60)
