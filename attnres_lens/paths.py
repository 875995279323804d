"""Checks on the paths a user names, in plain Python (no torch), so that the command line
refuses a wrong path in a fraction of a second, before it imports anything heavy; the loader
applies the same rule to ``from_pretrained``'s source."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional, Union


def local_checkpoint(source: Union[str, os.PathLike]) -> Optional[Path]:
    """The local directory ``source`` names, or ``None`` when it is a hub id ``org/name``.

    Raises :class:`NotADirectoryError` for a file and :class:`FileNotFoundError` for a path that
    is neither an existing directory nor shaped like a hub id, naming ``source`` as given."""
    path = Path(source).expanduser()
    check_link(path)  # a link loop is neither a directory nor a hub id
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(source)!r} is a file; pass the checkpoint directory")
    name = str(source)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name!r} is neither a local directory nor a hub id of the form 'org/name'")
    return None


def check_link(path: Union[str, os.PathLike]) -> None:
    """Refuse, saying which, a path that is a symbolic link loop (:class:`ValueError`) or a
    dangling link (:class:`FileNotFoundError`)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{str(path)!r} is a symbolic link loop (it, or a link on its way, points back "
                             "at itself); point it at the real file or directory") from None
        if err.errno == errno.ENOENT and os.path.islink(path):
            raise FileNotFoundError(f"{str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does "
                                    "not exist") from None


def check_creatable(path: Union[str, os.PathLike], what: str = "the output") -> None:
    """Refuse, naming ``path`` as given, when ``path`` could not be created: its nearest existing
    ancestor is not a directory, or a directory cannot be made in it (tried, then removed:
    permission bits alone do not tell, e.g. for root in ``/proc``)."""
    target = Path(path).expanduser()
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create {what} {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnres-lens-write-check-", dir=ancestor))
    except OSError as err:
        raise PermissionError(
            f"cannot create {what} {str(path)!r}: {str(ancestor)!r} does not accept new directories "
            f"({err.strerror or err})"
        ) from None
