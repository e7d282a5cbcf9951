"""Pieces several test files share: a tiny conv net, the CLI in a subprocess, a .config writer."""
import os
import subprocess
import sys

import torch
from torch import nn

from adamwprune.config import kconfig as C
from adamwprune.config.kconfig import ROOT


class Tiny(nn.Module):
    """conv 1->4 (3x3) + linear 64->5, for 6x6 single-channel inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def cli(*args, **kw):
    """`python -m adamwprune ARGS` from the project root, output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "adamwprune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def write_config(directory, overrides, defconfig=None):
    """A full .config in `directory` from the Kconfig defaults plus `overrides`."""
    kconf = C.load_kconfig()
    C.apply_overrides(kconf, overrides)
    path = directory / ".config"
    C.write_config(kconf, path, defconfig=defconfig)
    return path
