"""The models under real DeepSpeed ZeRO-3 (2 processes, gloo, CPU): built inside zero.Init.

zero.Init partitions each module's parameters right after its constructor, so anything a
parent did to its children's weights afterwards would be lost. This checks that every
parameter (zero-initialised ones included) equals a plain build with the same seed, and that
training steps, checkpointing and diagnostics work on the partitioned model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from scaletrain.config import load_config
    from scaletrain.models import build_model
    from scaletrain.models.inputs import example_inputs

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = int(os.environ["RANK"])
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    overrides = {
        "tiny_unet": ["model.zero_init_residual=true", "model.gradient_checkpointing=true",
                      "model.skip_scaling=log_snr", "model.time_conditioning=scale_shift"],
        "tiny_mmdit": ["model.gradient_checkpointing=true", "model.layer_scale_init=0.01"],
    }
    report = {}
    for name, extra in overrides.items():
        cfg = load_config(f"configs/models/{name}.yaml", extra).model
        torch.manual_seed(0)
        reference = build_model(cfg)
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(cfg, device="cpu")
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            mismatched = [n for (n, p), (_, q) in zip(model.named_parameters(),
                          reference.named_parameters()) if not torch.equal(p.data, q.data)]
        engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                          model_parameters=list(model.parameters()))
        gen = torch.Generator().manual_seed(rank)
        losses = []
        for step in range(3):
            inputs = example_inputs(cfg, batch_size=2, generator=gen)
            first = next(iter(inputs.values()))
            target = torch.randn(first.shape, generator=gen)
            model.set_diagnostics(step == 2)
            loss = (engine(**inputs) - target).square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        diag = model.pop_diagnostics()
        report[name] = {"mismatched": mismatched, "losses": losses, "diag_keys": sorted(diag),
                        "diag_finite": all(v == v and abs(v) < 1e30 for v in diag.values())}
    if rank == 0:
        print("REPORT " + json.dumps(report), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_models_under_zero3_init_and_training(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(REPO),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-4000:] for o in outputs)
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])

    unet, mmdit = report["tiny_unet"], report["tiny_mmdit"]
    for result in (unet, mmdit):
        assert result["mismatched"] == []  # zero-init and LayerScale survive partitioning
        assert all(v == v for v in result["losses"]) and result["diag_finite"]
    assert {"skip_ratio/level0", "skip_grad_ratio/level2", "max_attn_logit"} <= set(unet["diag_keys"])
    assert {"resid_update/block0", "resid_update/block3", "max_attn_logit"} <= set(mmdit["diag_keys"])
