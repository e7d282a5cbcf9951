"""Test-wide settings."""
import os

import torch

# Tiny tensors: one thread is faster, and two OpenMP threads spinning on a
# 2-core machine shared with another process slow tiny kernels down 50x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
