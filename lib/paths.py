"""The checkout's root (where Kconfig, defconfigs/ and results/ live): the one project-root constant.

A module of its own, without imports, so that light modules (tracking) need not load
kconfiglib or torch to find it.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
