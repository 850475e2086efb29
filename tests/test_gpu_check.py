"""scripts/gpu_check.sh: without an NVIDIA GPU it refuses in one line, exit status 2, and writes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_refuses_cleanly_without_a_gpu(tmp_path):
    # PATH holds only this Python's folder: no nvidia-smi, as on CI (the script needs no other command).
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = tmp_path / "results"
    done = subprocess.run([shutil.which("bash"), str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_check: no NVIDIA GPU (nvidia-smi not found); nothing was run"
    assert not out.exists() and not done.stdout
