"""The bundled models: small, same shape and budget, the AttnRes one with content-dependent
routing and a loss well below the unigram baseline; the held-out text and its license."""

from __future__ import annotations

import json

import pytest
import torch

from attnres_lens import bundled, verify_schedule


@pytest.fixture(scope="module")
def models():
    return bundled.load_attnres(), bundled.load_wrapped_baseline()


def test_bundled_models_are_small_and_have_the_same_sources(models):
    assert set(bundled.available_models()) >= {bundled.ATTNRES_MODEL, bundled.BASELINE_MODEL}
    total = sum(
        p.stat().st_size for name in bundled.available_models() for p in bundled.model_path(name).iterdir()
    )
    assert total < 10 * 2**20
    trained, wrapped = models
    assert trained.source_table().equals(wrapped.source_table())
    assert not trained.schedule.is_scheduled
    assert wrapped.schedule.kind == "recency" and wrapped.schedule.bias == bundled.DEMO_RECENCY_BIAS
    assert json.loads((bundled.model_path(bundled.BASELINE_MODEL) / "config.json").read_text())["model_type"] == "qwen3"


def test_same_data_and_budget():
    cfg = {
        name: json.loads((bundled.model_path(name) / "train_config.json").read_text())
        for name in (bundled.ATTNRES_MODEL, bundled.BASELINE_MODEL)
    }
    a, b = cfg.values()
    differing = {k for k in a if a[k] != b[k]}
    assert differing <= {"arch", "out_dir"}, differing
    logs = [json.loads((bundled.model_path(n) / "training_log.json").read_text()) for n in cfg]
    assert logs[0]["data"]["fingerprint"] == logs[1]["data"]["fingerprint"]
    for path in bundled.EVAL_SOURCES:  # the bundled evaluation text was held out from training
        assert path in logs[0]["data"]["eval_files"]


def test_trained_routing_is_content_dependent_and_loss_beats_unigram(models):
    trained, wrapped = models
    tokens = bundled.eval_tokens(trained, n_prompts=16, seq_len=128)
    names = [f"{s.name}.hook_weights" for s in trained.router_specs]
    with torch.no_grad():
        _, cache = trained.run_with_cache(tokens, names_filter=names)
        loss = float(trained(tokens, return_type="loss"))
    stds = [float(cache[n].flatten(0, 1).std(0).max()) for n in names]
    assert max(stds) > 0.1  # the routing weights move by >0.1 from token to token
    counts = torch.bincount(tokens.flatten(), minlength=256).double() + 1
    # in-sample unigram of the same text: a lower bound for any unigram baseline trained elsewhere
    unigram = float(-(counts / counts.sum()).log()[tokens[:, 1:].flatten()].mean())
    assert loss < unigram - 1.0
    assert verify_schedule(wrapped, tokens) < 1e-6


def test_eval_text_and_license():
    text = bundled.eval_text()
    assert 20_000 < len(text) < 100_000 and "class TaskGroup" in text
    assert "Python Software Foundation" in (bundled.data_dir() / "eval" / "LICENSE-PSF.txt").read_text()
    assert "PSF" in (bundled.data_dir() / "README.md").read_text()
