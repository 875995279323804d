"""Padding (issue 25 Q 5): every consumer of a padded batch leaves the pad positions out.

A batch of unequal strings is right-padded with the pad id 0 (the NUL byte, a real token), so
the tokens alone do not say where the pads are; the attention mask does. Each consumer given
the padded tokens with ``attention_mask=`` (or the strings themselves) must give, prompt by
prompt, the numbers of each prompt run alone, and means over prompts of them (the unit of
analysis is the prompt). ``PROMPTS`` has two prompts of one length that are not adjacent, so
the consumers' grouping by length must also put the per-prompt values back in input order.
``model`` is conftest's module-scoped tiny model of each flavour (kimi and cumulative).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from attnres_lens import gradient_attribution, mass_vs_effect, routing_statistics, sweep_sources
from attnres_lens.attribution.estimate import estimate_effects
from attnres_lens.metrics import logit_diff_metric
from attnres_lens.patching import run_sweep

PROMPTS = ["ab", "abcdef", "xy", "abc"]  # lengths 2, 6, 2, 3: padded to 6
ORDER = [0, 2, 1, 3]  # the prompts grouped by length, in order of first appearance

pytestmark = [pytest.mark.filterwarnings("ignore:bootstrap CIs over only"),
              pytest.mark.filterwarnings("ignore::attnres_lens.sweep_plan.UndefinedInterventionWarning")]


def _padded(model):
    tokens, mask = model.to_tokens(PROMPTS, return_attention_mask=True)
    assert mask.sum(1).tolist() == [len(p) for p in PROMPTS] and (tokens[0, 2:] == model.pad_token_id).all()
    return tokens, mask


def _alone(model):
    return [model.to_tokens(p) for p in PROMPTS]


def _per_prompt_logit_diff():
    """A metric with per-prompt data (a correct/incorrect id per prompt), read at the last
    position: for a padded prompt that is a pad unless the prompt is unpadded first."""
    return logit_diff_metric([98, 99, 100, 101], [120, 121, 122, 123], position=-1)


def _stack(column):
    return np.stack(list(column))  # [row, prompt]


# ----------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("positions", [None, [-1]], ids=["all-positions", "last-position"])
def test_sweep_of_a_padded_batch_equals_each_prompt_swept_alone(model, positions):
    """``sweep_sources(tokens, attention_mask=mask)``: each prompt's mass and effect are those
    of the prompt swept alone (``positions=[-1]`` is each prompt's own last token), in input
    order, with ``"loss"`` and with a per-prompt logit difference; the strings alone give the
    same table."""
    tokens, mask = _padded(model)
    for metric in ("loss", _per_prompt_logit_diff()):
        table = sweep_sources(model, tokens, attention_mask=mask, metric=metric, positions=positions, progress=False)
        for i, prompt in enumerate(_alone(model)):
            own_metric = metric if metric == "loss" else metric.subset(torch.tensor([i]))
            own = sweep_sources(model, prompt, metric=own_metric, positions=positions, progress=False)
            np.testing.assert_allclose(_stack(table.effect_per_prompt)[:, i], own.effect.to_numpy(), atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(_stack(table.mass_per_prompt)[:, i], own.mass.to_numpy(), atol=1e-6)
            np.testing.assert_allclose(table.attrs["metric_clean_per_prompt"][i], own.metric_clean.iloc[0], rtol=1e-5)
        np.testing.assert_allclose(table.effect, _stack(table.effect_per_prompt).mean(1), atol=1e-12)
        from_strings = sweep_sources(model, PROMPTS, metric=metric, positions=positions, progress=False)
        pd.testing.assert_frame_equal(from_strings.drop(columns=["mass_per_prompt", "effect_per_prompt"]),
                                      table.drop(columns=["mass_per_prompt", "effect_per_prompt"]))


def test_the_sweep_spec_path_and_left_padding_agree(model):
    """``run_sweep`` (the :class:`SweepSpec` path) takes the mask too, and a left-padded batch
    with its mask sweeps as the right-padded one."""
    tokens, mask = _padded(model)
    right = sweep_sources(model, tokens, attention_mask=mask, mode="mask", progress=False)
    spec_path = run_sweep(model, tokens, attention_mask=mask, mode="mask", progress=False).table
    np.testing.assert_allclose(_stack(spec_path.effect_per_prompt), _stack(right.effect_per_prompt), atol=1e-6)
    left_tokens, left_mask = model.to_tokens(PROMPTS, padding_side="left", return_attention_mask=True)
    left = sweep_sources(model, left_tokens, attention_mask=left_mask, mode="mask", progress=False)
    np.testing.assert_allclose(_stack(left.effect_per_prompt), _stack(right.effect_per_prompt), atol=1e-6)


# ----------------------------------------------------------------------------- attribution
def test_routing_statistics_of_a_padded_batch_count_real_tokens_only(model):
    tokens, mask = _padded(model)
    stats = routing_statistics(model, tokens, attention_mask=mask)
    own = routing_statistics(model, _alone(model))
    assert stats.n_tokens == sum(len(p) for p in PROMPTS) and stats.n_prompts == len(PROMPTS)
    for frame in ("slices", "routers", "families"):
        pd.testing.assert_frame_equal(getattr(stats, frame), getattr(own, frame), atol=1e-6, rtol=1e-5)


def test_gradients_of_a_padded_batch_are_each_prompts_own_in_input_order(model):
    """Per-prompt estimates in input order (also for strings), each the prompt's own; the means
    are over prompts."""
    tokens, mask = _padded(model)
    metric = _per_prompt_logit_diff()
    for table in (gradient_attribution(model, tokens, metric, attention_mask=mask),
                  gradient_attribution(model, PROMPTS, metric)):
        for i, prompt in enumerate(_alone(model)):
            own = gradient_attribution(model, prompt, metric.subset(torch.tensor([i])))
            for column in ("zero_estimate", "mask_estimate"):
                np.testing.assert_allclose(_stack(table[f"{column}_per_prompt"])[:, i], own[column], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(table.zero_estimate, _stack(table.zero_estimate_per_prompt).mean(1), atol=1e-12)


@pytest.mark.parametrize("method", ["readout", "gradient"])
def test_estimates_of_a_padded_batch_are_each_prompts_own_in_input_order(model, method):
    """Per-prompt estimates and masses in input order, each the prompt's own (``atol`` 1e-4: the
    readout estimate of an unpadded batch of two prompts of one length already differs from
    the prompts alone by up to 5e-5 in float32, on the cumulative model)."""
    tokens, mask = _padded(model)
    table = estimate_effects(model, tokens, method=method, attention_mask=mask)
    for i, prompt in enumerate(_alone(model)):
        own = estimate_effects(model, prompt, method=method)
        np.testing.assert_allclose(_stack(table.estimate_per_prompt)[:, i], own.estimate, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(_stack(table.mass_per_prompt)[:, i], own.mass, atol=1e-6)


@pytest.mark.parametrize("engine", ["batched", "screen"])
def test_mass_vs_effect_of_a_padded_batch_equals_the_prompts_one_by_one(model, engine):
    """``mass_vs_effect(tokens, attention_mask=mask)`` (exact sweep, and the screen that starts
    from the estimator) equals the report of the prompts given one by one, in grouped order
    (the bootstrap resamples prompts in that order), gradients and routing included."""
    tokens, mask = _padded(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mass_vs_effect(model, tokens, attention_mask=mask, n_boot=40, engine=engine,
                                metric=_per_prompt_logit_diff())
        own = mass_vs_effect(model, [_alone(model)[i] for i in ORDER], n_boot=40, engine=engine,
                             metric=_per_prompt_logit_diff().subset(torch.tensor(ORDER)))
    numbers = [c for c in report.table.columns if pd.api.types.is_float_dtype(report.table[c])]
    assert {"mass", "effect"} <= set(numbers)
    pd.testing.assert_frame_equal(report.table[numbers], own.table[numbers], atol=1e-5, rtol=1e-4)
    pd.testing.assert_frame_equal(report.routing.slices, own.routing.slices, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bad masks
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m[:, :-1], "must have the tokens' shape"),
        (lambda m: m * 2, "only 0 (pad) and 1 (real token), got the value 2"),
        (lambda m: torch.cat([m[:1] * 0, m[1:]]), "row 0 is all 0"),
        (lambda m: torch.cat([m[:1], torch.tensor([[1, 0, 1, 1, 1, 1]]), m[2:]]), "row 1 is [1, 0, 1, 1, 1, 1]"),
    ],
    ids=["shape", "value", "all-zero-row", "hole"],
)
def test_a_bad_mask_is_refused_naming_it(kimi, change, message):
    tokens, mask = _padded(kimi)
    bad = change(mask)
    for call in (lambda: sweep_sources(kimi, tokens, attention_mask=bad, progress=False),
                 lambda: routing_statistics(kimi, tokens, attention_mask=bad),
                 lambda: gradient_attribution(kimi, tokens, attention_mask=bad),
                 lambda: estimate_effects(kimi, tokens, attention_mask=bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value)


def test_modes_that_pair_prompts_refuse_prompts_of_several_lengths(kimi):
    tokens, mask = _padded(kimi)
    with pytest.raises(ValueError, match=r"mode 'resample' without reference= .* 3 lengths \(\[2, 3, 6\]\)"):
        sweep_sources(kimi, tokens, attention_mask=mask, mode="resample", progress=False)
    with pytest.raises(TypeError, match="attention_mask= goes with one padded"):
        routing_statistics(kimi, _alone(kimi), attention_mask=torch.ones(1, 2))
