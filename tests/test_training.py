"""Training from scratch: loss goes down, resume is exact, the CLI trains end to end.

Everything runs on tiny models (d_model 32, 2 layers) over a few KB of text written into a
temporary directory, with one torch thread (much faster than two oversubscribed cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnres_lens import HookedAttnResTransformer, verify_schedule
from attnres_lens.cli import main
from attnres_lens.training import (
    TrainConfig,
    TrainingError,
    collect_files,
    is_held_out,
    load_corpus,
    lr_factor,
    stdlib_files,
    stdlib_root,
    train,
    unigram_loss,
)

TINY = dict(
    n_layers=2, d_model=32, n_heads=2, d_mlp=64, seq_len=32, batch_size=4, threads=1, eval_batches=1
)
TINY_FLAGS = [
    "--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64", "--seq-len", "32",
    "--batch-size", "4", "--threads", "1", "--eval-batches", "1",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Five small, highly regular text files: a tiny model learns them within tens of steps."""
    root = tmp_path_factory.mktemp("corpus")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(5):
        lines = [f"def f_{i}_{j}(x):\n    return x * {j} + {words[j % 8]!r}\n" for j in range(60)]
        (root / f"part{i}.py").write_text("".join(lines))
    (root / ".hidden.py").write_text("ignored")
    return root


# ----------------------------------------------------------------------------- data
def test_default_corpus_is_the_stdlib_sorted_without_site_packages():
    files = stdlib_files()
    root = stdlib_root()
    assert len(files) > 100
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.split("/"))
    assert "os.py" in rel and all(r.endswith(".py") for r in rel)


def test_held_out_split_is_a_pure_function_of_the_path():
    assert is_held_out("asyncio/taskgroups.py", 0.02) == is_held_out("asyncio/taskgroups.py", 0.02)
    keys = [f"pkg/mod_{i}.py" for i in range(2000)]
    frac = sum(is_held_out(k, 0.02) for k in keys) / len(keys)
    assert 0.01 < frac < 0.03


def test_default_corpus_loads_with_a_held_out_split():
    corpus = load_corpus(TrainConfig(max_tokens=10_000, seq_len=64))
    assert corpus.train.numel() == 10_000 and corpus.train.dtype == torch.uint8
    assert corpus.eval.numel() > 10_000
    assert set(corpus.train_files).isdisjoint(corpus.eval_files)
    assert corpus.source.startswith("python-stdlib:")
    # the unigram baseline of Python source is around 3.2 nats/byte
    assert 2.5 < unigram_loss(corpus.train, corpus.eval, 256) < 4.0


def test_collect_files_walks_sorted_and_skips_hidden(corpus_dir):
    files = collect_files([corpus_dir])
    assert [k for _, k in files] == [f"part{i}.py" for i in range(5)]
    with pytest.raises(TrainingError, match="does not exist"):
        collect_files([corpus_dir / "missing"])
    with pytest.raises(TrainingError, match="no files matching"):
        collect_files([corpus_dir], glob="*.md")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_configs_are_refused():
    with pytest.raises(TrainingError, match="arch must be one of"):
        TrainConfig(arch="gpt2")
    with pytest.raises(TrainingError, match="n_blocks"):
        TrainConfig(arch="qwen3", n_blocks=2)
    with pytest.raises(TrainingError, match="steps"):
        TrainConfig(steps=0)


# ----------------------------------------------------------------------------- training
def test_short_training_lowers_the_loss(corpus_dir, tmp_path):
    cfg = TrainConfig(
        arch="kimi", data=[str(corpus_dir)], steps=40, lr=1e-2, warmup_steps=4, eval_every=20,
        out_dir=str(tmp_path / "run"), **TINY,
    )
    result = train(cfg, progress=False)
    losses = result.losses
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"] < math.log(256)
    assert result.final_eval_loss < result.unigram_eval_loss
    # the routers learned something: the queries left zero
    assert any(float(r.proj.weight.detach().abs().max()) > 0 for _, r in result.model.routers())
    # the saved model is the trained one
    loaded = HookedAttnResTransformer.from_pretrained(tmp_path / "run")
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(tokens), result.model(tokens))
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["final_eval_loss"] == result.final_eval_loss
    assert len(log["history"]) == 40


@pytest.mark.parametrize("arch", ["kimi", "cumulative", "qwen3"])
def test_resume_reproduces_the_uninterrupted_trajectory(corpus_dir, tmp_path, arch):
    kw = dict(TINY, arch=arch, data=[str(corpus_dir)], steps=8, warmup_steps=2, eval_every=4, save_every=4)
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **kw), progress=False)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000004"
    assert (ckpt / "trainer_state.pt").is_file()
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **kw), resume=ckpt, progress=False)
    assert resumed.losses == full.losses  # bit-identical, steps 1-4 from the checkpoint's history
    assert resumed.evals == full.evals
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]


def test_resume_refuses_other_data(corpus_dir, tmp_path):
    kw = dict(TINY, arch="cumulative", steps=2, warmup_steps=1, save_every=1)
    train(TrainConfig(data=[str(corpus_dir)], out_dir=str(tmp_path / "a"), **kw), progress=False)
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["data"] == [str(corpus_dir)]
    (corpus_dir / "part0.py").write_text((corpus_dir / "part0.py").read_text() + "# changed\n")
    try:
        with pytest.raises(TrainingError, match="training data differs"):
            train(TrainConfig(out_dir=str(tmp_path / "b")), resume=tmp_path / "a", progress=False)
    finally:
        (corpus_dir / "part0.py").write_text((corpus_dir / "part0.py").read_text().replace("# changed\n", ""))


def test_qwen3_baseline_is_saved_in_hf_format_and_wraps(corpus_dir, tmp_path):
    from transformers import Qwen3ForCausalLM

    train(
        TrainConfig(arch="qwen3", data=[str(corpus_dir)], steps=3, warmup_steps=1, out_dir=str(tmp_path / "q"), **TINY),
        progress=False,
    )
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
    wrapped = HookedAttnResTransformer.from_pretrained(tmp_path / "q", flavour="cumulative", recency_bias=30.0)
    assert verify_schedule(wrapped, tokens) < 1e-6
    torch.testing.assert_close(wrapped(tokens), ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- CLI
def test_cli_train_end_to_end_in_process(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--arch", "cumulative", "--data", str(corpus_dir), "--steps", "3",
                 "--warmup-steps", "1", "--out", str(out), "--quiet", *TINY_FLAGS])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "eval_loss=" in printed
    model = HookedAttnResTransformer.from_pretrained(out)
    assert model.cfg.flavour == "cumulative" and model.cfg.d_model == 32
    assert (out / "checkpoints" / "step-000003" / "trainer_state.pt").is_file()
    # resume a finished run with a changed fixed setting: refused, no traceback
    code = main(["train", "--resume", str(out), "--steps", "9"])
    err = capsys.readouterr().err
    assert code == 1 and "--steps" in err and "Traceback" not in err


def test_cli_train_via_subprocess(corpus_dir, tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "attnres_lens.cli", "train", "--arch", "qwen3", "--data", str(corpus_dir),
         "--steps", "2", "--warmup-steps", "1", "--out", str(out), *TINY_FLAGS],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: eval loss" in proc.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["train", "--steps", "0"], 2, "positive integer"),
        (["train", "--arch", "gpt2"], 2, "invalid choice"),
        (["train", "--data", "/nonexistent/corpus", "--steps", "1"], 1, "does not exist"),
        (["train", "--resume", "/nonexistent/run"], 1, "does not exist"),
        (["train", "--n-blocks", "2", "--arch", "qwen3"], 1, "AttnRes archs only"),
    ],
)
def test_cli_train_bad_arguments(argv, code, needle, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_train_resume_from_a_directory_that_is_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "not a training checkpoint" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside it


def test_cli_help_for_train(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "standard library" in out


def test_bf16_autocast_path_runs_on_cpu(corpus_dir, tmp_path):
    """precision="bf16" is what a GPU run uses by default; the same autocast path runs on CPU."""
    result = train(
        TrainConfig(arch="cumulative", data=[str(corpus_dir)], steps=3, warmup_steps=1, precision="bf16",
                    out_dir=str(tmp_path / "bf16"), **TINY),
        progress=False,
    )
    assert all(math.isfinite(v) for v in result.losses)
    assert next(result.model.parameters()).dtype == torch.float32  # weights stay fp32 (autocast only)


@pytest.mark.parametrize("arch", ["kimi", "cumulative"])
def test_fresh_attnres_models_start_with_zero_routers(arch):
    """Routing is learned from a plain average: every query 0, every recency bias 0."""
    from attnres_lens import ByteTokenizer
    from attnres_lens.training import build_model

    model = build_model(TrainConfig(arch=arch, n_layers=3, d_model=32, n_heads=2, n_blocks=2), ByteTokenizer())
    for _, router in model.routers():
        assert torch.count_nonzero(router.proj.weight) == 0
        assert torch.all(router.norm.weight == 1)
        assert router.bias is None or float(router.bias.detach()) == 0.0
    assert any(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "router" not in n)


# ----------------------------------------------------------------------------- output and memory (issue K 6, 8)
def test_a_nonempty_out_is_refused_unless_overwrite_replaces_it(corpus_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000099").mkdir(parents=True)
    (out / "checkpoints" / "step-000099" / "trainer_state.pt").write_bytes(b"an older run")
    cfg = TrainConfig(**TINY, steps=2, eval_every=0, data=[str(corpus_dir)], out_dir=str(out))
    with pytest.raises(TrainingError, match="is not empty.*--overwrite"):
        train(cfg, progress=False)
    assert (out / "checkpoints" / "step-000099" / "trainer_state.pt").read_bytes() == b"an older run"
    train(cfg, progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # the old run is gone


def test_a_run_resumes_in_its_own_directory_but_overwrite_there_is_refused(corpus_dir, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(**TINY, steps=2, save_every=1, eval_every=0, data=[str(corpus_dir)], out_dir=str(out))
    train(cfg, progress=False)
    with pytest.raises(TrainingError, match="holds the checkpoint being resumed"):
        train(TrainConfig(**{**cfg.to_dict(), "steps": 2}), resume=out / "checkpoints" / "step-000001",
              progress=False, overwrite=True)
    assert (out / "checkpoints" / "step-000001" / "trainer_state.pt").is_file()
    result = train(cfg, resume=out / "checkpoints" / "step-000001", progress=False)
    assert len(result.history) == 2


def test_a_run_that_cannot_fit_in_memory_is_refused_before_reading_data(tmp_path, capsys):
    from attnres_lens.training import activation_memory_bytes

    missing = tmp_path / "no-such-data"
    huge = TrainConfig(**{**TINY, "seq_len": 10**8, "batch_size": 1}, data=[str(missing)], out_dir=str(tmp_path / "o"))
    assert activation_memory_bytes(huge, 256) > 100 * 2**30
    assert activation_memory_bytes(TrainConfig(), 256) < 2**30  # the defaults are far from it
    with pytest.raises(TrainingError, match=r"needs about .* GiB .*--skip-memory-check"):
        train(huge, progress=False)
    with pytest.raises(TrainingError) as skipped:  # the override reaches the data, which is missing
        train(huge, progress=False, check_memory=False)
    assert "no-such-data" in str(skipped.value) and "GiB" not in str(skipped.value)
    assert main(["train", *TINY_FLAGS[:-10], "--seq-len", "100000000", "--batch-size", "1",
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 1
    assert "--skip-memory-check" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() and not (tmp_path / "o").exists()


def test_the_qwen3_baseline_weights_have_the_mode_of_the_other_files(tmp_path):
    import os

    from attnres_lens.training import build_model, load_tokenizer, save_model

    model = build_model(TrainConfig(**TINY, arch="qwen3", out_dir=str(tmp_path)), load_tokenizer(None))
    previous = os.umask(0o022)
    try:
        save_model(model, tmp_path / "base")
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "base").iterdir()}
    assert modes["model.safetensors"] == oct(0o644) == modes["config.json"], modes
