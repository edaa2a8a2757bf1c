"""scaletrain/models: SDXL-style U-Net, SD3-style MMDiT and a toy MLP, as plain nn.Modules.

Public API::

    model = build_model(cfg)                  # cfg: UNetConfig | MMDiTConfig | ToyConfig
    model = build_model(cfg, device="meta")   # no memory: FLOP counting, deferred init
    materialize_(model, device="cuda", dtype=torch.bfloat16)   # later, module by module
    model.config                              # the config dataclass
    model.set_gradient_checkpointing(True)
    model.blocks()                            # the modules regional compilation compiles
    model.set_diagnostics(True); ...; model.pop_diagnostics() -> dict[str, float]

No torch.distributed, deepspeed or wandb here: the engine wraps the model from outside.
"""

from scaletrain.models.build import build_model, count_parameters, materialize_, set_trainable_
from scaletrain.models.config import MMDiTConfig, ModelConfig, ToyConfig, UNetConfig
from scaletrain.models.mmdit import MMDiT
from scaletrain.models.toy import ToyDenoiser
from scaletrain.models.unet import UNet2DConditionModel

__all__ = [
    "MMDiT",
    "MMDiTConfig",
    "ModelConfig",
    "ToyConfig",
    "ToyDenoiser",
    "UNet2DConditionModel",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "materialize_",
    "set_trainable_",
]
