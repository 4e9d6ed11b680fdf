"""The documentation site builds with ``mkdocs build --strict``: no broken link, no missing page,
no warning from mkdocstrings' API pages or the config-reference hook."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install -r requirements.txt, or the 'docs' extra)")


def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.perf_counter() - start
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    assert (tmp_path / "site" / "index.html").is_file()
    # the config reference is generated from the dataclasses, not written by hand
    training = (tmp_path / "site" / "training" / "index.html").read_text()
    assert "--loss.supcon_temperature" in training and "--data.label_groups" in training
    assert elapsed < 60, f"the docs build took {elapsed:.1f} s"
