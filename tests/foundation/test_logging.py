"""Rank-aware logging: rank 0 logs INFO; other ranks only warnings unless asked."""

import logging

import pytest

from scaletrain.core.log import env_rank, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_rank_zero_logs_info_other_ranks_warn_only(monkeypatch):
    monkeypatch.delenv("SCALETRAIN_LOG_ALL_RANKS", raising=False)
    setup_logging("INFO", rank=0)
    assert logging.getLogger().level == logging.INFO
    setup_logging("INFO", rank=3)
    assert logging.getLogger().level == logging.WARNING
    setup_logging("INFO", rank=3, all_ranks=True)
    assert logging.getLogger().level == logging.INFO
    monkeypatch.setenv("SCALETRAIN_LOG_ALL_RANKS", "1")
    setup_logging("DEBUG", rank=2)
    assert logging.getLogger().level == logging.DEBUG


def test_records_carry_the_rank(capsys):
    setup_logging("INFO", rank=0)
    logging.getLogger("scaletrain.test").info("hello")
    assert "[rank 0] scaletrain.test: hello" in capsys.readouterr().err


def test_env_rank_reads_torchrun_then_slurm(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert env_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "4")
    assert env_rank() == 4
    monkeypatch.setenv("RANK", "2")
    assert env_rank() == 2


def test_dependency_deprecation_warnings_are_quiet_ours_are_not(monkeypatch):
    import warnings

    from scaletrain.core.log import setup_logging

    monkeypatch.delenv("SCALETRAIN_SHOW_WARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        setup_logging("INFO", rank=0)
        for module, category in (("diffusers.models.x", FutureWarning),
                                 ("deepspeed.runtime", DeprecationWarning),
                                 ("scaletrain.train.loop", DeprecationWarning)):
            warnings.warn_explicit("old api", category, f"{module}.py", 1, module=module)
    assert [w.filename for w in seen] == ["scaletrain.train.loop.py"]
