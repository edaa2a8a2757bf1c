"""MetricsLogger with real wandb in offline mode: JSONL rows, wandb history, resume id."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.train.monitor.config import LoggingConfig
from scaletrain.train.monitor.metrics_logger import (
    METRICS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    resolve_wandb_mode,
)
from tests.support.wandb_records import offline_run_files, read_wandb_file


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_rank0_writes_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = LoggingConfig(run_name="unit", wandb_project="proj")
    image = tmp_path / "grid.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    with MetricsLogger(cfg, tmp_path / "run", rank=0, config_dict={"seed": 3}) as log:
        log.log(10, {"loss": torch.tensor(0.5), "lr": 1e-4, "bad": float("nan")}, samples_seen=80)
        log.log(20, {"loss": np.float32(0.25)}, samples_seen=160)
        log.log_image(20, "validation/samples", image, caption="a cat")
    run_dir = tmp_path / "run"

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [10, 20, 20]
    assert rows[0]["loss"] == 0.5 and rows[0]["samples_seen"] == 80
    assert rows[0]["bad"] is None  # NaN is not JSON
    assert all(isinstance(r["time"], float) for r in rows)
    assert rows[2]["validation/samples"] == "grid.png" or rows[2]["validation/samples"].endswith(
        "grid.png"
    )

    (wandb_file,) = offline_run_files(run_dir)
    record = read_wandb_file(wandb_file)
    assert record["run"]["id"] == (run_dir / WANDB_ID_FILE).read_text().strip()
    assert record["run"]["name"] == "unit" and record["run"]["project"] == "proj"
    assert record["run"]["config"]["seed"] == 3
    by_step = {}
    for row in record["history"]:
        by_step.setdefault(row["_step"], {}).update(row)
    assert by_step[10]["loss"] == 0.5 and by_step[10]["samples_seen"] == 80
    assert by_step[20]["loss"] == 0.25
    assert by_step[20]["validation/samples/_type"] == "image-file"
    assert by_step[20]["validation/samples/caption"] == "a cat"
    media = by_step[20]["validation/samples/path"]
    assert (wandb_file.parent / "files" / media).is_file()


def test_resumed_run_keeps_wandb_id_and_drops_lines_after_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = LoggingConfig()
    with MetricsLogger(cfg, tmp_path, rank=0) as log:
        for step in (10, 20, 30):
            log.log(step, {"loss": 1.0 / step})
    first_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    # The job died after step 30, its last checkpoint was at step 20.
    with MetricsLogger(cfg, tmp_path, rank=0, resume_step=20) as log:
        log.log(30, {"loss": 0.5})
    assert [r["step"] for r in _rows(tmp_path)] == [10, 20, 30]
    assert _rows(tmp_path)[-1]["loss"] == 0.5
    runs = offline_run_files(tmp_path)
    assert len(runs) == 2
    assert {read_wandb_file(p)["run"]["id"] for p in runs} == {first_id}


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricsLogger(LoggingConfig(), tmp_path / "run", rank=1)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_disabled_wandb_still_writes_jsonl(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricsLogger(LoggingConfig(wandb_mode="disabled"), tmp_path, rank=0) as log:
        log.log(1, {"loss": 2.0})
    assert _rows(tmp_path)[0]["loss"] == 2.0
    assert not (tmp_path / "wandb").exists()


def test_wandb_mode_env_wins_and_bad_env_is_named():
    cfg = LoggingConfig(wandb_mode="online")
    assert resolve_wandb_mode(cfg, {}) == "online"
    assert resolve_wandb_mode(cfg, {"WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(cfg, {"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_wandb_mode(cfg, {"WANDB_MODE": "sometimes"})


def test_non_scalar_metric_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLogger(LoggingConfig(), tmp_path, rank=0) as log:
        with pytest.raises(TypeError, match="not a scalar"):
            log.log(1, {"x": [1, 2]})


def test_an_inherited_wandb_service_is_not_reused(tmp_path, monkeypatch):
    """A run must start its own wandb service: one inherited from a parent process may hold
    this run's id for a SIGKILLed predecessor ("run ID is in use") or be gone."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SERVICE", "left-behind-by-a-parent-process")
    with MetricsLogger(LoggingConfig(), tmp_path, rank=0) as log:
        log.log(1, {"loss": 1.0})
    assert [r["step"] for r in _rows(tmp_path)] == [1]
    assert len(offline_run_files(tmp_path)) == 1


def test_wandb_is_quiet_at_the_end_of_a_run(tmp_path):
    """No wandb history/summary tables on the console when a run ends (issue 15: quiet by
    default); where the offline run is kept is still said. SCALETRAIN_SHOW_WARNINGS=1 brings
    the tables back."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "from scaletrain.train.monitor.metrics_logger import MetricsLogger\n"
        "from scaletrain.train.monitor.config import LoggingConfig\n"
        "import sys\n"
        "with MetricsLogger(LoggingConfig(wandb_mode='offline'), sys.argv[1], rank=0) as log:\n"
        "    for step in range(1, 4):\n"
        "        log.log(step, {'loss': 1.0 / step})\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET")}
    env.update(PYTHONPATH=str(repo), WANDB_MODE="offline")
    outputs = {}
    for show in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / show)],
                              env={**env, "SCALETRAIN_SHOW_WARNINGS": show},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[show] = proc.stdout + proc.stderr
    assert "Run history" in outputs["1"]  # what quiet removes exists
    assert "Run history" not in outputs["0"] and "Run summary" not in outputs["0"]
    assert "offline-run" in outputs["0"]
