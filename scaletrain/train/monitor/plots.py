"""PNG plots of a run's ``metrics.jsonl``, for users without wandb (``scaletrain plot``).

One figure per question a user asks of a run: is the loss going down (``loss.png``), where in
the noise schedule is it high (``loss_by_timestep.png``, the ``loss_t/`` buckets), is the job
fast (``throughput.png``: ``perf/`` samples/s, MFU, data wait, peak memory), and is it stable
(``stability.png``: gradient norm, learning rate, skipped steps and the ``diag/`` ratios).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from scaletrain.core.files import atomic_output
from scaletrain.train.monitor.metrics_logger import METRICS_FILE

THROUGHPUT_KEYS = ("perf/samples_per_s", "perf/mfu", "perf/data_wait_frac", "perf/peak_mem_gib")
STABILITY_KEYS = ("grad_norm", "lr", "skipped_steps")


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of every numeric metric; lines that do not parse are skipped (a
    line cut short by a crash), duplicate steps keep their last value (a resumed run)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = row.get("step")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series[key][step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def _figure(panels: list[tuple[str, list[str]]], series, title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    panels = [(name, [k for k in keys if k in series]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=key, linewidth=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7, ncol=2 if len(keys) > 5 else 1)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def write_plots(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the PNGs of ``run_dir``'s metrics into ``out_dir`` (created; must be new or
    empty); returns the files written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics (is {run_dir} a run directory?)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: already holds files; give a new folder")
    series = read_metrics(metrics)
    if not series:
        raise ValueError(f"{metrics}: no metric lines to plot yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_t = sorted(k for k in series if k.startswith("loss_t/"))
    # One panel per kind of diagnostic (diag/skip_ratio/level0, diag/skip_ratio/level1 ...).
    diag: dict[str, list[str]] = defaultdict(list)
    for key in sorted(k for k in series if k.startswith("diag/")):
        diag[key.split("/")[1]].append(key)
    figures = {
        "loss.png": [("loss", ["loss"])],
        "loss_by_timestep.png": [("loss per t bucket", by_t)],
        "throughput.png": [(k.split("/")[-1], [k]) for k in THROUGHPUT_KEYS],
        "stability.png": [*[(k, [k]) for k in STABILITY_KEYS],
                          *[(kind[:30], keys) for kind, keys in diag.items()]],
    }
    written = []
    for name, panels in figures.items():
        if _figure(panels, series, f"{run_dir.name}: {name[:-4]}", out_dir / name):
            written.append(out_dir / name)
    return written
