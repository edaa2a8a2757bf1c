"""Parameters and FLOPs of a model config (``scaletrain model-info`` prints them).

The model is built on the meta device and one forward (and backward) is traced there with
``torch.utils.flop_counter.FlopCounterMode``, so no memory is allocated: an 8B config can be
inspected on a laptop. FLOPs are per sample at the configured ``model.sample_size`` and
``model.text_seq_len`` (a multiply-add counts 2; attention via SDPA is counted).
The config may be a full run config or a model preset (a file with a ``model:`` section).
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from scaletrain.models.build import build_model, count_parameters, set_trainable_
from scaletrain.models.config import ModelConfig
from scaletrain.models.inputs import example_inputs


def model_info(cfg: ModelConfig, with_backward: bool = True) -> dict:
    """{"arch", "params", "trainable_params", "flops_per_sample", ["train_flops_per_sample"],
    ...} on meta. Frozen parameters (``model.trainable``) need no weight gradients, so they
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
    if with_backward:
        with FlopCounterMode(display=False) as backward_counter:
            out.float().sum().backward()
        info["train_flops_per_sample"] = info["flops_per_sample"] + float(
            backward_counter.get_total_flops()
        )
    return info
