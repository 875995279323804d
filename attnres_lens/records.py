"""A resumable, loss-free result store: one append-only, checksummed record per finished unit.

A store is a directory:

- ``manifest.json``: what the results are of (model hash, tokens hash, settings). Opening a
  store whose manifest differs raises :class:`RunMismatchError` naming the differing fields:
  results of different runs are never mixed.
- ``records-*.jsonl``: one file per writing process (so that ranks and reruns never
  interleave); one line per finished unit: ``{"sha256": ..., "record": {...}}``, the checksum
  over the canonical JSON of the record. Each line is flushed and fsynced before the unit
  counts as done.

Every record carries the run's identity (``"run"``: the SHA-256 of the manifest): a store is
refused (:class:`RunMismatchError`) when it holds another run's records, even when its
``manifest.json`` is gone.

Reading skips (and reports, :class:`RecordsRecoveredWarning`) a torn line (a process killed mid-write) and a line whose checksum
does not match: those units are simply recomputed. A key present twice (a unit recomputed
after a torn copy) is read once. Floats survive the round trip exactly (JSON writes the
shortest repr), NaN included.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .outputs import atomic_write_text, fsync_dir
from .serialize import jsonable

#: Test hook: after this many records, the writing process stops and waits (to be killed).
PAUSE_ENV = "ATTNRES_LENS_PAUSE_AFTER_RECORDS"
MANIFEST = "manifest.json"


class RunMismatchError(ValueError):
    """A store holds the results of a run with another model, other tokens or other settings."""


class RecordsRecoveredWarning(UserWarning):
    """Torn or corrupt records were left out of a store: their units are recomputed."""


def _canonical(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_hash(batches: list[torch.Tensor]) -> str:
    """SHA-256 over the token batches (shapes and values)."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(f"{tuple(batch.shape)}|".encode())
        digest.update(batch.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Loaded:
    """What a store holds: valid records by key, and how many lines were torn or corrupt."""

    records: dict[str, dict] = field(default_factory=dict)
    torn: int = 0
    corrupt: int = 0


class RecordStore:
    """The records of one run in ``directory`` (see the module docstring).

    ``manifest`` is the identity of the run; ``writer`` says whether this process writes it
    (rank 0); other processes call :meth:`check_manifest` once it exists."""

    def __init__(self, directory: Union[str, Path], manifest: Mapping[str, Any], *, tag: str = "r0"):
        self.directory = Path(directory)
        self.manifest = jsonable(dict(manifest))
        #: the run's identity, carried by every record it writes
        self.run = _checksum(_canonical(json.loads(json.dumps(self.manifest))))
        self.tag = tag
        self._file: Optional[Any] = None
        self._written = 0

    # ------------------------------------------------------------------ manifest
    def write_or_check_manifest(self) -> None:
        """Create the store with this run's manifest, or check an existing one matches."""
        path = self.directory / MANIFEST
        if path.exists():
            self.check_manifest()
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint_dir {self.directory} exists and is not a directory")
        if self.directory.is_dir():
            self.load(quiet=True)  # the manifest is gone: the records themselves say whose they are
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")

    def check_manifest(self) -> None:
        """Raise :class:`RunMismatchError` when the stored manifest is not this run's."""
        path = self.directory / MANIFEST
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RunMismatchError(f"{path} cannot be read ({error}); remove {self.directory} to start over") from None
        mine = json.loads(json.dumps(self.manifest))
        differing = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if differing:
            details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {mine.get(k)!r}" for k in differing)
            raise RunMismatchError(
                f"{self.directory} holds the results of another run (differs in {', '.join(differing)}: "
                f"{details}); refusing to mix them. Rerun with the same arguments to resume, or use "
                "another directory (or remove this one) to start over"
            )

    # ------------------------------------------------------------------ records
    def load(self, *, quiet: bool = False) -> Loaded:
        """Every valid record by key; torn and corrupt lines are counted and left out (with a
        warning unless ``quiet``). A record of another run raises :class:`RunMismatchError`."""
        loaded = Loaded()
        for path in sorted(self.directory.glob("records-*.jsonl")):
            data = path.read_bytes()
            lines = data.split(b"\n")
            for number, line in enumerate(lines):
                if not line:
                    continue
                if number == len(lines) - 1:  # no newline after it: the write was cut short
                    loaded.torn += 1
                    continue
                record = _parse(line)
                if record is None:
                    loaded.corrupt += 1
                    continue
                self._check_run(record, path)
                loaded.records.setdefault(record["key"], record)
        if (loaded.torn or loaded.corrupt) and not quiet:
            warnings.warn(
                f"{self.directory}: {loaded.torn} torn and {loaded.corrupt} corrupt record(s) left out; "
                "their units are recomputed",
                RecordsRecoveredWarning,
                stacklevel=2,
            )
        return loaded

    def _check_run(self, record: Mapping[str, Any], path: Path) -> None:
        if record.get("run") != self.run:
            whose = f"run {str(record['run'])[:12]}" if record.get("run") else "a run without a run identity (an older version)"
            raise RunMismatchError(
                f"{path} holds a record of another run ({whose}; this run is {self.run[:12]}: other model, "
                "tokens or settings); refusing to mix them. Rerun with the same arguments to resume, or use "
                f"another directory (or remove {self.directory}) to start over"
            )

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (it must hold a ``"key"``), flushed and fsynced; it is stamped
        with the run's identity (``"run"``)."""
        if "key" not in record:
            raise KeyError("a record needs a 'key'")
        text = _canonical({**record, "run": self.run})
        line = json.dumps({"sha256": _checksum(text), "record": json.loads(text)}, separators=(",", ":"))
        if self._file is None:
            name = f"records-{self.tag}-{time.time_ns()}-{os.getpid()}.jsonl"
            self._file = open(self.directory / name, "a", encoding="utf-8")
            fsync_dir(self.directory)  # the new file's entry survives a crash with its first line
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._written += 1
        _pause_for_tests(self._written, self.tag)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _parse(line: bytes) -> Optional[dict]:
    """The record of a line, or ``None`` when it is not valid JSON or its checksum fails."""
    try:
        wrapper = json.loads(line)
        record = wrapper["record"]
        if _checksum(_canonical(record)) != wrapper["sha256"] or "key" not in record:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return record


def _pause_for_tests(written: int, tag: str) -> None:
    """With ``ATTNRES_LENS_PAUSE_AFTER_RECORDS=N`` set, stop after ``N`` records and wait to be
    killed (``N@r1``: only the store tagged ``r1``, rank 1's): a deterministic kill or stall
    point for the resumption and fault tests."""
    limit, _, only = os.environ.get(PAUSE_ENV, "").partition("@")
    if limit and written >= int(limit) and only in ("", tag):
        print(f"paused after {written} records" + (f" ({tag}, pid {os.getpid()})" if only else ""), flush=True)
        while True:
            time.sleep(60)


__all__ = ["Loaded", "MANIFEST", "PAUSE_ENV", "RecordStore", "RecordsRecoveredWarning", "RunMismatchError", "model_hash",
           "tokens_hash"]
