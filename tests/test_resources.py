"""Memory limits a run meets (issue 22 R 8): the machine, ``ulimit -v`` and the cgroup, each set
for real on a child process, and the refusals of train and probe that name the one they meet."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnres_lens import AttnResConfig, HookedAttnResTransformer
from attnres_lens.resources import available_memory, gib, memory_headrooms
from attnres_lens.sweep_engine import sweep_memory_bytes

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

_REPORT = """
import json
from attnres_lens.resources import available_memory, memory_headrooms
least = available_memory()
print(json.dumps({"least": [least.n_bytes, least.source],
                  "all": [[h.n_bytes, h.source] for h in memory_headrooms()]}))
"""


def _run(code: str, *args: str, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=preexec)


def _address_space_limit(n_bytes: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (n_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))

    return limit


def test_the_machine_is_always_one_of_the_headrooms():
    headrooms = memory_headrooms()
    machine = [h for h in headrooms if "MemAvailable" in h.source]
    assert len(machine) == 1 and 0 < machine[0].n_bytes
    least = available_memory()  # read again: MemAvailable moves with other processes
    assert least.source in {h.source for h in headrooms}
    assert least.n_bytes <= 1.1 * min(h.n_bytes for h in headrooms)


def test_ulimit_v_is_the_headroom_when_it_is_the_tightest():
    """Under a real RLIMIT_AS of 3 GiB (far below this machine's free memory) the headroom is
    that limit less the address space the process already maps, and says so."""
    if available_memory().n_bytes < 4 * GIB:
        pytest.skip("the machine itself has less than 4 GiB free: the address-space limit would not be the tightest")
    proc = _run(_REPORT, preexec=_address_space_limit(3 * GIB))
    assert proc.returncode == 0, proc.stderr
    n_bytes, source = json.loads(proc.stdout)["least"]
    assert source.startswith("RLIMIT_AS (ulimit -v) of 3.0 GiB, of which this process maps")
    assert 2 * GIB < n_bytes < 3 * GIB  # the interpreter maps some, far less than a GiB
    unlimited = json.loads(_run(_REPORT).stdout)["all"]
    assert not any("RLIMIT_AS" in source for _, source in unlimited)


def _memory_cgroup_v1() -> Path:
    """This process's own cgroup v1 memory directory, when this machine lets it make children."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            if os.access(directory, os.W_OK) and (directory / "memory.limit_in_bytes").exists():
                return directory
    pytest.skip("no writable cgroup v1 memory hierarchy here (running as root outside a container that allows it)")


@pytest.fixture
def limited_cgroup():
    """A child memory cgroup limited to 1.5 GiB; processes put in it count against the limit."""
    directory = _memory_cgroup_v1() / f"attnres-lens-test-{os.getpid()}"
    directory.mkdir()
    try:
        (directory / "memory.limit_in_bytes").write_text(str(3 * GIB // 2))
        yield directory
    finally:
        for pid in (directory / "cgroup.procs").read_text().split():  # none should be left
            (directory.parent / "cgroup.procs").write_text(pid)
        directory.rmdir()


def test_the_cgroup_limit_is_the_headroom_when_it_is_the_tightest(limited_cgroup):
    def join() -> None:
        (limited_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = _run(_REPORT, preexec=join)
    assert proc.returncode == 0, proc.stderr
    n_bytes, source = json.loads(proc.stdout)["least"]
    assert source == f"the cgroup limit memory.limit_in_bytes of 1.5 GiB at {limited_cgroup}"
    assert GIB < n_bytes <= 3 * GIB // 2  # the interpreter's own pages are charged to the group


_TRAIN = """
import sys
from attnres_lens.train_config import TrainConfig
from attnres_lens.training import TrainingError, activation_memory_bytes, train
cfg = TrainConfig(n_layers=2, d_model=64, n_heads=4, seq_len=140000, batch_size=1, data=[sys.argv[1]], out_dir=sys.argv[2])
print(activation_memory_bytes(cfg, 259))
try:
    train(cfg, progress=False)
except TrainingError as err:
    print(err)
"""


def test_training_refuses_a_step_that_fits_the_machine_but_not_ulimit_v(tmp_path):
    """A step of about 3 GiB fits this machine but not a 4 GiB address space that torch already
    maps part of: refused before the data is read, naming ulimit -v; without the limit the check
    lets it through to the data (here missing)."""
    if available_memory().n_bytes < 8 * GIB:
        pytest.skip("the machine has less than 8 GiB free")
    missing, out = str(tmp_path / "no-data"), str(tmp_path / "run")
    proc = _run(_TRAIN, missing, out, preexec=_address_space_limit(4 * GIB))
    assert proc.returncode == 0, proc.stderr
    needed, message = proc.stdout.strip().splitlines()
    assert 2 * GIB < int(needed) < 4 * GIB
    assert "a training step needs about" in message and "RLIMIT_AS (ulimit -v) of 4.0 GiB" in message
    assert "no-data" not in message and not Path(out).exists()
    unlimited = _run(_TRAIN, missing, out).stdout.strip().splitlines()[1]
    assert "no-data" in unlimited and "needs about" not in unlimited


_PROBE = """
import resource, sys
import torch, transformers, safetensors, attnres_lens.loading, attnres_lens.model, attnres_lens.protocol
from attnres_lens.cli import main
torch.zeros(1) + 1  # torch's thread pool, whose stacks and arenas are mapped once
mapped = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def test_probe_refuses_sweeps_that_cannot_fit_and_names_the_limit(tmp_path):
    """Sweeps over 32 x 512 tokens of a model with a wide MLP need about 2 GiB (the estimate the
    message states); with 1 GiB of
    address space left after the imports, the probe refuses up front, with the estimate and the
    limit, and writes nothing."""
    torch.manual_seed(0)
    model = HookedAttnResTransformer(
        AttnResConfig(flavour="kimi", n_layers=2, n_blocks=2, d_model=256, d_head=32, d_mlp=4096, n_ctx=512)
    )
    model.save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 600)
    out = tmp_path / "out"
    argv = ["probe", str(tmp_path / "ckpt"), "--text", str(text), "--prompts", "32", "--seq-len", "512",
            "--out", str(out), "--quiet"]
    code = textwrap.dedent(_PROBE)
    proc = _run(code, str(GIB), *argv)
    assert proc.returncode == 1, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    needed = sweep_memory_bytes(model, 32 * 512)
    assert 1.5 * GIB < needed < 3 * GIB
    assert f"the probe's sweeps need about {gib(needed)} (the weights, 32 prompts x 512 tokens" in message
    assert "RLIMIT_AS (ulimit -v)" in message and "--skip-memory-check" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "text.txt"]


def test_a_cpu_run_meets_the_process_limits():
    from attnres_lens.resources import available_memory_on

    assert available_memory_on(torch.device("cpu")).source == available_memory().source
