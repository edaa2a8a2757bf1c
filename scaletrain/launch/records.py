"""What a run directory remembers about its SLURM jobs.

    run_dir/slurm/jobs.jsonl        one JSON line per event: submitted, started, finished
                                    (completed / preempted / requeued / failed)
    run_dir/slurm/<job_id>/         submitit's pickles and the per-task logs
                                    (<job_id>_<rank>_log.out / .err), plus
        config.yaml                 the resolved config this submission trains
        code.tar.gz                 the package sources the job imports, as submitted
        code.json                   git revision, branch, dirty flag of that checkout
        code.diff                   uncommitted changes against that revision (when dirty)

The log is append-only and written with one ``write`` per line, so the submitting process
and rank 0 of a running job can both append without corrupting it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

# The source trees a job imports, relative to the checkout root, and the files beside them
# that a reader needs to rebuild the environment.
SNAPSHOT_DIRS = ("scaletrain", "configs", "slurm")
SNAPSHOT_FILES = ("pyproject.toml", "Makefile")
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm"


def jobs_log(run_dir: str | Path) -> Path:
    return slurm_dir(run_dir) / "jobs.jsonl"


def append_job_record(run_dir: str | Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event line to run_dir/slurm/jobs.jsonl and return it."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "event": event,
        "host": socket.gethostname(),
        **fields,
    }
    path = jobs_log(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
    return record


def read_job_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of run_dir/slurm/jobs.jsonl, oldest first (missing file: none)."""
    path = jobs_log(run_dir)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc
    return records


def source_root() -> Path:
    """The checkout (or install prefix) holding the scaletrain package."""
    return Path(__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def snapshot_code(dest: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Write code.tar.gz (+ code.json, code.diff) of the sources under ``root`` into ``dest``.

    The tarball holds the working tree as it is (not only what is committed), since that is
    what the job imports; the git revision and diff say how it relates to history.
    """
    root = Path(root) if root is not None else source_root()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / "code.tar.gz"
    count = 0
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in SNAPSHOT_FILES:
            if (root / name).is_file():
                tar.add(root / name, arcname=name)
                count += 1
        for name in SNAPSHOT_DIRS:
            base = root / name
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(root)
                if path.is_file() and not SKIP_PARTS & set(rel.parts) and path.suffix != ".pyc":
                    tar.add(path, arcname=str(rel), recursive=False)
                    count += 1
    rev = _git(root, "rev-parse", "HEAD")
    info: dict[str, Any] = {
        "root": str(root),
        "files": count,
        "tarball": str(tar_path),
        "git_rev": rev.strip() if rev else None,
    }
    if rev:
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        info["git_branch"] = branch.strip() if branch else None
        info["git_dirty"] = bool(status and status.strip())
        if info["git_dirty"]:
            diff = _git(root, "diff", "HEAD") or ""
            (dest / "code.diff").write_text(diff, encoding="utf-8")
    (dest / "code.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
