"""`scaletrain plot RUN_DIR`: PNGs from metrics.jsonl, into a fresh folder."""

from __future__ import annotations

import json

from PIL import Image

from scaletrain.cli import main
from scaletrain.train.monitor.plots import read_metrics


def _metrics(run_dir):
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 2.0,
                      "skipped_steps": 0, "perf/samples_per_s": 100.0 + step,
                      "perf/mfu": 0.3, "perf/data_wait_frac": 0.01, "perf/peak_mem_gib": 1.5,
                      f"loss_t/0.{step % 3}-0.{step % 3 + 1}": 0.5,
                      "diag/skip_ratio/level0": 1.1, "diag/skip_ratio/level1": 0.9})
    run_dir.mkdir()
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 21, "loss": 0.0')  # cut by a crash


def test_plot_writes_the_four_pngs_into_a_fresh_folder(tmp_path, capsys):
    run = tmp_path / "run"
    _metrics(run)
    assert read_metrics(run / "metrics.jsonl")["loss"][-1] == (20, 1.0 / 20)
    out = tmp_path / "plots"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss.png", "loss_by_timestep.png", "stability.png", "throughput.png"]
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] >= 600
            assert len(set(img.convert("L").getdata())) > 10  # something drawn
    assert "4 plots in" in capsys.readouterr().out
    # A folder with files is never written into; the default is a new folder in the run.
    assert main(["plot", str(run), "--out", str(out)]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert main(["plot", str(run)]) == 0
    (default,) = (run / "plots").iterdir()
    assert len(list(default.iterdir())) == 4
    assert main(["plot", str(tmp_path / "nothing")]) == 1
