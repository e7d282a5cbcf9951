"""AdamWPrune's GPU fast path against its plain path (checks in tests/gpu_checks.py).

On a machine with CUDA the checks run on the GPU; without one they run in a
subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before
Triton compiles anything), on the CPU, through the same kernels and host code.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_checks
from adamwprune.optim import gpu_kernels

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not gpu_kernels.available(),
                                reason=f"{gpu_kernels.unavailable_reason()}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", gpu_checks.CHECKS, ids=lambda c: c.__name__)
def test_on_cuda(check):
    check("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_on_cuda runs them")
def test_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "gpu_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(gpu_checks.CHECKS), proc.stdout
