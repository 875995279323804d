"""Sharded (torchrun, gloo) and resumable sweeps: the same numbers as one uninterrupted process.

The workload lives in ``tests/distributed_worker.py``; multi-process runs start it with
``python -m torch.distributed.run`` in a subprocess, one thread per process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from attnres_lens.records import PAUSE_ENV, RunMismatchError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
sys.path.insert(0, str(HERE))

import distributed_worker  # noqa: E402


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process, uncheckpointed results."""
    return distributed_worker.results()


def _env() -> dict[str, str]:
    root = str(HERE.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *args]


def assert_same(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got["names"] == want["names"]
    for key, values in want.items():
        if key != "names":
            np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(values, float), atol=atol, rtol=0,
                                       err_msg=key)


def _records(directory: Path) -> list[dict]:
    lines = [line for path in sorted(directory.rglob("records-*.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line)["record"] for line in lines]


def _probe_arguments(tmp_path: Path, out: Path) -> list[str]:
    """``probe`` on a tiny saved checkpoint (the worker's model) and a text file."""
    checkpoint, text = tmp_path / "model", tmp_path / "text.txt"
    if not checkpoint.exists():
        distributed_worker.workload()[0].save_pretrained(checkpoint)
        text.write_text("".join(f"line {i}: x = {i * 7 % 13}\n" for i in range(60)))
    return [str(checkpoint), "--text", str(text), "--out", str(out), "--prompts", "5", "--seq-len", "12",
            "--n-boot", "40", "--groups", "slice", "--quiet"]


@pytest.mark.slow
def test_world_size_2_under_torchrun_equals_one_process(reference, tmp_path, capsys):
    from attnres_lens.cli import main

    out = tmp_path / "out.json"
    probe = _probe_arguments(tmp_path, tmp_path / "probe-2")
    run = subprocess.run(_torchrun(2, str(WORKER), str(out), "--checkpoint", str(tmp_path / "ckpt"), "--probe", *probe),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    assert_same(got, reference)
    assert run.stdout.count("done") == 1  # rank 0 alone reports
    # attnres-lens probe under torchrun: rank 0 alone prints and writes the same report as one process
    assert run.stdout.count("content dependence (max router)") == 1
    assert main(["probe", *_probe_arguments(tmp_path, tmp_path / "probe-1")]) == 0
    tables = [json.loads((tmp_path / name / "summary.json").read_text())["models"]["model"]["groups"]["slice"]["table"]
              for name in ("probe-1", "probe-2")]
    for column in ("mass", "effect", "effect_low", "effect_high"):
        np.testing.assert_allclose([row[column] for row in tables[1]], [row[column] for row in tables[0]], atol=1e-6)
    assert not (tmp_path / "probe-2.checkpoints").exists()  # the records served; the report is complete
    for sweep, n_records in (("slice", 3 * len(reference["names"])), ("family", len(reference["family_effect_per_prompt"]))):
        files = sorted(p.name for p in (tmp_path / "ckpt" / sweep).glob("records-*.jsonl"))
        assert [name.split("-")[1] for name in files] == ["r0", "r1"], files  # both ranks worked, one file each
        keys = [record["key"] for record in _records(tmp_path / "ckpt" / sweep)]
        assert len(set(keys)) == len(keys) == n_records


@pytest.mark.slow
def test_killed_midway_then_resumed_equals_uninterrupted(reference, tmp_path):
    out, checkpoint = tmp_path / "out.json", tmp_path / "ckpt"
    worker = subprocess.Popen([sys.executable, str(WORKER), str(out), "--checkpoint", str(checkpoint)],
                              env={**_env(), PAUSE_ENV: "7"}, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "paused after 7 records"
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=2)
        except subprocess.TimeoutExpired:
            worker.kill()
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()
    assert not out.exists() and len(_records(checkpoint)) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing torn or corrupt to report: every line was whole
        resumed = distributed_worker.results(str(checkpoint))
    assert_same(resumed, reference, atol=0.0)
    keys = [r["key"] for r in _records(checkpoint / "slice")]
    assert len(keys) == len(set(keys)) == 3 * len(reference["names"])  # no duplicate, none missing


def test_torn_and_corrupt_records_are_recomputed(reference, tmp_path):
    checkpoint = tmp_path / "ckpt"
    distributed_worker.results(str(checkpoint))
    (path,) = (checkpoint / "slice").glob("records-*.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    corrupt, torn = json.loads(lines[4])["record"], json.loads(lines[-1])["record"]
    value = json.dumps(corrupt["effect"][0])
    lines[4] = lines[4].replace(f"[{value}", f"[{json.dumps(corrupt['effect'][0] + 0.5)}", 1)  # still valid JSON
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last write cut short
    with pytest.warns(UserWarning, match="1 torn and 1 corrupt"):
        again = distributed_worker.results(str(checkpoint))
    assert_same(again, reference, atol=0.0)
    (new,) = [p for p in (checkpoint / "slice").glob("records-*.jsonl") if p != path]
    recomputed = [json.loads(line)["record"]["key"] for line in new.read_text().splitlines()]
    assert sorted(recomputed) == sorted([corrupt["key"], torn["key"]])


def test_changed_arguments_are_refused(tmp_path):
    import torch

    from attnres_lens.patching import sweep_sources

    model, batches = distributed_worker.workload()
    checkpoint = tmp_path / "ckpt"
    sweep_sources(model, batches[0], groups="family", progress=False, checkpoint_dir=checkpoint)
    with pytest.raises(RunMismatchError, match="settings"):
        sweep_sources(model, batches[0], groups="family", mode="mask", progress=False, checkpoint_dir=checkpoint)
    with pytest.raises(RunMismatchError, match="tokens_sha256"):
        sweep_sources(model, batches[1], groups="family", progress=False, checkpoint_dir=checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    with pytest.raises(RunMismatchError, match="model_sha256"):
        sweep_sources(model, batches[0], groups="family", progress=False, checkpoint_dir=checkpoint)
    assert len(list(checkpoint.glob("records-*.jsonl"))) == 1  # nothing was added by the refused runs
