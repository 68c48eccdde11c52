"""scripts/gpu_check.sh on a machine without CUDA: exit 77 ("skipped") with one line, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: scripts/gpu_check.sh runs for real")
def test_check_script_without_cuda_exits_77():
    env = {k: v for k, v in os.environ.items() if k != "TTT_PIPE_GPU_DRY_RUN"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env={**env, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 77, result.stdout + result.stderr
    assert result.stdout.strip().count("\n") == 0 and "no CUDA GPU" in result.stdout
