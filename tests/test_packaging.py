"""What a colleague installs: the wheel's license and metadata, and a description that reads
well on a package index (issue K 14, 15)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    source = build / "source"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT / "attnres_lens", source / "attnres_lens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "DESCRIPTION.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, cwd=build,
        env={"PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(build)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("attnres_lens-*.whl")
    return path


def test_the_wheel_carries_the_mit_license_and_its_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert license_files, names
        assert archive.read(license_files[0]).decode() == (ROOT / "LICENSE").read_text()
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Author"] or metadata["Author-email"]
    classifiers = metadata.get_all("Classifier")
    assert "Intended Audience :: Science/Research" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression says it
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL"))
    assert urls["Block AttnRes paper"] == "https://arxiv.org/abs/2603.15031"
    assert urls["Mass vs. effect study"] == "https://arxiv.org/abs/2606.13168"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (ROOT / "DESCRIPTION.md").read_text().strip()


def test_the_long_description_reads_well_anywhere():
    text = (ROOT / "DESCRIPTION.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert all(t.startswith(("https://", "http://")) for t in targets), targets  # no repository paths
    for phrase in ("these machines", "this machine"):
        assert phrase not in text and phrase not in (ROOT / "README.md").read_text()
