"""Released weights read back (scaletrain.export.sources, scaletrain.models.key_maps): tiny
diffusers models with random weights saved as diffusers and Stability publish them, read one
parameter at a time onto our models. diffusers' own single-file converters are the
independent check of our SDXL and SD3 key maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import save_file

from scaletrain.config import load_config
from scaletrain.export.sources import (
    DIFFUSERS_KIND,
    EXPORT,
    MAX_REPORT_LINES,
    SD3_FILE,
    SDXL_FILE,
    STATE_DICT,
    InitSourceError,
    open_weight_source,
)
from scaletrain.export.writer import export_state_dict
from scaletrain.models import build_model
from scaletrain.models.diffusers_compat import diffusers_config, to_diffusers_state_dict
from scaletrain.models.key_maps import sd3_state_dict, sgm_unet_state_dict
from tests.support.released import diffusers_model, save_pipeline, save_single_file
from tests.support.tiny import tiny_root_config, trained_like

REPO = Path(__file__).resolve().parents[2]
PRESETS = {"unet": "tiny_unet", "mmdit": "tiny_mmdit"}


def preset(arch: str, **changes):
    cfg = load_config(REPO / "configs" / "models" / f"{PRESETS[arch]}.yaml").model
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module", params=["unet", "mmdit"])
def released(request, tmp_path_factory):
    """(arch, diffusers state dict, pipeline folder, single file, single file w/o prefix)."""
    arch = request.param
    cfg = preset(arch)
    root = tmp_path_factory.mktemp(f"released_{arch}")
    model = diffusers_model(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pipeline = save_pipeline(model, cfg, root / "pipeline")
    ours = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}
    single = save_single_file(ours, cfg, root / "single.safetensors")
    bare = save_single_file(ours, cfg, root / "bare.safetensors", prefix=False)
    return arch, state, pipeline, single, bare


def read_all(source) -> dict[str, torch.Tensor]:
    return {name: source.read(name) for name in source.key_map}


def test_every_layout_reads_to_the_same_state_dict(released):
    arch, state, pipeline, single, bare = released
    cfg = preset(arch)
    expected = {n: p.shape for n, p in build_model(cfg, device="meta").named_parameters()}
    layouts = [(pipeline, DIFFUSERS_KIND), (pipeline / ("unet" if arch == "unet" else
                                                         "transformer"), DIFFUSERS_KIND),
               (single, SDXL_FILE if arch == "unet" else SD3_FILE)]
    if arch == "mmdit":  # SD3 transformer-only files come without the prefix too
        layouts.append((bare, SD3_FILE))
    for path, kind in layouts:
        source = open_weight_source(dataclasses.replace(cfg, init_from=str(path)))
        assert source.kind == kind
        assert source.check(strict=True) == []
        assert set(source.key_map) == set(expected)
        got = read_all(source)
        for name, value in got.items():
            assert value.dtype == torch.float32 and value.shape == expected[name]
            assert torch.equal(value, state[name]), (path, name)
        if kind != DIFFUSERS_KIND:  # the VAE and text-encoder tensors are counted, not read
            assert source.counts()["ignored"] == 2
        source.close()


def test_single_file_maps_agree_with_diffusers_converters(released):
    """Our map run backwards writes a single file; diffusers' converter reads it back to
    exactly the diffusers state dict (SD3's stored positional table included)."""
    arch, state, *_ = released
    cfg = preset(arch)
    ours = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}
    if arch == "unet":
        single = sgm_unet_state_dict(ours, cfg)
        converted = convert_ldm_unet_checkpoint(dict(single), diffusers_config(cfg))
    else:
        single = sd3_state_dict(ours, cfg)
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
    assert set(converted) == set(state)
    for name, value in state.items():
        assert torch.equal(converted[name], value), name


def test_rows_of_a_parameter_are_read_alone(released):
    """What a ZeRO-3 rank asks for: any row range, across SD3's fused q/k/v and swapped
    (shift, scale) halves, equals those rows of the whole parameter."""
    arch, _, _, single, _ = released
    source = open_weight_source(preset(arch, init_from=str(single)))
    for name in source.key_map:
        whole = source.read(name)
        rows = whole.shape[0]
        for a, b in [(0, rows // 2), (rows // 2, rows), (1, rows - 1), (0, rows)]:
            if a < b:
                assert torch.equal(source.read(name, a, b), whole[a:b]), (name, a, b)


def test_half_precision_files_upcast_exactly(tmp_path):
    cfg = preset("mmdit")
    model = diffusers_model(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    source = open_weight_source(dataclasses.replace(cfg, init_from=str(tmp_path / "bf16")))
    for name, value in read_all(source).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, model.state_dict()[name].float())


def test_an_export_and_a_bare_state_dict_are_read_by_name(tmp_path):
    cfg = preset("unet")
    state = build_model(cfg).state_dict()
    save_file(state, str(tmp_path / "weights.safetensors"))
    source = open_weight_source(dataclasses.replace(
        cfg, init_from=str(tmp_path / "weights.safetensors")))
    assert source.kind == STATE_DICT and source.check(True) == []
    assert all(torch.equal(source.read(n), state[n]) for n in state)


@pytest.mark.parametrize("layout", ["safetensors", "diffusers"])
def test_our_exports_are_sources_in_either_layout(layout, tmp_path):
    """`scaletrain export` output, with a residual scale that the diffusers layout folds in:
    read onto a model without it (what the folded weights compute), or refused for one with
    it (the scale would apply twice)."""
    run_cfg = tiny_root_config("tiny_mmdit", ["diffusion.objective=flow"])
    run_cfg.model = dataclasses.replace(run_cfg.model, residual_scale=0.5)
    state = trained_like(run_cfg.model).state_dict()
    export_state_dict(state, run_cfg, tmp_path / "out", layout=layout, weights="raw")
    same = dataclasses.replace(run_cfg.model, init_from=str(tmp_path / "out"))
    source = open_weight_source(same)
    assert source.kind == EXPORT and source.details["layout"] == layout
    if layout == "safetensors":
        assert source.check(strict=True) == []
        assert all(torch.equal(source.read(n), state[n]) for n in state)
        return
    with pytest.raises(InitSourceError, match="model.residual_scale"):
        source.check(strict=True)
    unscaled = open_weight_source(dataclasses.replace(same, residual_scale=1.0))
    assert unscaled.check(strict=True) == []
    folded = to_diffusers_state_dict(state, run_cfg.model)
    assert all(torch.equal(unscaled.read(n), folded[n]) for n in state)


def test_mismatched_architecture_is_one_error_of_at_most_20_lines(released):
    arch, _, pipeline, single, _ = released
    if arch == "unet":
        cfg = preset(arch, block_out_channels=[32, 64, 96], qk_norm=True)
        field = "block_out_channels"
    else:
        cfg = preset(arch, depth=3)
        field = "num_layers"
    for path, has_config in ((pipeline, True), (single, False)):
        source = open_weight_source(dataclasses.replace(cfg, init_from=str(path)))
        with pytest.raises(InitSourceError) as err:
            source.check(strict=True)
        text = str(err.value)
        lines = text.splitlines()
        assert len(lines) <= MAX_REPORT_LINES
        assert lines[0].startswith(f"model.init_from: {path} ")
        assert "shape mismatch" in lines[0] and "configs/models/" in lines[-1]
        assert any(line.strip().startswith("shape ") for line in lines)
        assert any(line.strip().startswith(("missing ", "unexpected ")) for line in lines)
        assert (f"config      {field}:" in text) == has_config


def test_init_strict_false_loads_what_fits_and_reports_the_rest(released):
    """New layers (QK-norm weights SDXL / SD3-medium lack) keep their init."""
    arch, state, pipeline, *_ = released
    cfg = preset(arch, qk_norm=arch == "unet")
    if arch == "mmdit":
        cfg = preset(arch, layer_scale_init=1e-3)  # LayerScale gammas: new parameters
    source = open_weight_source(dataclasses.replace(cfg, init_from=str(pipeline)))
    with pytest.raises(InitSourceError, match="missing"):
        source.check(strict=True)
    warnings = source.check(strict=False)
    assert source.missing and all(".norm_" in n or ".ls_" in n for n in source.missing)
    assert any("keep their init" in w for w in warnings)
    assert set(source.key_map) | set(source.missing) == set(
        dict(build_model(cfg, device="meta").named_parameters()))
    assert all(torch.equal(source.read(n), state[n]) for n in source.key_map)


def test_function_changing_options_count_as_config_differences(released):
    arch, _, pipeline, *_ = released
    cfg = (preset(arch, skip_scaling="constant") if arch == "unet"
           else preset(arch, residual_scale=0.5))
    source = open_weight_source(dataclasses.replace(cfg, init_from=str(pipeline)))
    assert source.config_difference is not None
    with pytest.raises(InitSourceError, match="config      model."):
        source.check(strict=True)
    assert any("config differs" in w for w in source.check(strict=False))


def test_sources_that_cannot_be_used_are_refused_in_one_line(tmp_path, released):
    arch, _, pipeline, single, _ = released
    cfg = preset(arch)
    cases = {}
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    cases["model.ckpt"] = "only .safetensors"
    (tmp_path / "empty").mkdir()
    cases["empty"] = "not a weights folder"
    cases["missing-dir/x.safetensors"] = "no such file"
    for name, message in cases.items():
        with pytest.raises(InitSourceError, match=message) as err:
            open_weight_source(dataclasses.replace(cfg, init_from=str(tmp_path / name)))
        assert len(str(err.value).splitlines()) == 1
    other = "mmdit" if arch == "unet" else "unet"
    with pytest.raises(InitSourceError, match=f"model.arch={other}"):
        open_weight_source(preset(other, init_from=str(single)))
    toy = load_config(REPO / "configs" / "train" / "synthetic.yaml").model
    with pytest.raises(InitSourceError, match="no diffusers counterpart"):
        open_weight_source(dataclasses.replace(toy, init_from=str(pipeline)))
    with pytest.raises(InitSourceError, match="init_optimizer: needs a scaletrain run"):
        open_weight_source(dataclasses.replace(cfg, init_from=str(pipeline),
                                               init_optimizer=True))


def test_a_pipeline_without_the_needed_subfolder_names_what_it_has(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({}))
    (tmp_path / "vae").mkdir()
    with pytest.raises(InitSourceError, match=r"without a unet/ folder .*it has: vae"):
        open_weight_source(preset("unet", init_from=str(tmp_path)))


def test_hub_id_offline_fails_with_one_line_naming_the_id():
    """tests/conftest.py sets HF_HUB_OFFLINE=1: the real hub client, no network."""
    repo = "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(InitSourceError) as err:
        open_weight_source(preset("unet", init_from=repo))
    text = str(err.value)
    assert len(text.splitlines()) == 1 and f"'{repo}'" in text and "hub" in text
