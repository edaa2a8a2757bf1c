"""`scaletrain model-info CONFIG --json`: parameters and FLOPs on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletrain import cli
from scaletrain.config import load_config
from scaletrain.models import build_model, count_parameters
from scaletrain.models.info import model_info

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["model-info", *map(str, argv)])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_mmdit"])
def test_json_output_on_presets(capsys, name):
    rc, out = _run(capsys, PRESETS / f"{name}.yaml", "--json")
    assert rc == 0
    info = json.loads(out)
    cfg = load_config(PRESETS / f"{name}.yaml").model
    assert info["params"] == count_parameters(build_model(cfg, device="meta"))
    assert isinstance(info["params"], int) and isinstance(info["flops_per_sample"], float)
    assert info["flops_per_sample"] > 2 * info["params"]  # every weight is used at least once
    # backward costs about twice the forward (grads of inputs and of weights)
    assert 2.5 < info["train_flops_per_sample"] / info["flops_per_sample"] < 3.5


def _analytic_mmdit_forward_flops(cfg) -> float:
    """Multiply-adds x 2 of every matmul/conv/attention in one forward, batch 1."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    n = (cfg.sample_size // p) ** 2  # image tokens
    t = cfg.text_seq_len
    ff = 2 * d * int(cfg.mlp_ratio * d)  # GELU MLP: D->4D->D
    flops = 2 * n * (c * p * p) * d  # patchify conv
    flops += 2 * t * cfg.joint_attention_dim * d  # context embedder
    flops += 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d)  # y
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        flops += 2 * (6 * d * d) + 2 * ((2 if last else 6) * d * d)  # adaLN, both streams
        flops += 2 * n * (4 * d * d + ff)  # image: q, k, v, out, MLP
        # text stream; the last block's text outputs are discarded, so it projects k, v only
        flops += 2 * t * (2 * d * d if last else 4 * d * d + ff)
        queries = n if last else n + t  # ... and attends with the image queries only
        flops += 2 * 2 * queries * (n + t) * d  # QK^T and AV over the joint sequence
    flops += 2 * (2 * d * d) + 2 * n * d * (p * p * c)  # final AdaLN and projection
    return float(flops)


@pytest.mark.parametrize("preset", ["tiny_mmdit", "mmdit_2b"])
def test_mmdit_flops_equal_the_analytic_count(preset):
    cfg = load_config(PRESETS / f"{preset}.yaml").model
    info = model_info(cfg, with_backward=False)
    assert info["flops_per_sample"] == pytest.approx(_analytic_mmdit_forward_flops(cfg), rel=1e-9)


@pytest.mark.parametrize("name", ["sdxl_unet", "mmdit_8b"])
def test_full_size_presets_are_inspectable_on_meta(capsys, name):
    rc, out = _run(capsys, PRESETS / f"{name}.yaml", "--json", "--no-backward")
    assert rc == 0
    info = json.loads(out)
    expected_params = {"sdxl_unet": 2_567_463_684, "mmdit_8b": 8_056_627_520}[name]
    assert info["params"] == expected_params
    assert info["flops_per_sample"] > 1e12


def test_human_readable_output_overrides_and_dry_run(capsys):
    rc, out = _run(capsys, PRESETS / "tiny_mmdit.yaml", "model.depth=2", "--no-backward")
    assert rc == 0 and "parameters:" in out and '"depth": 2' in out
    rc, out = _run(capsys, PRESETS / "tiny_mmdit.yaml", "--dry-run")
    assert rc == 0 and "arch: mmdit" in out


def test_bad_override_is_a_config_error(capsys):
    rc = cli.main(["model-info", str(PRESETS / "tiny_unet.yaml"), "model.layers_per_block=0"])
    assert rc == 2
    assert "model.layers_per_block" in capsys.readouterr().err


def test_model_and_hardware_flops_share_one_definition(capsys):
    """model FLOPs = 3 x forward (MFU); hardware FLOPs add the forward recomputed under
    gradient checkpointing (HFU); the training loop's Throughput uses the same numbers."""
    from scaletrain.train.monitor.throughput import Throughput

    cfg = load_config(PRESETS / "tiny_mmdit.yaml", ["model.gradient_checkpointing=true"]).model
    info = model_info(cfg, with_backward=False)
    fwd = info["flops_per_sample"]
    assert info["model_flops_per_sample"] == 3 * fwd
    assert info["hardware_flops_per_sample"] == 4 * fwd
    plain = model_info(load_config(PRESETS / "tiny_mmdit.yaml").model, with_backward=False)
    assert plain["hardware_flops_per_sample"] == plain["model_flops_per_sample"] == 3 * fwd
    meter = Throughput(fwd, 1, "cpu", peak_tflops=1e-3,
                       hardware_flops_per_sample=info["hardware_flops_per_sample"])
    meter.step_done(4)
    out = meter.summary()
    assert out["perf/tflops_per_device"] == pytest.approx(
        info["model_flops_per_sample"] * out["perf/samples_per_s"] / 1e12)
    assert out["perf/hfu"] == pytest.approx(out["perf/mfu"] * 4 / 3)
    # A tiny model is printed in GFLOP, not "0.000 TFLOP".
    rc, text = _run(capsys, PRESETS / "tiny_mmdit.yaml", "--no-backward")
    assert rc == 0 and "GFLOP" in text and "0.000 TFLOP" not in text
    assert f"{3 * fwd / 1e9:.3f} GFLOP" in text
