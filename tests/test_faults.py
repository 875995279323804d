"""The fault suite of issue 22 (R) and issue 25 item 1: what happens to results, checkpoints and
runs under kills, torn writes, full disks, mount points, concurrent writers, stalled ranks,
hostile configs and corrupt weights. Every case here was a loss, a hang, a security problem or
an unclear message before; each asserts the outcome a user needs (nothing lost, a clear error).

Helpers (the torn-write shim, the tmpfs mount, subprocess runs with a pause point) live in
``tests/faults.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ============================================================================ numerics
def test_fp16_router_logits_above_the_fp16_range_route_finitely():
    """A logit above 65504 was cast to fp16 (inf) before the fp32 softmax: NaN routing."""
    from attnres_lens.router import DepthRouter

    torch.manual_seed(0)
    router = DepthRouter(64, 1e-6, bias=True)
    with torch.no_grad():
        router.proj.weight.fill_(2000.0)
        router.bias.fill_(1.0)
    sources = [torch.randn(2, 3, 64) * 1e3 + 1e4 for _ in range(3)]  # finite in fp16 (< 65504)
    reference_logits = router.logits(torch.stack(sources, dim=2))
    assert reference_logits.abs().max() > 65504  # the case: an fp16 logit would overflow
    half = router.to(torch.float16)
    stacked = torch.stack([s.half() for s in sources], dim=2)
    logits = half.logits(stacked)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    out = half([s.half() for s in sources])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    mass = torch.softmax(reference_logits, dim=-1)
    want = (mass.unsqueeze(-2) @ torch.stack(sources, dim=2)).squeeze(-2)
    torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=8.0)  # fp16 resolution at 1e4


# ============================================================================ training checkpoints
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402

import faults  # noqa: E402

TINY_FLAGS = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64", "--seq-len", "32",
              "--batch-size", "4", "--threads", "1", "--eval-batches", "1", "--warmup-steps", "2",
              "--eval-every", "0", "--quiet"]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (root / f"part{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(40)))
    return root


def _train_flags(corpus: Path, out: Path, steps: int = STEPS, save_every: int = 2) -> list[str]:
    return ["train", *TINY_FLAGS, "--data", str(corpus), "--steps", str(steps), "--save-every", str(save_every),
            "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> list[float]:
    """The loss trajectory of the run every interrupted one must reproduce."""
    from attnres_lens.cli import main

    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(_train_flags(corpus, out)) == 0
    _CLEAN_RUN.append(out)
    return _losses(out)


_CLEAN_RUN: list[Path] = []  # where ``uninterrupted`` trained (its checkpoints' sizes size the full disk)


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "training_log.json").read_text())["history"]]


def _leftovers(root: Path) -> list[str]:
    """Temporary or staging files and directories anywhere under ``root`` (and beside it)."""
    names = [p for p in [*root.rglob("*"), *root.parent.glob(f".{root.name}*")]
             if ".tmp" in p.name or "partial" in p.name or p.name.startswith(".attnres")]
    return sorted(str(p.relative_to(root.parent)) for p in names)


def _resume(out: Path, capsys) -> str:
    """``train --resume OUT`` in process; its output."""
    from attnres_lens.cli import main

    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out + captured.err


@pytest.mark.parametrize("fault", ["tear:torch.save:3", "tear:safetensors:3", "kill:torch.save:3"])
def test_a_checkpoint_cut_short_falls_back_to_the_previous_one(corpus, uninterrupted, tmp_path, capsys, fault):
    """A torn trainer_state.pt or model.safetensors of step 6 (or a kill as it is written):
    resume continues from step 4 and reproduces the uninterrupted run; nothing is left over."""
    out = tmp_path / "run"
    died = faults.run_cli(*_train_flags(corpus, out), fault=fault)
    assert died.returncode == -9, died.stderr[-2000:]
    _resume(out, capsys)
    assert _losses(out) == uninterrupted
    assert _leftovers(out) == []


def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(corpus, uninterrupted, tmp_path, capsys):
    from attnres_lens.cli import main

    from attnres_lens.training import ResumeWarning

    out = tmp_path / "run"
    assert main(_train_flags(corpus, out, steps=4)) == 0
    before = _losses(out)
    state = out / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # damaged after it was written
    with pytest.warns(ResumeWarning, match="skipped step-000004: trainer_state.pt has 100 bytes, .*; "
                      "continuing from step-000002"):
        _resume(out, capsys)
    assert _losses(out) == before  # steps 3-4 recomputed from step 2, bit-identical


def test_killed_at_the_training_pause_points_leaves_nothing_behind(corpus, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    run = faults.start_cli(*_train_flags(corpus, out), ATTNRES_LENS_PAUSE_AT="checkpoint-before-marker@4")
    try:
        assert faults.wait_for_line(run, "paused at") == "paused at checkpoint-before-marker@4"
    finally:
        faults.kill(run)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-000002"]
    _resume(out, capsys)  # removes the killed run's staging: provably its own, under the lock
    assert _losses(out) == uninterrupted
    assert _leftovers(out) == []


def test_a_second_train_on_the_same_out_is_refused_naming_the_first(corpus, tmp_path):
    out = tmp_path / "run"
    first = faults.start_cli(*_train_flags(corpus, out), ATTNRES_LENS_PAUSE_AT="step@1")
    try:
        faults.wait_for_line(first, "paused at")
        second = faults.run_cli(*_train_flags(corpus, out) , "--seed", "1", "--overwrite")
        assert second.returncode == 1
        assert f"being written by another run (pid {first.pid}" in second.stderr
    finally:
        faults.kill(first)
    assert not (out / "training_log.json").exists()  # the refused run wrote nothing


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


needs_mount = pytest.mark.skipif(not faults.can_mount(), reason="needs root (mount -t tmpfs) for full disks and mount points")


@needs_mount
def test_a_full_disk_during_training_says_so_and_resumes_from_the_last_complete_checkpoint(
    corpus, uninterrupted, tmp_path, capsys
):
    from attnres_lens.training import TrainConfig, TrainingError, train

    checkpoint = _size(_CLEAN_RUN[0] / "checkpoints" / "step-000002")
    with faults.tmpfs(tmp_path / "disk", f"{(2 * checkpoint + checkpoint // 2) // 1024}k") as disk:
        out = disk / "run"
        cfg = TrainConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, seq_len=32, batch_size=4, threads=1,
                          eval_batches=1, warmup_steps=2, eval_every=0, data=[str(corpus)], steps=STEPS,
                          save_every=2, out_dir=str(out))
        with pytest.raises(TrainingError) as failed:
            train(cfg, progress=False)
        message = str(failed.value)
        assert "No space left on device" in message
        assert "the last complete checkpoint is" in message and f"--resume {out}" in message
        assert _leftovers(out) == []  # the cut-short checkpoint is gone, the complete ones are whole
        faults.remount(disk, "16m")
        _resume(out, capsys)
        assert _losses(out) == uninterrupted


# ============================================================================ mount points, concurrent probes
@pytest.fixture(scope="module")
def probe_source(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny saved checkpoint and a text file to probe it on."""
    from reference import tiny_attnres

    root = tmp_path_factory.mktemp("probe-source")
    tiny_attnres("kimi", n_layers=2, n_blocks=2).save_pretrained(root / "model")
    (root / "text.txt").write_text("".join(f"line {i}: x = {i * 7 % 13}\n" for i in range(60)))
    return root / "model", root / "text.txt"


def _probe(probe_source, out: Path, *extra: str) -> list[str]:
    model, text = probe_source
    return ["probe", str(model), "--text", str(text), "--out", str(out), "--prompts", "4", "--seq-len", "12",
            "--n-boot", "40", "--groups", "slice", "--quiet", *extra]


@needs_mount
def test_probe_onto_a_mount_point_replaces_its_contents_only_once_complete(probe_source, tmp_path, capsys):
    from attnres_lens.cli import main

    with faults.tmpfs(tmp_path / "volume", "16m") as volume:
        assert main(_probe(probe_source, volume)) == 0, capsys.readouterr().err  # an empty mount point
        assert (volume / "report.md").is_file() and os.path.ismount(volume)
        (volume / "old-result.txt").write_text("the earlier run")
        assert main(_probe(probe_source, volume, "--seed", "1", "--overwrite")) == 0, capsys.readouterr().err
        assert os.path.ismount(volume) and (volume / "report.md").is_file()
        assert not (volume / "old-result.txt").exists()
        assert json.loads((volume / "summary.json").read_text())["settings"]["seed"] == 1
        assert _leftovers(volume) == []


@needs_mount
def test_train_overwrite_onto_a_mount_point(corpus, tmp_path):
    from attnres_lens.cli import main

    with faults.tmpfs(tmp_path / "volume", "16m") as volume:
        (volume / "old-result.txt").write_text("the earlier run")
        assert main(_train_flags(corpus, volume, steps=2)) == 1  # not empty: refused, kept
        assert (volume / "old-result.txt").read_text() == "the earlier run"
        assert main([*_train_flags(corpus, volume, steps=2), "--overwrite"]) == 0
        assert os.path.ismount(volume) and (volume / "training_log.json").is_file()
        assert not (volume / "old-result.txt").exists() and _leftovers(volume) == []


def test_a_second_probe_on_the_same_out_is_refused_naming_the_first(probe_source, tmp_path):
    from attnres_lens.outputs import output_lock

    out = tmp_path / "out"
    holder = faults.start_python(
        "import sys, time; from attnres_lens.outputs import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(600)\n"
    )
    try:
        faults.wait_for_line(holder, "locked")
        refused = faults.run_cli(*_probe(probe_source, out))
        assert refused.returncode == 1 and f"being written by another run (pid {holder.pid}" in refused.stderr
    finally:
        faults.kill(holder)
    assert not out.exists()
    with output_lock(out):  # released by the holder's death: the kernel drops a dead process's flock
        pass


# ============================================================================ run identity
def test_records_of_another_run_are_refused_even_without_the_manifest(tmp_path):
    from distributed_worker import workload

    from attnres_lens.patching import sweep_sources
    from attnres_lens.records import MANIFEST, RunMismatchError

    model, batches = workload()
    checkpoint = tmp_path / "ckpt"
    sweep_sources(model, batches[0], groups="family", progress=False, checkpoint_dir=checkpoint)
    (checkpoint / MANIFEST).unlink()
    with pytest.raises(RunMismatchError, match="holds a record of another run"):
        sweep_sources(model, batches[0], groups="family", mode="mask", progress=False, checkpoint_dir=checkpoint)
    with pytest.raises(RunMismatchError, match="holds a record of another run"):
        sweep_sources(model, batches[1], groups="family", progress=False, checkpoint_dir=checkpoint)
    assert not (checkpoint / MANIFEST).exists() and len(list(checkpoint.glob("records-*.jsonl"))) == 1
    again = sweep_sources(model, batches[0], groups="family", progress=False, checkpoint_dir=checkpoint)
    fresh = sweep_sources(model, batches[0], groups="family", progress=False)
    assert again["effect"].tolist() == fresh["effect"].tolist()  # its own records are still its own


def test_torn_probe_records_are_reported_by_the_cli(probe_source, tmp_path):
    out = tmp_path / "out"
    run = faults.start_cli(*_probe(probe_source, out), ATTNRES_LENS_PAUSE_AFTER_RECORDS="3")
    try:
        faults.wait_for_line(run, "paused after 3 records")
    finally:
        faults.kill(run)
    (records,) = (tmp_path / "out.checkpoints").rglob("records-*.jsonl")
    records.write_bytes(records.read_bytes()[:-20])  # the last line cut short
    rerun = faults.run_cli(*_probe(probe_source, out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 torn and 0 corrupt record(s) left out; their units are recomputed" in rerun.stderr
