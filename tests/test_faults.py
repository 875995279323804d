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
