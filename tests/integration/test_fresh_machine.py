"""The README's quick start on a fresh machine: clone, then `make demo` builds its own venv.

Slow (a new virtual environment and a demo run); `make test-all` runs it. It needs the
package registries (for the project's dependencies) and the datasets
(``EMERG_DATA_DIR``); it skips without the datasets.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_clone_and_make_demo_prints_the_phase_table(tmp_path, data_dir):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("git and make are needed")
    clone = tmp_path / "emerg-stream"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["EMERG_DATA_DIR"] = str(data_dir)
    proc = subprocess.run(
        ["make", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (clone / ".venv" / "bin" / "emerg-stream").exists()
    # the per-phase table of the stream next to the offline one
    assert "| method | AUC cold | AUC A | AUC B | AUC C |" in out, out[-4000:]
    assert "| stream |" in out and "| offline |" in out, out[-4000:]
