"""The `scaletrain` command: a thin dispatcher.

Each subcommand lives in the module that implements it, which provides
``add_arguments(parser)`` and ``main(args) -> int``. This file only knows the names, so the
logic stays importable and testable, and a subcommand whose module is not built yet says so
and exits non-zero instead of pretending to succeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from scaletrain.config_base import ConfigError

NOT_BUILT_EXIT = 3


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    summary: str


SUBCOMMANDS = [
    Subcommand("preprocess", "data_pipeline.preprocess.cli", "encode raw image-caption shards into latent shards"),
    Subcommand("train", "scaletrain.train.cli", "train a model (N local processes, DeepSpeed ZeRO)"),
    Subcommand("submit", "launch.submit", "submit training (or preprocessing) to SLURM via submitit"),
    Subcommand("export", "scaletrain.export", "export EMA or raw weights of a checkpoint"),
    Subcommand("sample", "scaletrain.sample", "sample images from exported weights"),
    Subcommand("model-info", "scaletrain.models.info", "parameter count and FLOPs of a model config"),
    Subcommand("demo", "scaletrain.demo", "the offline end-to-end demo"),
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG plus dotted overrides plus --dry-run, shared by config-driven subcommands."""
    parser.add_argument("config", help="YAML config (presets in configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and exit"
    )


def resolve_config(args: argparse.Namespace):
    """Load args.config with args.overrides; with --dry-run print it and return None."""
    from scaletrain.config import load_config
    from scaletrain.config_base import dump_yaml

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        return None
    return cfg


def _load_module(sub: Subcommand):
    try:
        return importlib.import_module(sub.module)
    except ModuleNotFoundError as exc:
        # Only "this subcommand's own module does not exist" means not built; a missing
        # dependency inside a built module is a real error and must surface.
        if exc.name and sub.module.startswith(exc.name):
            return None
        raise


def _build_parser(sub: Subcommand, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"scaletrain {sub.name}", description=sub.summary)
    if module is None:
        parser.epilog = "This subcommand is not built yet."
    else:
        module.add_arguments(parser)
    return parser


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {s.name:<12} {s.summary}" for s in SUBCOMMANDS]
    return argparse.ArgumentParser(
        prog="scaletrain",
        usage="scaletrain {" + ",".join(s.name for s in SUBCOMMANDS) + "} ...",
        description="Distributed training of text-to-image diffusion models.\n\nsubcommands:\n"
        + "\n".join(lines)
        + "\n\nRun `scaletrain SUBCOMMAND --help` for each one's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {s.name: s for s in SUBCOMMANDS}
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    if argv[0] not in by_name:
        _top_parser().print_usage(sys.stderr)
        print(f"scaletrain: unknown subcommand {argv[0]!r}", file=sys.stderr)
        return 2
    sub = by_name[argv[0]]
    module = _load_module(sub)
    parser = _build_parser(sub, module)
    if module is None:
        parser.parse_known_args(argv[1:])  # honours --help
        print(f"scaletrain {sub.name}: not built yet", file=sys.stderr)
        return NOT_BUILT_EXIT
    # Intermixed parsing lets overrides stand anywhere: `train CFG --run-dir D a.b=1`.
    args = parser.parse_intermixed_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except ConfigError as exc:
        print(f"scaletrain {sub.name}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
