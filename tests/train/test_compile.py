"""train.compile: which modules are compiled, what stays the same, what is refused.

The runs that execute compiled code (loss against eager, SIGKILL-and-resume) are in
test_real_components.py; these only build models, so they are fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.config import load_config
from scaletrain.core.config_base import ConfigError
from scaletrain.models import build_model
from scaletrain.models.mmdit import JointTransformerBlock
from scaletrain.models.unet import BasicTransformerBlock, ResnetBlock2D
from scaletrain.train.engine import compile_model_

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("preset, kinds", [
    ("tiny_unet.yaml", (ResnetBlock2D, BasicTransformerBlock)),
    ("tiny_mmdit.yaml", (JointTransformerBlock,)),
])
def test_blocks_compiles_each_block_alone_and_keeps_parameter_names(preset, kinds):
    model = build_model(load_config(MODELS / preset).model, device="meta")
    names = list(model.state_dict())
    compile_model_(model, "blocks")
    compiled = [m for m in model.modules() if _compiled(m)]
    assert compiled and all(isinstance(m, kinds) for m in compiled)
    assert len(compiled) == sum(isinstance(m, kinds) for m in model.modules())
    # Checkpoints, EMA fragments and exports key on these names: no "_orig_mod." anywhere.
    assert list(model.state_dict()) == names


def test_model_compiles_the_whole_forward_in_place():
    model = build_model(load_config(MODELS / "tiny_mmdit.yaml").model, device="meta")
    names = list(model.state_dict())
    assert compile_model_(model, "model") is model
    assert [m for m in model.modules() if _compiled(m)] == [model]
    assert list(model.state_dict()) == names


def test_none_compiles_nothing():
    model = build_model(load_config(MODELS / "tiny_mmdit.yaml").model, device="meta")
    compile_model_(model, "none")
    assert not any(_compiled(m) for m in model.modules())


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compile_under_zero3_is_refused_in_one_line(mode):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.compile={mode}", "train.zero_stage=3"])
    message = str(err.value)
    assert "\n" not in message and "train.compile" in message and "zero_stage 3" in message
    load_config(None, [f"train.compile={mode}", "train.zero_stage=2"])  # accepted
