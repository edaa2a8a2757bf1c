"""Parameters and FLOPs of a model config (``scaletrain model-info`` prints them).

The model is built on the meta device and one forward (and backward) is traced there with
``torch.utils.flop_counter.FlopCounterMode``, so no memory is allocated: an 8B config can be
inspected on a laptop. FLOPs are per sample at the configured ``model.sample_size`` and
``model.text_seq_len`` (a multiply-add counts 2; attention via SDPA is counted).

Two training counts, one definition everywhere (model-info and the logged MFU/HFU):

* ``model_flops_per_sample`` = 3 x forward: the FLOPs the model needs (the backward costs
  about twice the forward, Kaplan et al. 2020 sec. 2.1); MFU divides by this (PaLM,
  Chowdhery et al. 2022, App. B), so it does not change with memory settings.
* ``hardware_flops_per_sample`` = that plus the forward again when gradient checkpointing
  recomputes it (every block is checkpointed, the small stem and head are counted too, so
  this is a slight upper bound): what the device actually executes; HFU divides by this.
The config may be a full run config or a model preset (a file with a ``model:`` section).
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from scaletrain.models.build import build_model, count_parameters, set_trainable_
from scaletrain.models.config import ModelConfig
from scaletrain.models.inputs import example_inputs


def training_flops(cfg: ModelConfig, forward_flops: float) -> dict[str, float]:
    """{"model_flops_per_sample", "hardware_flops_per_sample"} from the forward count (see the
    module docstring)."""
    model_flops = 3.0 * float(forward_flops)
    recompute = float(forward_flops) if getattr(cfg, "gradient_checkpointing", False) else 0.0
    return {"model_flops_per_sample": model_flops,
            "hardware_flops_per_sample": model_flops + recompute}


def format_flops(flops: float) -> str:
    """TFLOP from 1e12 up, else GFLOP (a tiny model is not "0.000 TFLOP")."""
    if flops >= 1e12:
        return f"{flops / 1e12:.3f} TFLOP"
    return f"{flops / 1e9:.3f} GFLOP"


def model_info(cfg: ModelConfig, with_backward: bool = True) -> dict:
    """{"arch", "params", "trainable_params", "flops_per_sample" (forward),
    "model_flops_per_sample", "hardware_flops_per_sample", ["train_flops_per_sample" (traced
    forward + backward)], ...} on meta. Frozen parameters (``model.trainable``) need no weight gradients, so they
    lower the backward count."""
    model = build_model(cfg, device="meta")
    trainable = set_trainable_(model, cfg.trainable)
    inputs = example_inputs(cfg, batch_size=1, device="meta")
    with FlopCounterMode(display=False) as forward_counter:
        out = model(**inputs)
    info = {
        "arch": cfg.arch,
        "params": count_parameters(model),
        "trainable_params": trainable,
        "flops_per_sample": float(forward_counter.get_total_flops()),
        "sample_size": cfg.sample_size,
        "text_seq_len": cfg.text_seq_len,
    }
    info.update(training_flops(cfg, info["flops_per_sample"]))
    if with_backward:
        with FlopCounterMode(display=False) as backward_counter:
            out.float().sum().backward()
        info["train_flops_per_sample"] = info["flops_per_sample"] + float(
            backward_counter.get_total_flops()
        )
    return info
