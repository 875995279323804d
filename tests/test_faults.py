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
import contextlib  # noqa: E402
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ============================================================================ loading safety (R 5, Q 1)
@pytest.fixture()
def saved(tmp_path) -> Path:
    """A tiny saved cumulative checkpoint to damage."""
    from reference import tiny_attnres

    directory = tmp_path / "ckpt"
    tiny_attnres("cumulative", n_layers=2, n_blocks=2).save_pretrained(directory)
    return directory


def _edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def _load(directory, **kwargs):
    from attnres_lens import HookedAttnResTransformer

    return HookedAttnResTransformer.from_pretrained(str(directory), **kwargs)


def test_a_billion_layers_in_config_json_is_refused_before_anything_is_sized(saved):
    import resource

    from attnres_lens.loading import CheckpointError

    _edit_config(saved, num_hidden_layers=1_000_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"config.json: num_hidden_layers is 1000000000, but the weights hold "
                                              r"layers 0-1 \(2 distinct\)"):
        _load(saved)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was sized


@pytest.mark.parametrize("value, shown", [(4.7, "4.7$"), (True, "True$"), ("four", "'four'$")])
def test_a_count_of_the_wrong_type_is_refused_naming_field_and_file(saved, value, shown):
    from attnres_lens.loading import CheckpointError

    _edit_config(saved, num_hidden_layers=value)
    with pytest.raises(CheckpointError, match=f"{saved / 'config.json'}: num_hidden_layers must be an integer, "
                                              f"got {shown}"):
        _load(saved)


def test_a_nan_rope_theta_is_refused(saved):
    from attnres_lens.loading import CheckpointError

    text = (saved / "config.json").read_text()
    config = json.loads(text)
    (saved / "config.json").write_text(text.replace(json.dumps(config["rope_theta"]), "NaN", 1))
    with pytest.raises(CheckpointError, match="rope_theta must be a finite number, got nan"):
        _load(saved)


def test_a_shard_outside_the_checkpoint_directory_is_never_read(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from attnres_lens.loading import CheckpointError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    state = load_file(str(saved / "model.safetensors"))
    save_file(state, str(outside / "x.safetensors"))
    (saved / "model.safetensors").unlink()
    index = {"weight_map": {key: "../elsewhere/x.safetensors" for key in state}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard '../elsewhere/x.safetensors', which resolves to .*outside "
                                              "the checkpoint directory"):
        _load(saved)


def test_a_single_file_and_an_index_load_the_single_file_as_transformers_does_with_a_warning(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    other = {key: tensor + 1.0 for key, tensor in state.items()}
    save_file(other, str(saved / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {key: "model-00001-of-00001.safetensors" for key in state}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="holds both model.safetensors and model.safetensors.index.json: loading "
                                         "model.safetensors, as transformers does"):
        model = _load(saved)
    assert torch.equal(model.embed.weight, state["model.embed_tokens.weight"])


def test_symlink_loops_are_named(saved, tmp_path):
    from attnres_lens.loading import CheckpointError

    (saved / "model.safetensors").unlink()
    os.symlink(saved / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors' is a symbolic link loop"):
        _load(saved)
    loop = tmp_path / "org"
    loop.mkdir()
    os.symlink(loop / "name", loop / "name")  # also shaped like a hub id
    with pytest.raises(ValueError, match="org/name' is a symbolic link loop"):
        _load(loop / "name")


def test_an_old_format_pytorch_model_bin_loads(saved):
    from safetensors.torch import load_file

    state = load_file(str(saved / "model.safetensors"))
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    model = _load(saved)
    assert torch.equal(model.embed.weight, state["model.embed_tokens.weight"])


def test_integer_weights_are_refused_naming_key_dtype_and_the_expected_one(saved):
    from safetensors.torch import load_file, save_file

    from attnres_lens.loading import CheckpointError

    state = load_file(str(saved / "model.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"stored in a dtype that does not fit their parameter, which expects a "
                                              r"floating-point dtype .*lm_head.weight: I32"):
        _load(saved)


def test_non_finite_weights_are_named_by_inspect_and_refused_by_probe_and_from_pretrained(saved, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from attnres_lens.cli import main
    from attnres_lens.loading import CheckpointError

    state = load_file(str(saved / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    state["model.norm.weight"][3] = float("inf")
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold NaN or inf: \[model.layers.1.mlp.up_proj.weight, "
                                              r"model.norm.weight\]"):
        _load(saved)
    assert _load(saved, check_finite=False).non_finite_keys == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert main(["inspect", str(saved)]) == 0
    assert "NOT FINITE  2 tensor(s) hold NaN or inf: model.layers.1.mlp.up_proj.weight, model.norm.weight" in (
        capsys.readouterr().out)
    text = tmp_path / "text.txt"
    text.write_text("some text to probe on, long enough for a few windows of twelve tokens. " * 4)
    assert main(["probe", str(saved), "--text", str(text), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "hold NaN or inf" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_inspect_says_when_routing_is_uniform(tmp_path, capsys):
    from reference import tiny_attnres

    from attnres_lens.cli import main

    model = tiny_attnres("kimi", n_layers=2, n_blocks=2)
    with torch.no_grad():
        for _, router in model.routers():
            router.proj.weight.zero_()
    model.save_pretrained(tmp_path / "zeroed")
    assert main(["inspect", str(tmp_path / "zeroed")]) == 0
    assert "routing     routing is uniform: untrained or wrapped" in capsys.readouterr().out
    assert main(["inspect", "--json", str(tmp_path / "zeroed")]) == 0
    assert json.loads(capsys.readouterr().out)["routing_note"].startswith("routing is uniform: untrained or wrapped")


# ============================================================================ bounded waits
def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from attnres_lens.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(minutes=10)
    monkeypatch.setenv(TIMEOUT_ENV, "5")
    assert collective_timeout() == timedelta(seconds=5)
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"ATTNRES_LENS_DIST_TIMEOUT must be a number of seconds > 0, got '{bad}'"):
            collective_timeout()


def _torchrun(n: int, *args: str) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
            f"--master_port={port}", *args]


def test_a_stalled_rank_ends_the_run_naming_it_and_the_run_resumes(probe_source, tmp_path, capsys):
    """torchrun, world size 2, gloo: rank 1 stops (SIGSTOP) after 3 records. Rank 0 ends the
    run within the timeout, naming rank 1 and saying how to resume; the rerun completes with
    the uninterrupted run's numbers. Before: rank 0 waited torch's 30 minutes, then a bare
    gloo 'Timed out waiting' naming no rank."""
    import re
    import signal
    import subprocess
    import time

    from attnres_lens.cli import main
    from attnres_lens.records import PAUSE_ENV

    timeout = 10
    out = tmp_path / "out"
    run = subprocess.Popen(_torchrun(2, str(HERE / "faults.py"), *_probe(probe_source, out)),
                           env=faults.env(ATTNRES_LENS_DIST_TIMEOUT=str(timeout), **{PAUSE_ENV: "3@r1"}),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: errors.extend((time.monotonic(), line) for line in run.stderr))
    reader.start()
    stalled = None
    try:
        line = faults.wait_for_line(run, "paused after 3 records (r1")
        stalled = int(re.search(r"pid (\d+)", line).group(1))
        os.kill(stalled, signal.SIGSTOP)
        stopped_at = time.monotonic()
        deadline = stopped_at + timeout + 120  # rank 0 finishes its own share first, on a busy machine
        while not any("error:" in text for _, text in errors) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
    finally:
        if stalled is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGKILL)
        run.wait(timeout=120)
        reader.join()
        run.stdout.close()
    said = [(at, text) for at, text in errors if "attnres-lens probe: error:" in text]
    assert run.returncode != 0 and said, "".join(text for _, text in errors)[-3000:]
    at, message = said[0]
    assert at - stopped_at < timeout + 120
    assert re.search(rf"error: rank 1 of 2 did not reach the .* within {timeout}s \(ATTNRES_LENS_DIST_TIMEOUT\): "
                     "it is stalled or dead, so rank 0 stops here; the finished units are kept in "
                     rf"{re.escape(str(out))}\.checkpoints: rerun the same command to resume from them", message), message
    kept = list((tmp_path / "out.checkpoints").rglob("records-r*.jsonl"))
    assert {p.name.split("-")[1] for p in kept} == {"r0", "r1"}  # both ranks' finished units are kept
    assert main(_probe(probe_source, out)) == 0, capsys.readouterr().err  # the resume
    assert main(_probe(probe_source, tmp_path / "clean")) == 0
    resumed, clean = (json.loads((tmp_path / name / "summary.json").read_text())["models"]["model"]["groups"]
                      for name in ("out", "clean"))
    for groups in (resumed, clean):
        groups["slice"].pop("timings")  # wall times: the one thing a rerun may not reproduce
    assert resumed == clean  # every table, number for number
    assert not (tmp_path / "out.checkpoints").exists()
