"""Output directories: refuse to mix runs, and leave nothing behind when a run fails.

:func:`check_output_dir` is the up-front check (before any work); :func:`staged_output_dir`
writes a run into a temporary sibling directory that is renamed into place only on success.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union


class OutputExistsError(FileExistsError):
    """The output directory already holds files, and replacing it was not asked for."""


def check_output_dir(out_dir: Union[str, os.PathLike], *, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """``out_dir`` as a path, after checking a run may write it: it does not exist, is an
    empty directory, or ``overwrite`` is set (then it is replaced, once the run succeeds)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"the output directory {str(out)!r} is not empty; choose another, or pass {flag} to "
            "replace it (a run never mixes its files with an earlier run's)"
        )
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot create {str(out)!r}: {str(parent)!r} is not writable")
    return out


@contextlib.contextmanager
def staged_output_dir(out_dir: Union[str, os.PathLike], *, overwrite: bool, flag: str = "overwrite=True") -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out_dir``; when the block succeeds it replaces
    ``out_dir``, when it raises it is removed, so a failed run leaves nothing behind."""
    out = check_output_dir(out_dir, overwrite=overwrite, flag=flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:  # named by the user's path, not the temporary one beside it
        raise type(err)(f"cannot create the output {str(out_dir)!r}: {err.strerror or err}") from None
    try:
        yield staging
        check_output_dir(out, overwrite=overwrite, flag=flag)  # nothing appeared meanwhile
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a normal directory is not
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(paths: Iterable[Union[str, os.PathLike]]) -> None:
    """Give files the mode an ordinary ``open()`` would (0644 under the usual umask 022).

    safetensors writes through a private temporary file (mode 0600), so without this a checkpoint
    on a shared cluster is unreadable to colleagues while its config.json is not."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def replace_output_dir(out_dir: Union[str, os.PathLike], *, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """For runs that write as they go (training): check, then clear ``out_dir`` when
    ``overwrite`` is set and it holds files."""
    out = check_output_dir(out_dir, overwrite=overwrite, flag=flag)
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    return out
