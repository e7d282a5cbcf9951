"""Test-wide settings, and the local Slurm cluster the Slurm tests run against."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny tensors: one thread is faster, and two OpenMP threads spinning on a
# 2-core machine shared with another process slow tiny kernels down 50x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SLURM_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm-local.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node Slurm cluster on localhost for the session (scripts/slurm-local.sh):
    installed with apt-get when missing (as root, as in CI), always stopped at the end.
    Yields the environment that points Slurm's commands at it."""
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    state = Path(tempfile.mkdtemp(prefix="awp-slurm-"))
    try:
        up = subprocess.run([str(SLURM_SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf"),
                   PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    finally:
        subprocess.run([str(SLURM_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
