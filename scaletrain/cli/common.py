"""Arguments shared by the config-driven subcommands: CONFIG, dotted overrides, --dry-run."""

from __future__ import annotations

import argparse
import sys

from scaletrain.config import RootConfig, load_config
from scaletrain.core.config_base import dump_yaml


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG plus dotted overrides plus --dry-run."""
    parser.add_argument("config", help="YAML config (presets in configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and exit"
    )


def resolve_config(args: argparse.Namespace, extra_overrides: list[str] = ()) -> RootConfig | None:
    """Load args.config with args.overrides; with --dry-run print it and return None."""
    cfg = load_config(args.config, [*args.overrides, *extra_overrides])
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        return None
    return cfg
