"""Issue G: SAELens trains and evaluates an SAE on a router hook of a bundled model, no shim.

SAELens requires TransformerLens < 4, so this runs in the TL 3.x environment where ``sae-lens``
is installed, and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is not installed (it needs TransformerLens 3.x: pip install sae-lens)"
)
datasets = pytest.importorskip("datasets", reason="SAELens' activation store reads a datasets.Dataset")

from attnres_lens import bundled  # noqa: E402

HOOK = "blocks.1.mlp_router.hook_out"
CONTEXT = 64
BATCH_TOKENS = 256
STEPS = 200


def test_saelens_trains_and_evaluates_an_sae_on_a_router_hook(tmp_path):
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    torch.manual_seed(0)
    model = bundled.load_attnres()
    tokens = bundled.eval_tokens(model, n_prompts=None, seq_len=CONTEXT)
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, l1_coefficient=1.0),
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=False,
        training_tokens=STEPS * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        n_batches_for_norm_estimate=4,
        lr=3e-3,
        device="cpu",
        n_eval_batches=2,
        eval_batch_size_prompts=4,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=None,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    sae = runner.run()
    metrics, _ = run_evals(
        sae,
        runner.activations_store,
        model,
        ActivationScaler(),
        EvalConfig(
            compute_variance_metrics=True,
            compute_ce_loss=True,
            n_eval_reconstruction_batches=3,
            n_eval_sparsity_variance_batches=3,
            batch_size_prompts=4,
        ),
        exclude_special_tokens=False,
    )
    explained = metrics["reconstruction_quality"]["explained_variance"]
    ce_score = metrics["model_performance_preservation"]["ce_loss_score"]
    print(f"SAELens on {HOOK}: explained variance {explained:.3f}, CE score {ce_score:.3f}")
    assert explained > 0.5
    assert ce_score > 0.0

