"""CUDA checks (``pytest -m gpu``): skipped, with the reason, where there is no CUDA device.

What only a GPU can show: NCCL on one rank, bf16 attention on SDPA's flash path, the
latent draw on the device, torch's fused AdamW kernel on CUDA tensors, a DeepSpeed ZeRO-2
step on the GPU, eager and with train.compile=blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def test_nccl_backend_on_one_rank():
    from scaletrain.core.dist_env import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()


def test_bf16_model_attention_runs_on_the_flash_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scaletrain.config import load_config
    from scaletrain.models import build_model
    from scaletrain.models.inputs import example_inputs

    cfg = load_config(PRESETS / "tiny_mmdit.yaml").model
    model = build_model(cfg, device="cpu").to("cuda", torch.bfloat16)
    inputs = example_inputs(cfg, batch_size=2, device="cuda")
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    # Only the flash kernel allowed: an attention call it cannot serve raises.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = model(**inputs)
    with sdpa_kernel([SDPBackend.MATH]):
        math = model(**inputs)
    flash = flash[0] if isinstance(flash, tuple) else flash
    math = math[0] if isinstance(math, tuple) else math
    torch.testing.assert_close(flash.float(), math.float(), rtol=5e-2, atol=5e-2)


def test_latents_are_drawn_on_the_device():
    from scaletrain.diffusion.latents import draw_latents

    g = torch.Generator().manual_seed(0)
    batch = {"latents_mean": torch.randn(2, 4, 16, 16, generator=g).bfloat16().cuda(),
             "latents_std": torch.rand(2, 4, 16, 16, generator=g).bfloat16().cuda(),
             "latent_scaling_factor": 0.13, "latent_shift_factor": 0.1}
    x0 = draw_latents(batch, torch.Generator(device="cuda").manual_seed(5))
    assert x0.device.type == "cuda" and x0.dtype == torch.float32
    eps = torch.randn(x0.shape, generator=torch.Generator(device="cuda").manual_seed(5),
                      device="cuda")
    mean, std = batch["latents_mean"].float(), batch["latents_std"].float()
    torch.testing.assert_close(x0, (mean + std * eps - 0.1) * 0.13)


def test_fused_adamw_on_cuda_matches_the_plain_update():
    from scaletrain.train.config import TrainConfig
    from scaletrain.train.engine import build_optimizer, use_fused_adam

    assert use_fused_adam(torch.device("cuda", 0))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(64, 64, generator=g)
    grads = [torch.randn(64, 64, generator=g) for _ in range(3)]
    out = {}
    for fused in (False, True):
        p = torch.nn.Parameter(init.clone().cuda())
        opt = build_optimizer(cfg, [p], fused=fused)
        for grad in grads:
            p.grad = grad.cuda()
            opt.step()
        out[fused] = p.detach()
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def nccl_device():
    """One NCCL rank for the DeepSpeed tests (kept for the module: DeepSpeed caches its
    process groups, so one group serves every engine built here)."""
    from scaletrain.core.dist_env import dist_env_from_environ
    from scaletrain.train.config import TrainConfig
    from scaletrain.train.engine import init_distributed

    device = init_distributed(TrainConfig(), dist_env_from_environ())
    assert device.type == "cuda" and dist.get_backend() == "nccl"
    yield device
    dist.destroy_process_group()


def _zero2_losses(device, compile_mode: str, steps: int = 4) -> list[float]:
    from scaletrain.config import load_config
    from scaletrain.models.inputs import example_inputs
    from scaletrain.train.engine import build_engine

    cfg = load_config(PRESETS / "tiny_mmdit.yaml", [
        "train.zero_stage=2", "train.bf16=true", "train.lr=1e-3",
        f"train.compile={compile_mode}"])
    engine = build_engine(cfg.train, cfg.model, 2, 1, 0, device)
    # torch's fused AdamW under DeepSpeed's ZeRO-2 wrapper
    assert engine.optimizer.optimizer.defaults["fused"] is True
    g = torch.Generator().manual_seed(0)
    inputs = example_inputs(cfg.model, batch_size=2, device=device, dtype=torch.bfloat16,
                            generator=g)
    target = torch.randn(inputs["hidden_states"].shape, generator=g).to(device)
    losses = []
    for _ in range(steps):
        loss = (engine(**inputs).float() - target).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def test_zero2_step_on_cuda_learns_and_compiled_blocks_follow_eager(nccl_device):
    eager = _zero2_losses(nccl_device, "none")
    assert all(torch.isfinite(torch.tensor(eager))) and eager[-1] < eager[0], eager
    compiled = _zero2_losses(nccl_device, "blocks")
    # Same weights (same seed), same inputs: inductor's kernels round differently in bf16.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=1e-3)
