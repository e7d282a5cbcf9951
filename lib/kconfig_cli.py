"""Kconfig targets of the Makefile, through kconfiglib.

  python -m adamwprune.kconfig_cli defconfig NAME [--set "SYM=v ..."] [--override K=V]
  python -m adamwprune.kconfig_cli olddefconfig | savedefconfig [OUT] | list
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import (ROOT, ConfigError, apply_overrides, find_defconfig, list_defconfigs, load_file,
                     load_kconfig, parse_set, to_config, write_config)


def defconfig(name: str, overrides: dict[str, str], out: Path) -> None:
    path = find_defconfig(name)
    kconf = load_kconfig()
    load_file(kconf, path, strict=True)
    apply_overrides(kconf, overrides)
    to_config(kconf)  # floats and cross-field checks now, not at run time
    write_config(kconf, out, defconfig=name)
    print(f"configured {out} from {path.relative_to(ROOT)}" +
          (f" with {' '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""))


def olddefconfig(config: Path) -> None:
    kconf = load_kconfig()
    if config.is_file():
        load_file(kconf, config, strict=False)
        for w in kconf.warnings:
            print(f"note: {w}", file=sys.stderr)
    to_config(kconf)
    write_config(kconf, config)
    print(f"updated {config} to the current Kconfig")


def savedefconfig(config: Path, out: Path) -> None:
    kconf = load_kconfig()
    load_file(kconf, config, strict=True)
    tmp = out.with_name(out.name + ".tmp")
    kconf.write_min_config(str(tmp))
    tmp.replace(out)
    print(f"wrote the minimal configuration to {out}")


def describe(path: Path) -> str:
    """The first comment line of a defconfig is its description."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# CONFIG_"):
            return line.lstrip("# ").strip()
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamwprune.kconfig_cli")
    p.add_argument("--config", type=Path, default=Path(".config"))
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("defconfig")
    d.add_argument("name")
    d.add_argument("--set", default="")
    d.add_argument("--override", action="append", default=[])
    sub.add_parser("olddefconfig")
    s = sub.add_parser("savedefconfig")
    s.add_argument("out", nargs="?", type=Path, default=Path("defconfig"))
    sub.add_parser("list")
    args = p.parse_args(argv)
    try:
        if args.cmd == "defconfig":
            pairs = dict(o.split("=", 1) for o in args.override if "=" in o and o.split("=", 1)[1] != "")
            pairs.update(parse_set(args.set))
            defconfig(args.name, pairs, args.config)
        elif args.cmd == "olddefconfig":
            olddefconfig(args.config)
        elif args.cmd == "savedefconfig":
            savedefconfig(args.config, args.out)
        else:
            for path in list_defconfigs():
                print(f"  {path.name:<42} {describe(path)}  [{path.relative_to(ROOT).parent}]")
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
