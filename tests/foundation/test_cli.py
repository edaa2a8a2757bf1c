"""The `scaletrain` CLI: every subcommand has --help, and dispatch behaves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scaletrain import cli
from scaletrain.cli.common import add_config_arguments, resolve_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", *args], capture_output=True, text=True
    )


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for sub in cli.SUBCOMMANDS:
        assert sub.name in result.stdout


def test_the_contracted_subcommands_exist():
    names = [s.name for s in cli.SUBCOMMANDS]
    assert names == ["preprocess", "train", "submit", "export", "sample", "model-info", "demo",
                     "eval", "plot"]


@pytest.mark.parametrize("sub", [s.name for s in cli.SUBCOMMANDS])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: scaletrain {sub}" in out


def test_unknown_subcommand_fails_with_a_message(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


def test_no_arguments_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "subcommands:" in capsys.readouterr().out


def test_a_broken_dependency_inside_a_module_is_not_hidden(monkeypatch, tmp_path):
    (tmp_path / "broken_sub.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = cli.Subcommand("broken", "broken_sub", "imports a missing dependency")
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, broken])
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.main(["broken"])


def test_config_errors_exit_2_with_the_key(monkeypatch, tmp_path, capsys):
    import argparse
    import types

    module = types.ModuleType("cfg_sub")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)

    def main(args):
        resolve_config(args)
        return 0

    module.add_arguments, module.main = add_arguments, main
    monkeypatch.setitem(sys.modules, "cfg_sub", module)
    sub = cli.Subcommand("cfgsub", "cfg_sub", "config-driven")
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, sub])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 3\n")
    assert cli.main(["cfgsub", str(cfg), "train.lr=-1"]) == 2
    assert "config error: train.lr: must be > 0" in capsys.readouterr().err
    # --dry-run prints the resolved config, with overrides applied, and nothing else runs.
    assert cli.main(["cfgsub", str(cfg), "--dry-run", "train.lr=0.25"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "lr: 0.25" in out


@pytest.mark.parametrize("argv", [
    ["train", "configs/train/synthetic.yaml", "--run-dir", "s3://bucket/run", "--dry-run"],
    ["export", "RUN", "--out", "s3://bucket/export"],
    ["export", "gs://bucket/run", "--out", "e"],
    ["sample", "--weights", "w", "--prompt", "a cat", "--out", "s3://bucket/samples"],
    ["eval", "RUN", "configs/train/synthetic.yaml", "--out", "foo://x"],
], ids=["train", "export_out", "export_run", "sample", "eval"])
def test_urls_where_a_local_path_is_taken_are_refused(argv, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    argv = [str(repo / a) if a.startswith("configs/") else a for a in argv]
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "URL; this takes a local path only" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" (or anything) created
