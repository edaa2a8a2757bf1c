"""A run directory is never mixed with another run: checks made before anything starts."""

from __future__ import annotations

import json

import pytest

from scaletrain.config import load_config
from scaletrain.core import run_dir as rd
from scaletrain.core.config_base import ConfigError, dump_yaml
from scaletrain.train.preflight import check_run_dir, describe_world_change
from tests.train.conftest import SYNTHETIC, explain, run_train

FP32 = ["train.bf16=false", "train.max_steps=2", "checkpoint.every=1", "logging.every=1"]


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("preflight") / "run"
    proc = run_train(run_dir, FP32, nproc=1)
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.mark.slow
def test_fresh_start_over_checkpoints_is_refused_or_moves_the_old_run_aside(finished_run):
    before = _snapshot(finished_run)
    proc = run_train(finished_run, [*FP32, "checkpoint.resume=false"], nproc=1)
    assert proc.returncode == 2, explain(proc)
    assert "checkpoint.resume=false would mix the two runs" in proc.stderr
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(finished_run) == before  # nothing written, nothing pruned

    # A different model: refused with the differing key named; config.yaml is not rewritten.
    proc = run_train(finished_run, [*FP32, "train.max_steps=3", "model.width=32"], nproc=1)
    assert proc.returncode == 2, explain(proc)
    assert "model.width 64 -> 32" in proc.stderr
    assert "size mismatch" not in proc.stderr + proc.stdout
    assert _snapshot(finished_run) == before

    # --overwrite renames the old run (every byte kept) and trains a new one in its place.
    proc = run_train(finished_run, [*FP32, "checkpoint.resume=false", "--overwrite"], nproc=1)
    assert proc.returncode == 0, explain(proc)
    moved = [p for p in finished_run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before
    steps = [json.loads(line)["step"]
             for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # The console: one progress line per logged step, the same lines in RUN_DIR/train.log,
    # and a summary that ends with the export command to run next.
    lines = [x for x in proc.stderr.splitlines() if "scaletrain.progress: step " in x]
    assert len(lines) == 2 and "step 2/2 | loss " in lines[1]
    for part in ("samples/s", "MFU", "data wait", "peak mem", "ETA"):
        assert part in lines[1]
    kept = (finished_run / "train.log").read_text()
    assert lines[1].split("scaletrain.progress: ")[1] in kept
    assert f"next: scaletrain export {finished_run} --out" in kept
    assert "done: step 2 (2 steps, 8 samples this job" in proc.stderr


def _fake_run(run_dir, world_size: int, overrides=()):
    ckpt = rd.checkpoints_dir(run_dir) / rd.step_dir_name(10)
    ckpt.mkdir(parents=True)
    cfg = load_config(SYNTHETIC, list(overrides))
    (ckpt / "config.yaml").write_text(dump_yaml(cfg))
    (ckpt / rd.STATE).write_text(json.dumps({"step": 10, "world_size": world_size}))
    (ckpt / rd.MARKER).write_text("")
    return cfg


def test_resume_at_another_world_size_says_old_and_new_global_batch(tmp_path):
    cfg = load_config(SYNTHETIC, [])
    _fake_run(tmp_path, world_size=3)
    line = describe_world_change(cfg, tmp_path, world_size=2, lr=1e-3)
    assert line is not None and "global batch 12 -> 8" in line and "0.001" in line
    assert "\n" not in line
    assert describe_world_change(cfg, tmp_path, world_size=3, lr=1e-3) is None


def test_scale_lr_with_batch_scales_from_the_runs_first_global_batch(tmp_path):
    """train.scale_lr_with_batch (issue 15): train.lr is the LR of the batch the run started
    with; a resume at another world size scales lr and min_lr linearly, also after a chain
    of resumes (state.json's lr_batch), and the warning line says the LR in use."""
    from scaletrain.train.lr import lr_at
    from scaletrain.train.preflight import lr_batch, train_config_in_use

    over = ["train.scale_lr_with_batch=true", "train.lr=1e-3", "train.min_lr=1e-4",
            "train.lr_schedule=cosine", "train.warmup_steps=0"]
    cfg = load_config(SYNTHETIC, over)
    per_rank = cfg.data.batch_size * cfg.train.grad_accum
    assert lr_batch(cfg, tmp_path, 2) == 2 * per_rank  # a fresh run: its own batch
    _fake_run(tmp_path, world_size=3, overrides=over)  # written before lr_batch existed
    reference = lr_batch(cfg, tmp_path, 2)
    assert reference == 3 * per_rank
    train = train_config_in_use(cfg, 2, reference)
    assert train.lr == pytest.approx(1e-3 * 2 / 3) and train.min_lr == pytest.approx(1e-4 * 2 / 3)
    assert lr_at(train, 0) == pytest.approx(1e-3 * 2 / 3)  # the schedule runs on it
    line = describe_world_change(cfg, tmp_path, 2, train.lr, reference)
    assert line is not None and "\n" not in line
    assert f"global batch {3 * per_rank} -> {2 * per_rank}, learning rate 0.000666667" in line
    assert "train.scale_lr_with_batch" in line
    # A later checkpoint of the resumed job records the first job's batch: resuming from it at
    # world size 6 scales from that batch (x2 of the start), not from world size 2's.
    ckpt = rd.checkpoints_dir(tmp_path) / rd.step_dir_name(20)
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(dump_yaml(cfg))
    (ckpt / rd.STATE).write_text(json.dumps({"step": 20, "world_size": 2,
                                             "lr_batch": 3 * per_rank}))
    (ckpt / rd.MARKER).write_text("")
    assert rd.find_latest(tmp_path) == ckpt
    assert train_config_in_use(cfg, 6, lr_batch(cfg, tmp_path, 6)).lr == pytest.approx(2e-3)
    # Off (the default): train.lr as given, and the line says so and how to change it.
    plain = load_config(SYNTHETIC, [])
    assert train_config_in_use(plain, 2, reference) is plain.train
    assert "unchanged" in describe_world_change(plain, tmp_path, 6, plain.train.lr)


def test_model_keys_that_differ_are_all_named_in_one_error(tmp_path):
    _fake_run(tmp_path, world_size=1)
    cfg = load_config(SYNTHETIC, ["model.width=32", "model.depth=2", "model.trainable=x"])
    with pytest.raises(ConfigError) as err:
        check_run_dir(cfg, tmp_path)
    assert "model.depth 4 -> 2" in str(err.value) and "model.width 64 -> 32" in str(err.value)
    assert str(err.value).count("model.") == 2  # trainable may differ on resume


def test_dry_run_checks_the_data_and_the_run_dir_too(tmp_path, capsys):
    from scaletrain.cli import main

    demo = str(SYNTHETIC.parent / "demo.yaml")
    run = tmp_path / "run"
    argv = ["train", demo, "--run-dir", str(run), "--dry-run"]
    assert main([*argv, f"data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path is not a directory of latent shards" in err[0]
    (tmp_path / "empty").mkdir()
    assert main([*argv, f"data.path={tmp_path / 'empty'}"]) == 2
    assert "no dataset index; run `scaletrain preprocess`" in capsys.readouterr().err
    _fake_run(run, world_size=1)
    assert main(["train", str(SYNTHETIC), "--run-dir", str(run), "--dry-run",
                 "checkpoint.resume=false"]) == 2
    assert "would mix the two runs" in capsys.readouterr().err
    assert not run.with_name("run.old").exists() and (run / "checkpoints").is_dir()


@pytest.mark.slow
def test_a_runtime_failure_prints_one_line_and_keeps_the_traceback_in_train_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")  # the first save fails (a real OSError)
    proc = run_train(run, FP32, nproc=1)
    assert proc.returncode == 1, explain(proc)
    assert "Traceback" not in proc.stderr
    assert "(traceback in " in proc.stderr and str(run / "train.log") in proc.stderr
    log_text = (run / "train.log").read_text()
    assert "Traceback (most recent call last)" in log_text and "training failed" in log_text


def test_dry_run_refuses_data_with_no_shard_left_to_train_on(tmp_path, capsys):
    """Too few shards is checked before the start-up (issue 15). What starves is no shard
    to train on (all held out): refused in one line naming the path and the shard count.
    Fewer shards than ranks x workers reads every sample once per epoch (the deal rotates),
    so it is one warning line naming the counts, not a refusal."""
    from scaletrain.cli import main
    from tests.loader.conftest import write_latent_dataset

    data = tmp_path / "latents"
    write_latent_dataset(data, num_shards=2, per_shard=4)
    argv = ["train", str(SYNTHETIC.parent / "demo.yaml"), "--run-dir", str(tmp_path / "run"),
            "--dry-run", "--nproc", "2", f"data.path={data}", "data.num_workers=2"]
    assert main([*argv, "eval.holdout_shards=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"eval.holdout_shards: 2 of the 2 shards in {data} leaves none to train on" in err[0]

    assert main([*argv, "eval.holdout_shards=1"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "reading slots" in x]
    assert len(warned) == 1
    assert f"{data}: 1 shards to train on for 4 reading slots (2 ranks x 2 workers)" in warned[0]
    assert main([*argv, "--nproc", "1", "data.num_workers=1"]) == 0  # 2 shards, 1 slot
    assert "reading slots" not in capsys.readouterr().err
    assert main([*argv, f"eval.data={tmp_path / 'nowhere'}"]) == 2
    assert "eval.data is not a directory of latent shards" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
