"""A resumable, loss-free result store: one append-only, checksummed record per finished unit.

A store is a directory:

- ``manifest.json``: what the results are of (model hash, tokens hash, settings). Opening a
  store whose manifest differs raises :class:`RunMismatchError` naming the differing fields:
  results of different runs are never mixed.
- ``records-*.jsonl``: one file per writing process (so that ranks and reruns never
  interleave); one line per finished unit: ``{"sha256": ..., "record": {...}}``, the checksum
  over the canonical JSON of the record. Each line is flushed and fsynced before the unit
  counts as done.

Reading skips (and reports) a torn line (a process killed mid-write) and a line whose checksum
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

from .serialize import jsonable

#: Test hook: after this many records, the writing process stops and waits (to be killed).
PAUSE_ENV = "ATTNRES_LENS_PAUSE_AFTER_RECORDS"
MANIFEST = "manifest.json"


class RunMismatchError(ValueError):
    """A store holds the results of a run with another model, other tokens or other settings."""


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
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)

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
    def load(self) -> Loaded:
        """Every valid record by key; torn and corrupt lines are counted and left out."""
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
                loaded.records.setdefault(record["key"], record)
        if loaded.torn or loaded.corrupt:
            warnings.warn(
                f"{self.directory}: {loaded.torn} torn and {loaded.corrupt} corrupt record(s) left out; "
                "their units are recomputed",
                stacklevel=2,
            )
        return loaded

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (it must hold a ``"key"``), flushed and fsynced."""
        if "key" not in record:
            raise KeyError("a record needs a 'key'")
        text = _canonical(record)
        line = json.dumps({"sha256": _checksum(text), "record": json.loads(text)}, separators=(",", ":"))
        if self._file is None:
            name = f"records-{self.tag}-{time.time_ns()}-{os.getpid()}.jsonl"
            self._file = open(self.directory / name, "a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._written += 1
        _pause_for_tests(self._written)

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


def _pause_for_tests(written: int) -> None:
    """With ``ATTNRES_LENS_PAUSE_AFTER_RECORDS=N`` set, stop after ``N`` records and wait to be
    killed: a deterministic kill point for the resumption tests."""
    limit = os.environ.get(PAUSE_ENV)
    if limit and written >= int(limit):
        print(f"paused after {written} records", flush=True)
        while True:
            time.sleep(60)


__all__ = ["Loaded", "MANIFEST", "PAUSE_ENV", "RecordStore", "RunMismatchError", "model_hash", "tokens_hash"]
