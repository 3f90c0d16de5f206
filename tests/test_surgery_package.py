"""Package set-up checks: public names resolve, the core stays free of Lightning, the entry points
and the surgery demo run."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "package", ["lightning_norm", "lightning_norm.callbacks", "lightning_norm.plugins"]
)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert obj is getattr(importlib.import_module(obj.__module__), name), name
    with pytest.raises(AttributeError, match="no attribute"):
        _ = mod.not_a_name


def test_surgery_core_does_not_import_lightning():
    code = (
        "import sys, torch\n"
        "import lightning_norm\n"
        "report = lightning_norm.swap_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(2)), 'lp1')\n"
        "assert len(report) == 1\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_console_script_target_exists():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.slow
def test_surgery_demo_runs():
    out = subprocess.run(
        [
            sys.executable,
            "examples/surgery_demo.py",
            "--steps",
            "5",
            "--targets",
            "batchnorm",
            "lp1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "SwapReport: 4 module(s) -> lp1"
    rows = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.split()[:1] in (["batchnorm"], ["lp1"])
    }
    assert set(rows) == {"batchnorm", "lp1"}
    for first, last, acc in rows.values():
        assert float(first) > 0 and float(last) > 0 and 0 <= float(acc) <= 1
