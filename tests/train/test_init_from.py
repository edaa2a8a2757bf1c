"""Starting runs from released weights (model.init_from), with real DeepSpeed over CPU ranks.

Tiny diffusers models with random weights stand in for SDXL and SD3: a U-Net saved as a
pipeline folder (sharded), an SD3 transformer as a model folder. Runs take one step at a
negligible learning rate ("no optimizer progress"), so what they save is what they loaded:

* the fp32 master weights, read back with `scaletrain export --weights raw --dtype fp32`,
  are the source's values bit for bit although the runs train in bf16 (DeepSpeed alone
  would build the masters from the bf16 module and round them);
* our model with those weights gives diffusers' output on the same inputs;
* the first step's loss, recomputed here from the source weights, is the one logged: the
  working (bf16, partitioned under ZeRO-3) weights of the first forward were the source's.

Then the MMDiT run is continued on other data, one rank and another ZeRO stage, with its
Adam moments; and the U-Net run is fine-tuned with only its attention trainable.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scaletrain.cli import main as scaletrain_main
from scaletrain.config import load_config
from scaletrain.data.loader import build_train_loader
from scaletrain.diffusion import build_objective
from scaletrain.diffusion.conditioning import cast_inputs, make_model_fn
from scaletrain.export.consolidate import convert_to_universal, model_states
from scaletrain.models import build_model
from scaletrain.models.inputs import example_inputs
from scaletrain.train.loop import step_seed
from tests.support.latent_shards import write_shards
from tests.support.released import diffusers_model, save_pipeline

from .conftest import REPO, explain, run_train, train_command, train_env

pytestmark = pytest.mark.slow

MODELS = REPO / "configs" / "models"
NO_PROGRESS = ["train.lr=1e-30", "train.weight_decay=0", "train.max_steps=1"]


def common(data: Path) -> list[str]:
    return [f"data.path={data}", "data.batch_size=2", "data.num_workers=0",
            "data.max_text_tokens=16", "checkpoint.every=1", "checkpoint.keep_last=5",
            "logging.every=1", "logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init_data")
    return {"a": write_shards(root / "a", seed=0), "b": write_shards(root / "b", seed=1)}


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """arch -> (init_from path, the diffusers model it holds)."""
    root = tmp_path_factory.mktemp("released")
    unet_cfg = load_config(MODELS / "tiny_unet.yaml").model
    unet = diffusers_model(unet_cfg, seed=1)
    mmdit_cfg = load_config(MODELS / "tiny_mmdit.yaml").model
    mmdit = diffusers_model(mmdit_cfg, seed=2)
    mmdit.save_pretrained(root / "sd3_transformer")
    return {"unet": (save_pipeline(unet, unet_cfg, root / "sdxl_pipeline"), unet),
            "mmdit": (root / "sd3_transformer", mmdit)}


RUNS = {  # arch -> (preset, ZeRO stage, extra overrides)
    "unet": ("tiny_unet", 2, []),
    "mmdit": ("tiny_mmdit", 3, ["diffusion.objective=flow"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, released) -> dict[str, Path]:
    """One 2-rank bf16 step from each released model: U-Net under ZeRO-2, MMDiT ZeRO-3."""
    out = {}
    for arch, (preset, stage, extra) in RUNS.items():
        run_dir = tmp_path_factory.mktemp(f"init_{arch}")
        proc = run_train(run_dir, [*common(data["a"]), *NO_PROGRESS, *extra,
                                   f"train.zero_stage={stage}", "train.bf16=true",
                                   f"model.init_from={released[arch][0]}"],
                         config=MODELS / f"{preset}.yaml")
        assert proc.returncode == 0, explain(proc)
        assert "initialised" in proc.stderr and "model.init_from" not in proc.stdout
        out[arch] = run_dir
    return out


def export(run_dir: Path, out: Path, weights: str = "raw") -> dict[str, torch.Tensor]:
    code = scaletrain_main(["export", str(run_dir), "--weights", weights, "--dtype", "fp32",
                            "--out", str(out), "--log-level", "WARNING"])
    assert code == 0
    return load_file(str(out / "model.safetensors"))


def first_step_loss(run_dir: Path, weights: dict[str, torch.Tensor]) -> float:
    """The loss training logs at step 1, recomputed from ``weights``: each rank's first
    batch, noise and timesteps (seeded as the loop seeds them), averaged over the ranks."""
    cfg = load_config(run_dir / "config.yaml")
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    model_fn = cast_inputs(make_model_fn(model.to(dtype), cfg.model.arch), dtype)
    losses = []
    for rank in range(2):
        loader = build_train_loader(cfg.data, rank, 2, cfg.seed)
        objective = build_objective(cfg.diffusion, null_cond=loader.empty_conditioning())
        batch = next(iter(loader))
        generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, 0, 0))
        with torch.no_grad():
            per_sample, _ = objective(model_fn, batch, generator)
        losses.append(float(per_sample.float().mean()))
        loader.close()
    return sum(losses) / len(losses)


def logged(run_dir: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == step and "loss" in r)


@pytest.mark.parametrize("arch", list(RUNS))
def test_released_weights_reach_the_masters_bit_for_bit_and_match_diffusers(
        arch, runs, released, tmp_path):
    run_dir, (source, reference) = runs[arch], released[arch]
    expected = {k: v for k, v in reference.state_dict().items() if k != "pos_embed.pos_embed"}
    raw, ema = export(run_dir, tmp_path / "raw"), export(run_dir, tmp_path / "ema", "ema")
    for name, value in expected.items():  # fp32 source -> fp32 masters (and EMA), exactly
        assert torch.equal(raw[name], value), name
        assert torch.equal(ema[name], value), name

    cfg = load_config(run_dir / "config.yaml").model
    ours = build_model(cfg).eval()
    ours.load_state_dict(raw)
    inputs = example_inputs(cfg, batch_size=2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), reference(**inputs).sample,
                                   atol=1e-5, rtol=1e-5)

    # The first forward ran on the source's weights (bf16 working copy), not the random init.
    random_init = build_model(cfg).state_dict()
    got, want = logged(run_dir, 1)["loss"], first_step_loss(run_dir, expected)
    assert got == pytest.approx(want, rel=2e-3)
    assert abs(got - first_step_loss(run_dir, random_init)) > 20 * abs(got - want)

    # Provenance: the run's config.yaml and the export's metadata name the files read.
    record = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_record"]
    assert record["kind"] == "diffusers" and record["from"] == str(source)
    assert record["keys"]["loaded"] == len(expected) and record["keys"]["missing"] == 0
    weight_files = sorted(Path(source).rglob("*.safetensors"))
    assert len(weight_files) > (1 if arch == "unet" else 0)  # the pipeline is sharded
    assert {f["path"]: f["sha256"] for f in record["files"]} == {
        str(f.resolve()): hashlib.sha256(f.read_bytes()).hexdigest() for f in weight_files}
    meta = json.loads((tmp_path / "raw" / "config.json").read_text())
    assert meta["model"]["init_record"] == record


def test_continue_on_new_data_at_another_world_size_and_stage_with_adam_moments(
        runs, data, tmp_path):
    """The ZeRO-3, 2-rank MMDiT run continued on other data by 1 rank under ZeRO-2, with
    model.init_optimizer and init_keep_step. A clipped-to-nothing gradient makes the first
    Adam update m1 = beta1 m0 + (1 - beta1) g ~= beta1 m0, so the moments seen after it
    are the carried ones, re-sliced for the new layout."""
    source = runs["mmdit"]
    run_dir = tmp_path / "continued"
    proc = run_train(run_dir, [*common(data["b"]), "diffusion.objective=flow",
                               "train.zero_stage=2", "train.bf16=false", "train.lr=1e-30",
                               "train.weight_decay=0", "train.grad_clip=1e-30",
                               "train.betas=[0.9,0.999]", "train.max_steps=2",
                               f"model.init_from={source}", "model.init_optimizer=true",
                               "model.init_keep_step=true"],
                     nproc=1, config=MODELS / "tiny_mmdit.yaml")
    assert proc.returncode == 0, explain(proc)
    state = json.loads((run_dir / "checkpoints" / "step_000000002" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 1 and state["zero_stage"] == 2
    assert state["ema_updates"] == 2  # the source's EMA continued (a fresh one would be 1)
    assert not (run_dir / "init").exists()  # the scratch conversion is removed

    before = convert_to_universal(source / "checkpoints" / "step_000000001" / "ds",
                                  tmp_path / "u_before")
    after = convert_to_universal(run_dir / "checkpoints" / "step_000000002" / "ds",
                                 tmp_path / "u_after")

    def moment(root: Path, name: str, key: str) -> torch.Tensor:
        value = torch.load(root / "zero" / name / f"{key}.pt", weights_only=False)
        return (value["param"] if isinstance(value, dict) else value).reshape(-1)

    for name in ("context_embedder.weight", "transformer_blocks.1.attn.to_q.weight",
                 "norm_out.linear.bias"):
        m0, m1 = moment(before, name, "exp_avg"), moment(after, name, "exp_avg")
        v0, v1 = moment(before, name, "exp_avg_sq"), moment(after, name, "exp_avg_sq")
        assert m0.abs().max() > 0
        torch.testing.assert_close(m1, 0.9 * m0, rtol=1e-5, atol=1e-6 * float(m0.abs().max()))
        torch.testing.assert_close(v1, 0.999 * v0, rtol=1e-5, atol=0)
    step = torch.load(after / "zero" / "context_embedder.weight" / "step.pt", weights_only=False)
    assert int(step) == 2  # Adam's own step count carried on (bias correction)
    # The master weights came over at the new layout too (negligible LR: unchanged).
    src_raw, new_raw = export(source, tmp_path / "src_raw"), export(run_dir, tmp_path / "new_raw")
    assert all(torch.equal(src_raw[k], new_raw[k]) for k in src_raw)


def test_trainable_freezes_what_it_says(runs, data, tmp_path):
    """Only the U-Net's attention trains (ZeRO-1, 2 ranks, starting from the U-Net run's
    raw weights): frozen weights stay bit-identical, and hold no optimizer state or EMA."""
    source = runs["unet"]
    run_dir = tmp_path / "attention_only"
    proc = run_train(run_dir, [*common(data["b"]), "train.zero_stage=1", "train.bf16=false",
                               "train.lr=1e-2", "train.max_steps=2", f"model.init_from={source}",
                               "model.trainable=attentions"],
                     config=MODELS / "tiny_unet.yaml")
    assert proc.returncode == 0, explain(proc)
    start = export(source, tmp_path / "start")
    trained, ema = export(run_dir, tmp_path / "raw"), export(run_dir, tmp_path / "ema", "ema")
    frozen = [k for k in start if "attentions" not in k]
    trainable = [k for k in start if "attentions" in k]
    assert frozen and trainable
    assert all(torch.equal(trained[k], start[k]) and torch.equal(ema[k], start[k])
               for k in frozen)
    assert all(not torch.equal(trained[k], start[k]) for k in trainable)
    count = sum(start[k].numel() for k in trainable)
    assert f"training {count} of {sum(v.numel() for v in start.values())} parameters" in (
        proc.stderr)
    # Optimizer state only for the trainable ones: their names, their element count.
    ckpt = run_dir / "checkpoints" / "step_000000002"
    assert {n for g in model_states(ckpt)[0]["param_shapes"] for n in g} == set(trainable)
    held = 0
    for path in sorted((ckpt / "ds").glob("*optim_states.pt")):
        inner = torch.load(path, weights_only=False)["optimizer_state_dict"]
        held += sum(v["exp_avg"].numel() for v in inner["base_optimizer_state"]["state"].values())
    assert count <= held <= count + 64  # + DeepSpeed's alignment padding
    ema_elements = sum(t.numel() for p in sorted((ckpt / "ema").glob("rank_*.pt"))
                       for t in torch.load(p, weights_only=True)["tensors"])
    assert ema_elements == count
    assert (ckpt.parent / "step_000000001").is_dir()  # the step count restarted at 0


def test_a_source_that_does_not_fit_stops_before_any_rank_starts(released, tmp_path):
    """Exit status 2, one error (no traceback) naming keys and shapes; nothing written."""
    run_dir = tmp_path / "never"
    for init_from, overrides, expect in [
        (released["unet"][0], ["model.block_out_channels=[32,64,96]"], "shape mismatch"),
        ("stabilityai/stable-diffusion-xl-base-1.0", [], "Hugging Face hub"),
    ]:
        proc = subprocess.run(
            train_command(run_dir, ["data.synthetic.enabled=true", *overrides,
                                    f"model.init_from={init_from}"],
                          config=MODELS / "tiny_unet.yaml"),
            env={**train_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
            timeout=300, cwd=REPO)
        assert proc.returncode == 2, explain(proc)
        assert "Traceback" not in proc.stderr + proc.stdout
        errors = [line for line in proc.stderr.splitlines() if "config error" in line]
        assert len(errors) == 1 and expect in errors[0] and str(init_from) in errors[0]
        assert len(proc.stderr.strip().splitlines()) <= 20
        assert not run_dir.exists()
