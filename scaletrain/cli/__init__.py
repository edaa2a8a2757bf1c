"""The `scaletrain` command: a thin dispatcher over one module per subcommand.

Each module of this package provides ``add_arguments(parser)`` and ``main(args) -> int``, and
is the only place that parses arguments or prints for its subcommand. Nothing in the library
imports this package.

The dispatcher imports only the module of the subcommand it runs (by name, below): `scaletrain
--help` then answers in well under a second instead of importing torch, DeepSpeed and the
encoders of every subcommand (about 6 s on a 2-core machine).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from scaletrain.core.config_base import ConfigError
from scaletrain.core.log import quiet_dependency_output
from scaletrain.core.signals import install_early_handlers


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    summary: str


SUBCOMMANDS = [
    Subcommand("preprocess", "scaletrain.cli.preprocess",
               "encode raw image-caption shards into latent shards"),
    Subcommand("train", "scaletrain.cli.train", "train a model (N local processes, DeepSpeed ZeRO)"),
    Subcommand("submit", "scaletrain.cli.submit",
               "submit training (or preprocessing) to SLURM via submitit"),
    Subcommand("export", "scaletrain.cli.export", "export EMA or raw weights of a checkpoint"),
    Subcommand("sample", "scaletrain.cli.sample", "sample images from exported weights"),
    Subcommand("model-info", "scaletrain.cli.model_info",
               "parameter count and FLOPs of a model config"),
    Subcommand("demo", "scaletrain.cli.demo", "the offline end-to-end demo"),
    Subcommand("eval", "scaletrain.cli.eval",
               "validation loss, FID and CLIP score of weights; FID of two image sets"),
    Subcommand("plot", "scaletrain.cli.plot",
               "PNG plots of a run's metrics.jsonl (loss, throughput, stability)"),
]


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


# Options that name a local file or folder in every subcommand that has them; a URL there
# would be taken as a relative path (``s3://b/x`` -> a folder named ``s3:``). Options that
# may be URLs (preprocess --input/--output, data.path) are checked where they are read.
_LOCAL_PATH_OPTIONS = {"config": "CONFIG", "run_dir": "--run-dir", "out": "--out",
                       "weights": "--weights", "prompts": "--prompts", "encoders": "--encoders",
                       "inception": "--inception"}


def _check_local_paths(args: argparse.Namespace) -> None:
    from scaletrain.data.storage import check_local  # not at import: keeps --help fast

    for dest, flag in _LOCAL_PATH_OPTIONS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not (dest == "weights" and value in ("ema", "raw")):
            check_local(value, flag)


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
    # Before the subcommand's imports bring in the hub libraries (which read it once).
    quiet_dependency_output()
    if sub.name == "train":
        # Before the slow imports: a stop signal during start-up must end in a checkpoint
        # and the requeue status, not in death by signal.
        install_early_handlers()
    module = importlib.import_module(sub.module)
    parser = argparse.ArgumentParser(prog=f"scaletrain {sub.name}", description=sub.summary)
    module.add_arguments(parser)
    # Intermixed parsing lets overrides stand anywhere: `train CFG --run-dir D a.b=1`.
    args = parser.parse_intermixed_args(argv[1:])
    try:
        _check_local_paths(args)
        return int(module.main(args) or 0)
    except ConfigError as exc:
        print(f"scaletrain {sub.name}: config error: {exc}", file=sys.stderr)
        return 2
