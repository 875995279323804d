"""The command line end to end on tiny models: inspect, probe, demo; bad arguments; the
bundled models and the demo's summary.json contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from attnres_lens import AttnResConfig, HookedAttnResTransformer
from attnres_lens.cli import main
from attnres_lens.protocol import GROUP_FIELDS, MODEL_FIELDS, SUMMARY_FIELDS

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained-style kimi checkpoint, a cumulative one, and a vanilla HF Qwen3."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    dirs = {}
    for flavour, blocks in (("kimi", 2), ("cumulative", 3)):
        model = HookedAttnResTransformer(
            AttnResConfig(flavour=flavour, n_layers=3, n_blocks=blocks, d_model=32, d_head=8, d_mlp=48, n_ctx=64)
        )
        with torch.no_grad():  # learned-looking routing: non-zero queries
            for _, router in model.routers():
                router.proj.weight.normal_(0, 0.5)
        model.save_pretrained(root / flavour)
        dirs[flavour] = root / flavour
    hf = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    )
    hf.save_pretrained(root / "qwen3")
    dirs["qwen3"] = root / "qwen3"
    (root / "text.txt").write_text(TEXT)
    dirs["text"] = root / "text.txt"
    return dirs


# ----------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_inspect_prints_format_flavour_schedule_routers_and_sources(tiny_dirs, flavour, capsys):
    assert main(["inspect", str(tiny_dirs[flavour])]) == 0
    out = capsys.readouterr().out
    assert "format      attnres_lens" in out
    assert f"flavour     {flavour}" in out
    assert "schedule    none" in out
    assert "blocks.2.mlp_router" in out and "source table:" in out
    assert ("final_router" in out) == (flavour == "kimi")
    assert "tokenizer   byte-level (built in)" in out


def test_inspect_json_and_wrapped_vanilla(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["qwen3"]), "--flavour", "cumulative", "--recency-bias", "2.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "qwen3" and info["flavour"] == "cumulative"
    assert info["schedule"] == {"kind": "recency", "bias": 2.5}
    assert all(r["bias"] == 2.5 and r["query_norm"] == 0 for r in info["routers"])
    assert len(info["source_table"]) == sum(r["n_sources"] for r in info["routers"])
    # a vanilla checkpoint without --flavour is described, with how to wrap it
    assert main(["inspect", str(tiny_dirs["qwen3"])]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "--flavour kimi" in out


# ----------------------------------------------------------------------------- probe
def test_probe_end_to_end_on_a_tiny_checkpoint(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "probe"
    code = main(["probe", str(tiny_dirs["kimi"]), "--text", str(tiny_dirs["text"]), "--out", str(out),
                 "--prompts", "6", "--seq-len", "32", "--n-boot", "50", "--groups", "slice", "family",
                 "--mode", "mask", "--batch-size", "3", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "content dependence" in printed and "learned" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mode"] == "mask" and summary["settings"]["groups"] == ["slice", "family"]
    entry = summary["models"]["model"]
    assert entry["routing_learned"] and entry["verify_schedule_max_abs_dev"] is None
    assert entry["content_dependence"] > 0
    assert set(entry["groups"]) == {"slice", "family"}
    assert (out / "report.md").read_text().startswith("# Routing probe")
    assert entry["tokenizer"] == "byte-level (built in)"  # the tokenizer used is named
    assert "- tokenizer: byte-level (built in)" in (out / "report.md").read_text()
    for fig in summary["figures"]:
        assert (out / fig).stat().st_size > 1000
    _assert_html_report(out, summary)


def _assert_html_report(out, summary):
    """report.html: one section per (model, grouping), each with its interactive figures, plotly.js
    embedded once and nothing fetched from the network."""
    pytest.importorskip("plotly")
    page = (out / "report.html").read_text()
    assert page.count("<script src=") == 0 and page.count("Plotly.newPlot") >= 2 * sum(
        len(entry["groups"]) for entry in summary["models"].values()
    )
    from attnres_lens.viz.html_report import slug

    for name, entry in summary["models"].items():
        for group in entry["groups"].values():
            for kind, path in group["figures"].items():  # the PNG, then its interactive version
                assert f'data-path="{path}"' in page, path
                if kind in ("effect", "scatter"):
                    assert f'id="interactive-{slug(path)}-0"' in page, path
    assert page.count("plotly.js v") == 1  # embedded once: opens offline by double-click


def test_probe_wrapped_vanilla_checks_its_schedule(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "probe-wrapped"
    code = main(["probe", str(tiny_dirs["qwen3"]), "--flavour", "kimi", "--text", str(tiny_dirs["text"]),
                 "--out", str(out), "--prompts", "5", "--seq-len", "24", "--n-boot", "40",
                 "--groups", "family_band", "--bands", "early=0", "late=1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    entry = json.loads((out / "summary.json").read_text())["models"]["model"]
    assert entry["schedule"]["kind"] == "uniform"
    assert entry["verify_schedule_max_abs_dev"] < 1e-6
    assert entry["content_dependence"] == 0.0


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["probe", "DIR"], 2, "--text"),
        (["probe", "DIR", "--text", "TEXT", "--mode", "explode"], 2, "invalid choice"),
        (["probe", "DIR", "--text", "TEXT", "--prompts", "0"], 2, "expected at least 4 prompts"),
        (["probe", "DIR", "--text", "TEXT", "--bands", "early"], 2, "NAME=LAYERS"),
        (["probe", "DIR", "--text", "/no/such/file.txt"], 1, "is not a file"),
        (["probe", "DIR", "--text", "TEXT", "--prompts", "2"], 2, "expected at least 4 prompts"),
        (["probe", "/no/such/dir", "--text", "TEXT"], 1, "/no/such/dir"),
        (["probe", "QWEN", "--text", "TEXT"], 1, "must be wrapped"),
        (["probe", "QWEN", "--text", "TEXT", "--flavour", "cumulative"], 1, "--recency-bias"),
        (["inspect"], 2, "SOURCE"),
        (["inspect", "/no/such/dir"], 1, "/no/such/dir"),
        (["demo", "--n-boot", "x"], 2, "expected a number of resamples from 40"),
        (["nonsense"], 2, "invalid choice"),
        ([], 2, "give a command"),
    ],
)
def test_bad_arguments_give_a_clear_error_and_no_traceback(tiny_dirs, argv, code, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out (attnres-probe/) would land
    subst = {"DIR": str(tiny_dirs["cumulative"]), "TEXT": str(tiny_dirs["text"]), "QWEN": str(tiny_dirs["qwen3"])}
    assert main([subst.get(a, a) for a in argv]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # a failed run leaves nothing behind


@pytest.mark.parametrize("command", ["demo", "probe", "inspect", "train"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: attnres-lens {command}" in capsys.readouterr().out


def test_console_script_runs_in_a_subprocess(tiny_dirs):
    proc = subprocess.run(
        [sys.executable, "-m", "attnres_lens.cli", "inspect", str(tiny_dirs["cumulative"]), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["flavour"] == "cumulative"
    proc = subprocess.run([sys.executable, "-m", "attnres_lens.cli", "inspect", "/no/such/dir"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "error" in proc.stderr


# ----------------------------------------------------------------------------- bundled + demo
@pytest.mark.xdist_group("demo")  # one demo run (conftest.demo_run) per session
def test_demo_writes_the_promised_report(demo_run):
    # the run (demo --prompts 6 --seq-len 32 --n-boot 40 --quiet) is shared with test_golden.py
    code, printed, err, out = demo_run
    assert code == 0, err
    assert "wrapped" in printed and "trained" in printed and "content dependence" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert list(summary["models"]) == ["wrapped", "trained"]
    for name, entry in summary["models"].items():
        assert set(MODEL_FIELDS) <= set(entry), set(MODEL_FIELDS) - set(entry)
        assert set(entry["groups"]) == {"slice", "family_band"}
        for group in entry["groups"].values():
            assert set(GROUP_FIELDS) <= set(group)
            assert {"attn", "mlp"} <= set(group["largest"])
            assert "spearman" in group["rank_correlation"]
            assert group["table"] and {"mass", "effect", "flag"} <= set(group["table"][0])
    wrapped, trained = summary["models"]["wrapped"], summary["models"]["trained"]
    assert wrapped["verify_schedule_max_abs_dev"] < 1e-6 and wrapped["content_dependence"] == 0.0
    assert wrapped["schedule"] == {"kind": "recency", "bias": 3.0}
    assert trained["routing_learned"] and trained["content_dependence"] > 0.05
    assert summary["comparison"]["structured_routing_only_when_trained"] is True
    report = (out / "report.md").read_text()
    for fig in summary["figures"]:
        assert (out / fig).is_file() and fig in report
    assert "summary.json" in report and "verify_schedule" in report and "report.html" in report
    _assert_html_report(out, summary)


# ----------------------------------------------------------------------------- messages (issue K)
@pytest.mark.parametrize(
    "argv",
    [[], ["nonsense"], ["probe"], ["probe", "DIR", "--text", "TEXT", "--mode", "explode"], ["demo", "--n-boot", "x"],
     ["train", "--steps", "0"], ["inspect", "a", "b"]],
)
def test_argument_errors_are_one_line(tiny_dirs, argv, capsys):
    """docs/cli.md promises one-line errors: argparse's usage block is not printed."""
    subst = {"DIR": str(tiny_dirs["cumulative"]), "TEXT": str(tiny_dirs["text"])}
    assert main([subst.get(a, a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnres-lens") and "error:" in lines[0], captured.err
    assert "--help" in lines[0] and captured.out == ""


def test_demo_help_does_not_claim_it_takes_no_arguments(capsys):
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "no arguments" not in text.lower() and "--prompts" in text


def test_config_json_that_is_not_an_object_is_named(tmp_path, capsys):
    from attnres_lens.loading import CheckpointError

    (tmp_path / "config.json").write_text("[1, 2, 3]")
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not an object" in err and "config.json" in err and "attribute" not in err
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        HookedAttnResTransformer.from_pretrained(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["probe", "inspect"])
def test_device_cuda_without_cuda_is_a_clear_error(tiny_dirs, command, tmp_path, capsys):
    argv = [command, str(tiny_dirs["kimi"]), "--device", "cuda"]
    if command == "probe":
        argv += ["--text", str(tiny_dirs["text"]), "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "device='cuda'" in err and "--device cpu" in err and "Torch not compiled" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="use device 'cpu'"):
        HookedAttnResTransformer.from_pretrained(tiny_dirs["kimi"], device="cuda")


def test_a_closed_pipe_ends_the_command_quietly(tiny_dirs):
    """``attnres-lens inspect DIR | head -1``: the reader leaves, the command stops quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnres_lens.cli", "inspect", str(tiny_dirs["cumulative"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the command writes anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err


# ----------------------------------------------------------------------------- tokenizer (issue K 1)
@pytest.fixture(scope="module")
def vocab_1000_dir(tmp_path_factory) -> Path:
    """A Qwen3 with a real-sized vocabulary (1000) and no tokenizer files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory = tmp_path_factory.mktemp("vocab1000")
    Qwen3ForCausalLM(
        Qwen3Config(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    ).save_pretrained(directory)
    return directory


def test_probe_refuses_a_real_vocabulary_without_a_tokenizer(vocab_1000_dir, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["probe", str(vocab_1000_dir), "--flavour", "kimi", "--text", str(tiny_dirs["text"]), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--tokenizer DIR" in err and "1,000" in err
    assert not out.exists()


def test_inspect_names_a_missing_tokenizer(vocab_1000_dir, capsys):
    assert main(["inspect", str(vocab_1000_dir), "--flavour", "kimi"]) == 0
    assert "tokenizer   none (token ids only" in capsys.readouterr().out


# ----------------------------------------------------------------------------- output directories (issue K 2, 5-7)
PROBE_FAST = ["--prompts", "6", "--seq-len", "32", "--n-boot", "40", "--groups", "slice"]


@pytest.mark.parametrize(
    "extra, code, needle",
    [
        (["--prompts", "2"], 2, "--prompts: expected at least 4 prompts (with fewer, a 95% bootstrap CI is just the data range), got 2"),
        (["--groups", "family_band", "--bands", "early=0,1", "late=5"], 1,
         "--bands early=0-1 late=5: band 'late': layer 5 out of range; the model's layers are 0..2"),
        (["--groups", "family_band", "--bands", "early=0,1", "late=1,2"], 1,
         "--bands early=0-1 late=1-2: layer 1 is in two bands: 'early' and 'late'; bands may not overlap"),
        (["--groups", "family_band", "--bands", "a=0", "a=1"], 1, "each band name once"),
        (["--n-boot", "100000000"], 2, "a number of resamples from 40 (each tail of a 95% CI needs one) to 100,000, got 100000000"),
        (["--n-boot", "10"], 2, "a number of resamples from 40 (each tail of a 95% CI needs one) to 100,000, got 10"),
    ],
)
def test_failed_probes_leave_nothing_behind(tiny_dirs, tmp_path, capsys, extra, code, needle):
    out = tmp_path / "runs" / "probe"
    argv = ["probe", str(tiny_dirs["cumulative"]), "--text", str(tiny_dirs["text"]), "--out", str(out)]
    assert main(argv + PROBE_FAST + extra) == code
    assert needle in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []  # no staging left


def test_arguments_are_checked_before_the_model_is_loaded(tiny_dirs, tmp_path, capsys):
    """With the weights file corrupted, a bad band is still the error reported: it was checked first."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["cumulative"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    argv = ["probe", str(broken), "--text", str(tiny_dirs["text"]), "--out", str(tmp_path / "out"), "--bands", "late=7"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--bands late=7: band 'late': layer 7 out of range; the model's layers are 0..2" in err and "safetensors" not in err


def test_an_error_after_the_progress_bar_starts_is_on_a_fresh_line(tiny_dirs, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:100])  # 3 windows of 32 tokens: too few prompts, known only once tokenised
    argv = ["probe", str(tiny_dirs["cumulative"]), "--text", str(short), "--out", str(tmp_path / "out"),
            "--prompts", "6", "--seq-len", "32"]  # refused by mass_vs_effect, after the loss step
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "attnres-lens" in err  # the bar was drawn (its description)
    assert any(line.startswith("attnres-lens probe: error:") for line in err.splitlines()), repr(err[-300:])


def test_a_reduced_size_is_said_once_on_the_console(tiny_dirs, tmp_path, capsys):
    argv = ["probe", str(tiny_dirs["kimi"]), "--text", str(tiny_dirs["text"]), "--out", str(tmp_path / "out"),
            "--prompts", "500", "--seq-len", "1000", "--n-boot", "40", "--groups", "slice", "--quiet"]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]
    assert summary["seq_len"] == 64 and summary["n_prompts"] < 500
    assert len(notes) == 1, notes
    assert f"running {summary['n_prompts']} prompts x 64 tokens, not the 500 x 1000 asked" in notes[0]
    assert "context is 64 tokens" in notes[0] and f"only {summary['n_prompts']} windows" in notes[0]
    assert main(argv[:-9] + ["--out", str(tmp_path / "again"), "--prompts", "6", "--seq-len", "32", "--n-boot", "40",
                             "--groups", "slice", "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err  # nothing reduced, nothing said


def test_a_nonempty_out_is_refused_unless_overwrite_replaces_it(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_family_band_mass.png").write_bytes(b"an earlier run's figure")
    argv = ["probe", str(tiny_dirs["kimi"]), "--text", str(tiny_dirs["text"]), "--out", str(out), *PROBE_FAST, "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["model_family_band_mass.png"]  # untouched
    assert main(argv + ["--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model_family_band_mass.png" not in names and {"report.md", "summary.json", "figures"} <= names
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # a normal directory, not mkdtemp's private one


# ----------------------------------------------------------------------------- fail fast (issue 25 Q 4)
_BEFORE_TORCH = """
import json, sys
from attnres_lens.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    results.append([code, "torch" in sys.modules])
print(json.dumps(results))
"""


def _config_variants(source: Path, root: Path, **fields: Any) -> dict[str, str]:
    """Copies of checkpoint ``source`` under ``root`` whose config.json sets one field each."""
    made = {}
    for name, value in fields.items():
        target = root / name
        shutil.copytree(source, target)
        config = json.loads((target / "config.json").read_text())
        config["num_hidden_layers"] = value
        (target / "config.json").write_text(json.dumps(config))
        made[name] = str(target)
    return made


def test_arguments_checkable_without_torch_fail_before_it_is_imported(tiny_dirs, tmp_path, tmp_path_factory):
    """A wrong path, a missing or empty --text file, too few prompts or resamples, bands the
    model cannot have, a config field of the wrong type, an output that cannot be created: each
    refused before torch is imported, naming the user's path, leaving nothing."""
    ckpt, text, afile = str(tiny_dirs["cumulative"]), str(tiny_dirs["text"]), tmp_path / "afile"
    afile.write_text("x")
    inputs = tmp_path_factory.mktemp("inputs")
    empty, blank = inputs / "empty.txt", inputs / "blank.txt"
    empty.write_text("")
    blank.write_text(" \n\t\n")
    bad = _config_variants(tiny_dirs["cumulative"], inputs, word="four", fraction=4.7, flag=True)
    n_layers = json.loads((tiny_dirs["cumulative"] / "config.json").read_text())["num_hidden_layers"]
    cases = [  # (argv, exit code, what the one line says)
        (["probe", ckpt, "--text", text, str(empty)], 1, f"--text: {empty} is empty; give text"),
        (["probe", ckpt, "--text", str(blank)], 1, f"--text: {blank} is empty (only whitespace)"),
        (["probe", ckpt, "--text", text, "--bands", "a=0-1", "b=1"], 1, "layer 1 is in two bands: 'a' and 'b'"),
        (["probe", ckpt, "--text", text, "--bands", "a=0", f"b=1-{n_layers}"], 1,
         f"band 'b': layer {n_layers} out of range; the model's layers are 0..{n_layers - 1}"),
        (["probe", ckpt, "--text", text, "--bands", "a=0", "a=1"], 1, "--bands: each band name once, got a more"),
        (["demo", "--bands", "x=0", "x=1"], 1, "--bands: each band name once, got x more"),
        (["probe", bad["word"], "--text", text], 1,
         f"{bad['word']}/config.json: num_hidden_layers must be an integer, got 'four'"),
        (["probe", bad["fraction"], "--text", text], 1, "config.json: num_hidden_layers must be an integer, got 4.7"),
        (["inspect", bad["flag"]], 1, f"{bad['flag']}/config.json: num_hidden_layers must be an integer, got True"),
        (["probe", str(tmp_path / "no-ckpt"), "--text", text], 1, f"{str(tmp_path / 'no-ckpt')!r} is neither a local directory"),
        (["probe", text, "--text", text], 1, f"{text!r} is a file; pass the checkpoint directory"),
        (["probe", ckpt, "--text", str(tmp_path / "missing.txt")], 1, f"--text: {tmp_path / 'missing.txt'} is not a file"),
        (["probe", ckpt, "--text", text, "--prompts", "3"], 2, "--prompts: expected at least 4 prompts"),
        (["probe", ckpt, "--text", text, "--n-boot", "10"], 2, "--n-boot: expected a number of resamples from 40"),
        (["probe", ckpt, "--text", text, "--out", "/proc/attnres-out"], 1, "cannot create --out '/proc/attnres-out'"),
        (["probe", ckpt, "--text", text, "--out", str(afile / "sub")], 1,
         f"cannot create --out {str(afile / 'sub')!r}: {str(afile)!r} is a file, not a directory"),
        (["probe", ckpt, "--text", text, "--tokenizer", str(tmp_path / "tok")], 1, "--tokenizer: a tokenizer is a local directory"),
        (["demo", "--out", "/proc/demo-out"], 1, "cannot create --out '/proc/demo-out'"),
        (["demo", "--out", str(afile)], 1, "is a file, not a directory"),
        (["inspect", str(tmp_path / "no-ckpt")], 1, "is neither a local directory nor a hub id"),
        (["train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")], 1, f"--data: {tmp_path / 'no-data'} does not exist"),
        (["train", "--out", "/proc/run"], 1, "cannot create --out '/proc/run'"),
        (["train", "--resume", str(tmp_path / "no-run")], 1, f"--resume: {tmp_path / 'no-run'} does not exist"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _BEFORE_TORCH, json.dumps([argv for argv, _, _ in cases])],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results, lines = json.loads(proc.stdout), proc.stderr.strip().splitlines()
    assert len(lines) == len(cases), proc.stderr
    for (argv, code, needle), (got_code, imported_torch), line in zip(cases, results, lines):
        assert (got_code, imported_torch) == (code, False), (argv, line)
        assert needle in line and ".partial-" not in line and ".checkpoints" not in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created, nothing left


def test_a_checkpoint_swallowed_by_text_is_named(tiny_dirs, capsys):
    ckpt, text = str(tiny_dirs["cumulative"]), str(tiny_dirs["text"])
    assert main(["probe", "--text", text, ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert "required: SOURCE" not in err and len(err.splitlines()) == 1
    assert f"--text took the checkpoint {ckpt!r} as a text file" in err
    assert f"attnres-lens probe {ckpt} --text {text}" in err
    assert main(["probe", "--text", text]) == 2  # no directory among the files: argparse's own words
    assert "required: SOURCE" in capsys.readouterr().err


def test_a_failed_probe_removes_its_checkpoints_an_interrupted_one_keeps_them(tiny_dirs, tmp_path, capsys, monkeypatch):
    """Every unit is measured, then the report step fails: a failure a rerun cannot mend removes
    OUT.checkpoints/; an interruption keeps it, says where, and the rerun resumes from it."""
    from attnres_lens import protocol

    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    argv = ["probe", str(tiny_dirs["cumulative"]), "--text", str(tiny_dirs["text"]), "--out", str(out), *PROBE_FAST, "--quiet"]
    written = protocol._write_report

    def fail_with(exc):
        def write_report(*args, **kwargs):
            assert checkpoints.is_dir() and any(checkpoints.rglob("*"))  # the units were recorded
            raise exc

        return write_report

    monkeypatch.setattr(protocol, "_write_report", fail_with(RuntimeError("no space left on device")))
    assert main(argv) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(protocol, "_write_report", fail_with(KeyboardInterrupt()))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"the finished units are kept in {checkpoints}: rerun the same command to resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.checkpoints"]
    monkeypatch.setattr(protocol, "_write_report", written)
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_HOLD_LOCK = """
import sys
from attnres_lens.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_probe_refused_by_the_lock_leaves_the_running_probes_records(tiny_dirs, tmp_path, capsys):
    """A second probe on an --out another process is writing is refused, and does not remove
    OUT.checkpoints/, which is the first run's."""
    import os

    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    (checkpoints / "model").mkdir(parents=True)
    (checkpoints / "model" / "record").write_text("the first run's")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["probe", str(tiny_dirs["cumulative"]), "--text", str(tiny_dirs["text"]), "--out", str(out),
                *PROBE_FAST, "--quiet"]
        assert main(argv) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert (checkpoints / "model" / "record").read_text() == "the first run's"
    finally:
        holder.communicate("", timeout=30)


def test_a_finished_probe_removes_its_records_before_it_releases_the_lock(tiny_dirs, tmp_path, monkeypatch):
    """The records go while the run still holds --out's lock: a next probe that takes the lock
    never finds them half-removed under it."""
    import contextlib

    from attnres_lens import protocol

    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    held = protocol.output_lock
    seen = []

    @contextlib.contextmanager
    def observed_lock(path):
        with held(path) as lock:
            yield lock
            seen.append(checkpoints.exists())  # the last moment the lock is held

    monkeypatch.setattr(protocol, "output_lock", observed_lock)
    argv = ["probe", str(tiny_dirs["cumulative"]), "--text", str(tiny_dirs["text"]), "--out", str(out),
            *PROBE_FAST, "--quiet"]
    assert main(argv) == 0
    assert seen == [False] and not checkpoints.exists() and (out / "report.md").is_file()
