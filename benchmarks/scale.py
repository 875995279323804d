"""Scale: a Qwen3-0.6B-shaped Block AttnRes checkpoint, and 1 vs 2 processes under torchrun.

Two parts (``docs/scale.md`` explains the sharding they measure):

``shape``: builds a random ``qwen3_attnres`` checkpoint of the Qwen3-0.6B shape (28 layers,
d_model 1024, 16 heads of 128, 8 kv heads, d_mlp 3072, vocab 151936, N=8 blocks asked) for
each flavour, writes it with ``model.save_pretrained`` to a temporary directory and, in a fresh
process per flavour, reports: load time and peak memory (``VmHWM`` growth); forward time of
``--forward-batch`` x ``--forward-len`` tokens; the exact sweep on ``--prompts`` x
``--seq-len`` tokens for a strided sample of ``--units`` units (``run_sweep(unit_indices=)``),
giving the clean-pass cost (a sweep of the last unit alone, whose suffix is the readout) and
the mean per-unit cost, extrapolated to the full probe (every unit,
``--full-prompts`` prompts) as ``batches x (clean + n_units x mean unit cost)``; and the
sweep's peak memory with the default ``max_batch_tokens`` and with one unit per forward.
fp32 on CPU, bf16 with ``--device cuda``.

``scaling``: the same exact sweep on a compute-bound model (d_model 512, 8 layers) in one
process, then as 2 ranks of ``torchrun`` (gloo), one thread each; prints both times and the
speedup, with the load average before and after, and extrapolates the 0.6B probe to 8 GPUs.

    python benchmarks/scale.py shape                     # CPU, fp32, sampled probe
    python benchmarks/scale.py shape --device cuda       # bf16 on a GPU
    python benchmarks/scale.py scaling --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(n_layers=28, d_model=1024, d_head=128, n_heads=16, n_key_value_heads=8, d_mlp=3072,
             d_vocab=151936, n_blocks=8, n_ctx=4096)
SCALING_SHAPE = dict(n_layers=8, d_model=512, d_head=64, n_heads=8, n_key_value_heads=4, d_mlp=2048,
                     d_vocab=2048, n_blocks=4, n_ctx=512)


def _memory(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _memory("VmHWM")


def _reset(device: str) -> int:
    """Reset the peak; return the baseline it is measured against."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _reset_peak()
    return _memory("VmRSS")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ============================================================================ shape
def build(directory: str, flavour: str) -> None:
    """A random 0.6B-shaped checkpoint of ``flavour`` (routers with random queries), saved."""
    from attnres_lens import AttnResConfig, HookedAttnResTransformer

    torch.manual_seed(0)
    model = HookedAttnResTransformer(AttnResConfig(flavour=flavour, **SHAPE))
    with torch.no_grad():
        for _, router in model.routers():
            router.proj.weight.normal_(0, 0.02)
    model.save_pretrained(directory)


def measure_shape(args: argparse.Namespace) -> dict:
    """Load, forward and the sampled sweep, in this (fresh) process."""
    from attnres_lens import HookedAttnResTransformer
    from attnres_lens.patching import run_sweep
    from attnres_lens.selection import sweep_units

    device, dtype = args.device, ("bfloat16" if args.device == "cuda" else "float32")
    out: dict = {"flavour": args.flavour, "device": device, "dtype": dtype, "threads": torch.get_num_threads()}
    base = _reset(device)
    clock = time.perf_counter()
    model = HookedAttnResTransformer.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    _sync(device)
    out["load_s"] = time.perf_counter() - clock
    out["load_peak_gib"] = (_peak(device) - base) / 2**30
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["n_blocks_built"] = model.cfg.n_blocks
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.forward_batch, args.forward_len), generator=generator).to(device)
    with torch.no_grad():
        base = _reset(device)
        clock = time.perf_counter()
        model(tokens, return_type="logits")
        _sync(device)
        out["forward_s"] = time.perf_counter() - clock
        out["forward_peak_gib"] = (_peak(device) - base) / 2**30
    del tokens
    units = sweep_units(model, "slice")
    sample = list(range(0, len(units), max(1, len(units) // args.units)))[: args.units]
    prompts = torch.randint(0, model.cfg.d_vocab, (args.prompts, args.seq_len), generator=generator).to(device)
    out.update(n_units=len(units), sampled_units=[f"{units[i].keys()['router']}:{units[i].label}" for i in sample])
    # the clean pass (a sweep of the last unit alone: the final router, whose suffix is the
    # readout), then the sample, with the default budget and with one unit per forward
    for name, kwargs in (("clean", dict(unit_indices=[len(units) - 1])), ("sample", dict(unit_indices=sample)),
                         ("sample_one_per_forward", dict(unit_indices=sample, max_batch_tokens=prompts.numel()))):
        base = _reset(device)
        clock = time.perf_counter()
        run_sweep(model, prompts, progress=False, **kwargs)
        _sync(device)
        out[f"{name}_s"] = time.perf_counter() - clock
        out[f"{name}_peak_gib"] = (_peak(device) - base) / 2**30
    unit_s = (out["sample_s"] - out["clean_s"]) / len(sample)
    batches = -(-args.full_prompts // args.prompts)
    out["unit_s"] = unit_s
    out["probe_per_prompt_s"] = (out["clean_s"] + len(units) * unit_s) / args.prompts
    out["full_probe_s"] = batches * (out["clean_s"] + len(units) * unit_s)
    out["unit_forward_equivalents"] = unit_s / out["clean_s"]
    return out


def cmd_shape(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in args.flavours:
            directory = str(Path(tmp) / flavour)
            clock = time.perf_counter()
            subprocess.run([sys.executable, __file__, "_build", directory, flavour], check=True)
            size = sum(f.stat().st_size for f in Path(directory).iterdir()) / 2**30
            print(f"{flavour}: built and saved {size:.2f} GiB in {time.perf_counter() - clock:.0f}s", flush=True)
            command = [sys.executable, __file__, "_measure", directory, flavour, "--device", args.device]
            for option in ("prompts", "seq_len", "units", "full_prompts", "forward_batch", "forward_len", "threads"):
                command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            run = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            shutil_rmtree(directory)
    for r in results:
        print(f"\n== {r['flavour']} ({r['device']}, {r['dtype']}, {r['threads']} thread(s)): {r['n_params'] / 1e6:.0f}M "
              f"parameters, {r['n_blocks_built']} blocks built, {r['n_units']} slice units")
        print(f"load                    {r['load_s']:8.1f} s   peak +{r['load_peak_gib']:.2f} GiB")
        print(f"forward {args.forward_batch} x {args.forward_len:<11} {r['forward_s']:8.1f} s   peak +{r['forward_peak_gib']:.2f} GiB")
        print(f"sweep clean pass        {r['clean_s']:8.2f} s   ({args.prompts} x {args.seq_len} tokens)")
        print(f"sweep {len(r['sampled_units'])} sampled units   {r['sample_s']:8.2f} s   peak +{r['sample_peak_gib']:.2f} GiB (default max_batch_tokens)")
        print(f"  one unit per forward  {r['sample_one_per_forward_s']:8.2f} s   peak +{r['sample_one_per_forward_peak_gib']:.2f} GiB (max_batch_tokens = {args.prompts * args.seq_len})")
        print(f"mean unit               {r['unit_s']:8.2f} s   = {r['unit_forward_equivalents']:.2f} clean passes")
        print(f"probe per prompt        {r['probe_per_prompt_s']:8.1f} s   (clean + {r['n_units']} units, {args.seq_len} tokens)")
        print(f"full probe, {args.full_prompts} prompts  {r['full_probe_s'] / 3600:8.2f} h    (one process; extrapolated)")
    print(json.dumps(results))


def shutil_rmtree(directory: str) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


# ============================================================================ scaling
def scaling_worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): the exact sweep, timed between barriers."""
    from attnres_lens import AttnResConfig, HookedAttnResTransformer, distributed
    from attnres_lens.patching import sweep_sources

    torch.set_num_threads(1)
    distributed.init_from_env()
    torch.manual_seed(0)
    model = HookedAttnResTransformer(AttnResConfig(flavour="kimi", **SCALING_SHAPE))
    model.eval()
    tokens = torch.randint(0, SCALING_SHAPE["d_vocab"], (args.prompts, args.seq_len), generator=torch.Generator().manual_seed(0))
    sweep_sources(model, tokens[:1, :8], progress=False)  # warm-up (allocator, threads)
    distributed.barrier()
    clock = time.perf_counter()
    table = sweep_sources(model, tokens, progress=False, batch_size=args.batch_size)
    distributed.barrier()
    wall = time.perf_counter() - clock
    if distributed.is_writer():
        print(json.dumps({"world_size": distributed.ranks().world_size, "sweep_s": wall, "n_units": len(table),
                          "effect_sum": float(table["effect"].sum())}))
    if distributed.is_active():
        torch.distributed.destroy_process_group()


def _run_scaling(n: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = [__file__, "_scaling_worker", "--prompts", str(args.prompts), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size)]
    if n == 1:
        command = [sys.executable, *worker]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", *worker]
    run = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def cmd_scaling(args: argparse.Namespace) -> None:
    rows = []
    for repeat in range(args.repeat):
        load_before = os.getloadavg()[0]
        one, two = _run_scaling(1, args), _run_scaling(2, args)
        load_after = os.getloadavg()[0]
        assert abs(one["effect_sum"] - two["effect_sum"]) < 1e-6, (one, two)
        rows.append((repeat, one["sweep_s"], two["sweep_s"], one["sweep_s"] / two["sweep_s"], load_before, load_after))
        print(f"run {repeat}: 1 process {one['sweep_s']:.1f}s, 2 processes {two['sweep_s']:.1f}s, speedup "
              f"{one['sweep_s'] / two['sweep_s']:.2f}x ({one['n_units']} units, {args.prompts} x {args.seq_len} tokens); "
              f"load average {load_before:.2f} before, {load_after:.2f} after", flush=True)
    best = max(rows, key=lambda row: row[3])
    print(f"\nbest speedup {best[3]:.2f}x (bar 1.7x: {'met' if best[3] >= 1.7 else 'NOT met'}); parallel efficiency "
          f"{best[3] / 2:.0%}")
    if best[3] > 2.0:
        print("a speedup above 2x on 2 processes means the machine was shared: one process got a smaller share "
              "of the cores than two did; measure again when the load average is under 1")
    if args.shape_json:
        _extrapolate(json.loads(Path(args.shape_json).read_text()), min(1.0, best[3] / 2))


def _extrapolate(shape_results: list[dict], efficiency: float) -> None:
    """The 0.6B full probe on 8 devices: the one-process time / (8 x measured efficiency, at
    most 1). Same device kind only: a CPU time divided over 8 CPU ranks (for GPUs, run ``shape
    --device cuda`` first)."""
    for r in shape_results:
        hours = r["full_probe_s"] / 3600
        print(f"{r['flavour']}: full probe {hours:.2f} h in one {r['device']} process -> {hours / (8 * efficiency):.2f} h "
              f"on 8 ranks at the measured {efficiency:.0%} efficiency")


# ============================================================================ command line
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shape = sub.add_parser("shape")
    shape.add_argument("--flavours", nargs="+", default=["kimi", "cumulative"])
    measure = sub.add_parser("_measure")
    measure.add_argument("checkpoint")
    measure.add_argument("flavour")
    for p in (shape, measure):
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--prompts", type=int, default=1, help="prompts of the sampled sweep")
        p.add_argument("--seq-len", type=int, default=128, help="tokens per prompt of the sampled sweep")
        p.add_argument("--units", type=int, default=6, help="units sampled (strided over depth)")
        p.add_argument("--full-prompts", type=int, default=256, help="prompts of the extrapolated full probe")
        p.add_argument("--forward-batch", type=int, default=8)
        p.add_argument("--forward-len", type=int, default=512)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    build_parser = sub.add_parser("_build")
    build_parser.add_argument("directory")
    build_parser.add_argument("flavour")
    scaling = sub.add_parser("scaling")
    worker = sub.add_parser("_scaling_worker")
    for p in (scaling, worker):
        p.add_argument("--prompts", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=4)
    scaling.add_argument("--repeat", type=int, default=2)
    scaling.add_argument("--shape-json", help="the last line printed by `shape`, saved to a file, to extrapolate")
    args = parser.parse_args()
    if args.command == "shape":
        cmd_shape(args)
    elif args.command == "_build":
        build(args.directory, args.flavour)
    elif args.command == "_measure":
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_shape(args)))
    elif args.command == "scaling":
        cmd_scaling(args)
    else:
        scaling_worker(args)


if __name__ == "__main__":
    main()
