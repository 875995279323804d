"""Fault injection for ``tests/test_faults.py``.

- :func:`run_cli`: ``attnres-lens ARGS`` in a fresh interpreter, optionally with a Python-level
  fault injected into one write call (:data:`FAULT_ENV`), or stopped at a pause point.
- Run as a script (``python tests/faults.py ARGS...``) it installs the injector named by
  :data:`FAULT_ENV` and runs the command line: ``tear:torch.save:N`` writes only the first
  half of the N-th ``torch.save`` (``safetensors`` for ``safetensors.torch.save_file``) to its
  file, flushes it to disk and SIGKILLs the process, as a crash in the middle of a write does;
  ``kill:torch.save:N`` SIGKILLs the process as the N-th call starts.
- :func:`tmpfs`: a small tmpfs mounted on a directory (root only), for full disks and mount
  points.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
FAULT_ENV = "ATTNRES_TEST_FAULT"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def env(**extra: str) -> dict[str, str]:
    """The environment of a child run: the package under test first on the path, one thread."""
    root = os.environ.get("ATTNRES_TEST_ROOT", str(HERE.parent))
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + (os.pathsep + path if path else ""), **extra}


def run_cli(*args: str, fault: Optional[str] = None, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    """``attnres-lens ARGS`` in a subprocess (with ``fault`` injected); waits for it."""
    child_env = env(**extra, **({FAULT_ENV: fault} if fault else {}))
    return subprocess.run([sys.executable, str(HERE / "faults.py"), *args], env=child_env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(*args: str, **extra: str) -> subprocess.Popen:
    """``attnres-lens ARGS`` started in a subprocess (stdout piped, one line at a time)."""
    return subprocess.Popen([sys.executable, str(HERE / "faults.py"), *args], env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_python(code: str) -> subprocess.Popen:
    """``python -c CODE`` started in a subprocess (stdout piped)."""
    return subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_line(process: subprocess.Popen, prefix: str, timeout: float = 240) -> str:
    """The first stdout line of ``process`` that starts with ``prefix`` (fails on exit first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before {prefix!r}: {process.stderr.read()[-3000:]}")
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def kill(process: subprocess.Popen) -> None:
    """SIGKILL and reap ``process``."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """Mount a tmpfs of ``size`` (``"2m"``) on ``where`` for the block (root only)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root, with the mount syscall allowed)."""
    if not IS_ROOT:
        return False
    probe = Path(f"/tmp/attnres-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=False)
        return ok
    finally:
        probe.rmdir()


# ============================================================================ the injector
def _install(fault: str) -> None:
    action, target, nth = fault.split(":")
    calls = {"n": 0}

    def die_after(write_half) -> None:
        calls["n"] += 1
        if calls["n"] != int(nth):
            return False
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        write_half()
        os.kill(os.getpid(), signal.SIGKILL)
        return True

    def torn(data: bytes, target) -> None:
        """The first half of ``data`` into ``target`` (a path or a file object), on disk."""
        if hasattr(target, "write"):
            target.write(data[: len(data) // 2])
            target.flush()
        else:
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
        os.sync()

    if target == "torch.save":
        import torch

        original = torch.save

        def save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            if not die_after(lambda: torn(buffer.getvalue(), f)):
                return original(obj, f, *args, **kwargs)

        torch.save = save
    elif target == "safetensors":
        import safetensors.torch as st

        original_file = st.save_file

        def save_file(tensors, filename, metadata=None):
            if not die_after(lambda: torn(st.save(tensors, metadata=metadata), filename)):
                return original_file(tensors, filename, metadata=metadata)

        st.save_file = save_file
    else:
        raise ValueError(f"unknown fault target {target!r}")


if __name__ == "__main__":
    if os.environ.get(FAULT_ENV):
        _install(os.environ[FAULT_ENV])
    from attnres_lens.cli import main

    sys.exit(main(sys.argv[1:]))
