"""Export layouts from a state dict (no trainer): diffusers round trip, dtypes, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from scaletrain.export.layout import ExportError, read_metadata
from scaletrain.export.reader import load_export
from scaletrain.export.writer import export_state_dict
from scaletrain.models.inputs import example_inputs
from tests.support.tiny import tiny_root_config, trained_like

DIFFUSERS_CLASSES = {"unet": UNet2DConditionModel, "mmdit": SD3Transformer2DModel}

CASES = {
    "unet": ("tiny_unet", []),
    "unet_adagn": ("tiny_unet", ["model.time_conditioning=scale_shift"]),
    # beta and LayerScale are folded into the output projections; QK-norm maps to rms_norm.
    "mmdit_folded": ("tiny_mmdit", ["model.residual_scale=0.5", "model.layer_scale_init=0.1"]),
    "mmdit": ("tiny_mmdit", ["model.qk_norm=false"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_layout_loads_without_key_mismatch_and_matches_our_outputs(case, tmp_path):
    preset, overrides = CASES[case]
    cfg = tiny_root_config(preset, overrides)
    ours = trained_like(cfg.model)
    result = export_state_dict(ours.state_dict(), cfg, tmp_path / "out", layout="diffusers")
    assert result.files == ["config.json", "diffusion_pytorch_model.safetensors",
                            "scaletrain.json"]

    cls = DIFFUSERS_CLASSES[cfg.model.arch]
    theirs, info = cls.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    theirs.eval()
    inputs = example_inputs(cfg.model, batch_size=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(**inputs)
        b = theirs(**inputs).sample
    assert a.abs().mean() > 0.05  # a real output, not a zero-initialised one
    assert (a - b).abs().max().item() <= 1e-5


def test_safetensors_layout_round_trips_exactly_with_its_config(tmp_path):
    cfg = tiny_root_config("tiny_mmdit", ["diffusion.objective=flow"])
    ours = trained_like(cfg.model)
    provenance = {"run_dir": "/runs/x", "checkpoint": "/runs/x/checkpoints/step_000000007",
                  "step": 7, "world_size": 2, "zero_stage": 3}
    result = export_state_dict(ours.state_dict(), cfg, tmp_path / "out", weights="raw",
                               provenance=provenance)
    assert result.files == ["config.json", "model.safetensors"]
    assert result.num_params == sum(p.numel() for p in ours.parameters())

    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["model"]["arch"] == "mmdit" and meta["model"]["depth"] == cfg.model.depth
    assert meta["diffusion"]["objective"] == "flow"
    assert meta["data"] == {"max_text_tokens": 32}
    assert meta["preprocess"]["image_encoder"]["kind"] == "pixel"
    assert meta["preprocess"]["text_encoder"]["preset"] == "tiny_clip"
    prov = meta["provenance"]
    assert (prov["step"], prov["weights"], prov["dtype"], prov["zero_stage"]) == (7, "raw", "fp32", 3)

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == ours.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in ours.state_dict().items())
    loaded = load_export(tmp_path / "out")
    assert loaded.model_config == cfg.model and loaded.diffusion == cfg.diffusion
    inputs = example_inputs(cfg.model, batch_size=1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # same weights (checked bitwise above); kernels may differ in rounding
        torch.testing.assert_close(loaded.model(**inputs), ours(**inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_bf16_export_stores_bf16_rounded_weights(layout, tmp_path):
    cfg = tiny_root_config("tiny_unet")
    ours = trained_like(cfg.model)
    export_state_dict(ours.state_dict(), cfg, tmp_path / "out", layout=layout, dtype="bf16")
    name = "model.safetensors" if layout == "safetensors" else "diffusion_pytorch_model.safetensors"
    with safe_open(str(tmp_path / "out" / name), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for key, value in ours.state_dict().items():
        assert torch.equal(tensors[key], value.to(torch.bfloat16)), key
    assert read_metadata(tmp_path / "out")["provenance"]["dtype"] == "bf16"
    loaded = load_export(tmp_path / "out", dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "preset, overrides, named",
    [
        ("tiny_unet", ["model.skip_scaling=constant"], "skip_scaling=constant"),
        ("tiny_unet", ["model.skip_variance_preserving=true"], "skip_variance_preserving=true"),
        ("tiny_mmdit", ["model.mlp=swiglu"], "mlp=swiglu"),
        ("tiny_mmdit", ["model.norm=rmsnorm"], "norm=rmsnorm"),
    ],
)
def test_diffusers_export_refuses_options_diffusers_lacks_but_safetensors_works(
    preset, overrides, named, tmp_path
):
    cfg = tiny_root_config(preset, overrides)
    state = trained_like(cfg.model).state_dict()
    with pytest.raises(ExportError, match="cannot export to the diffusers layout") as err:
        export_state_dict(state, cfg, tmp_path / "d", layout="diffusers")
    assert named in str(err.value) and "--format safetensors" in str(err.value)
    assert not (tmp_path / "d").exists()
    export_state_dict(state, cfg, tmp_path / "s", layout="safetensors")
    assert (tmp_path / "s" / "model.safetensors").is_file()


def test_weights_that_do_not_fit_the_config_are_refused_by_name(tmp_path):
    cfg = tiny_root_config("tiny_unet")
    state = dict(trained_like(cfg.model).state_dict())
    del state["conv_in.weight"]
    state["conv_in.extra"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(3)
    with pytest.raises(ExportError) as err:
        export_state_dict(state, cfg, tmp_path / "out")
    msg = str(err.value)
    assert "missing: conv_in.weight" in msg and "unexpected: conv_in.extra" in msg
    assert "conv_out.bias (3,) != (12,)" in msg
    assert not (tmp_path / "out").exists()


def test_an_existing_export_is_replaced_only_with_overwrite(tmp_path):
    cfg = tiny_root_config("tiny_unet")
    state = trained_like(cfg.model).state_dict()
    export_state_dict(state, cfg, tmp_path / "out")
    with pytest.raises(ExportError, match="--overwrite"):
        export_state_dict(state, cfg, tmp_path / "out", dtype="bf16")
    assert read_metadata(tmp_path / "out")["provenance"]["dtype"] == "fp32"
    export_state_dict(state, cfg, tmp_path / "out", dtype="bf16", overwrite=True)
    assert read_metadata(tmp_path / "out")["provenance"]["dtype"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_a_plain_diffusers_model_is_not_mistaken_for_an_export(tmp_path):
    cfg = tiny_root_config("tiny_unet")
    export_state_dict(trained_like(cfg.model).state_dict(), cfg, tmp_path / "d",
                      layout="diffusers")
    (tmp_path / "d" / "scaletrain.json").unlink()
    with pytest.raises(ExportError, match="plain diffusers model"):
        read_metadata(tmp_path / "d")


def test_export_never_writes_into_or_removes_a_run_or_its_input(tmp_path, capsys):
    import json

    from scaletrain.cli import main as scaletrain_main
    from scaletrain.core import run_dir as rd

    run = tmp_path / "runs" / "r1"
    ckpt = rd.checkpoints_dir(run) / rd.step_dir_name(40)
    ckpt.mkdir(parents=True)
    (ckpt / rd.STATE).write_text(json.dumps({"step": 40}))
    (ckpt / rd.MARKER).write_text("")
    (run / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, why in ((run, "overlaps"), (tmp_path / "runs", "overlaps"), (ckpt, "overlaps"),
                     (run / "exports" / "e", "overlaps")):
        code = scaletrain_main(["export", str(run), "--out", str(out), "--overwrite"])
        assert code == 1 and why in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # A folder inside another run is refused too, with or without --overwrite.
    cfg = tiny_root_config("tiny_unet")
    state = trained_like(cfg.model).state_dict()
    with pytest.raises(ExportError, match="inside the run directory"):
        export_state_dict(state, cfg, run / "export")
    # --overwrite replaces an earlier export, never a folder holding other files.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="notes.txt"):
        export_state_dict(state, cfg, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_exported_files_follow_the_umask(layout, tmp_path):
    import os
    import stat

    cfg = tiny_root_config("tiny_unet")
    state = trained_like(cfg.model).state_dict()
    for mask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(mask)
        try:
            out = export_state_dict(state, cfg, tmp_path / f"e{mask:o}", layout=layout).out_dir
        finally:
            os.umask(old)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert modes and set(modes.values()) == {want}, modes
