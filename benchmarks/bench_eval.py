"""The cost of one evaluation against training, on this CPU with the demo's tiny models.

    PYTHONPATH=. python benchmarks/bench_eval.py [--rounds 3] [--threads 1]

Measured, interleaved round by round in one process (the machine is shared; a ratio taken
within one round is what carries over), each on batches of 8:

* training: one step of the tiny U-Net (forward, backward, Adam) on 12x32x32 latents;
* validation-loss forwards (``Objective.loss_at``, no gradient);
* generation through ``scaletrain.sample.generate.generate`` (Euler, 25 steps, guidance 4:
  two model rows per image per step), decode included;
* Inception-v3 pool features (pytorch-fid's network, random weights: the same FLOPs) of
  64x64 images resized to 299x299;
* CLIP score with the tiny open_clip CLIP.

Writes the ``eval`` section of docs/benchmarks.md, with the formula for evaluation's share of
a training run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.report import git_revision, machine_description, write_section
from scaletrain.config import load_config
from scaletrain.data.encoders import build_image_encoder
from scaletrain.data.encoders.tiny import save_tiny_open_clip
from scaletrain.diffusion import build_objective, build_sampler, make_model_fn
from scaletrain.eval.clip_score import ClipScorer
from scaletrain.eval.fid import Inception, build_inception, inception_features
from scaletrain.eval.images import generated_to_unit_range
from scaletrain.models import build_model
from scaletrain.sample.conditioning import PromptConditioner
from scaletrain.sample.generate import generate

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_inception(tmp: Path) -> Inception:
    """pytorch-fid's InceptionV3 with random weights (the FLOPs of the real one): the module
    pytorch-fid's fid_inception_v3 builds, saved in its file format, loaded by our loader."""
    from pytorch_fid.inception import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
        _inception_v3,
    )

    net = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(192, 32), FIDInceptionA(256, 64),
                                                FIDInceptionA(288, 64))
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (
        FIDInceptionC(768, 128), FIDInceptionC(768, 160), FIDInceptionC(768, 160),
        FIDInceptionC(768, 192))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    torch.save(net.state_dict(), tmp / "inception.pth")
    return build_inception(str(tmp / "inception.pth"), 2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    cfg = load_config(REPO / "configs" / "train" / "demo.yaml", [
        f"preprocess.text_encoder.tiny.cache_dir={tmp / 'clip'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model_fn = make_model_fn(model, "unet")
    objective = build_objective(cfg.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    side = cfg.model.sample_size
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(BATCH, 12, side, side, generator=gen),
             "encoder_hidden_states": torch.randn(BATCH, cfg.data.max_text_tokens, 64),
             "pooled": torch.randn(BATCH, 64), "time_ids": torch.full((BATCH, 6), 64.0)}
    cond = {k: v for k, v in batch.items() if k != "latents"}
    conditioner = PromptConditioner(cfg.preprocess, cfg.data.max_text_tokens, "unet",
                                    cfg.diffusion.cfg_null)
    prompts = [f"a red circle {i}" for i in range(BATCH)]
    conditioner.release_encoder(prompts)
    image_encoder = build_image_encoder(cfg.preprocess, device="cpu")
    sampler = build_sampler(cfg.diffusion, name="euler", steps=25, guidance_scale=4.0)
    inception = random_inception(tmp)
    clip = ClipScorer("local-dir:" + save_tiny_open_clip(tmp / "open_clip")["local_dir"],
                      "open_clip")
    pixels = generate(model_fn, sampler, conditioner, image_encoder, prompts, list(range(BATCH)),
                      side * 2, side * 2, batch_size=BATCH, device="cpu")
    images = [Image.fromarray(a) for a in
              (generated_to_unit_range(pixels).permute(0, 2, 3, 1).mul(255).byte().numpy())]

    def train_step():
        optimizer.zero_grad()
        loss, _ = objective(model_fn, batch, torch.Generator().manual_seed(1))
        loss.mean().backward()
        optimizer.step()

    def loss_forwards():
        with torch.no_grad():
            points = objective.points_at(torch.full((BATCH,), 0.5, dtype=torch.float64))
            objective.loss_at(model_fn, batch["latents"], cond, points,
                              torch.randn_like(batch["latents"]))

    jobs = {
        "training step (fwd+bwd+Adam)": train_step,
        "validation-loss forward": loss_forwards,
        "generation (Euler 25, CFG 4, decode)": lambda: generate(
            model_fn, sampler, conditioner, image_encoder, prompts, list(range(BATCH)), side * 2,
            side * 2, batch_size=BATCH, device="cpu"),
        "Inception-v3 pool features (299x299)": lambda: inception_features(
            inception, generated_to_unit_range(pixels)),
        "CLIP score (tiny open_clip)": lambda: clip.scores(images, prompts),
    }
    for fn in jobs.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, fn in jobs.items():
            rates[name].append(BATCH / timed(fn))
    med = {name: statistics.median(r) for name, r in rates.items()}
    train = med["training step (fwd+bwd+Adam)"]
    rows = [f"| {name} | {max(r):,.2f} | {med[name]:,.2f} | {train / med[name]:,.2f} |"
            for name, r in rates.items()]
    fwd_ratio = med["validation-loss forward"] / train
    gen_cost = train / med["generation (Euler 25, CFG 4, decode)"]
    text = f"""## Evaluation (scaletrain/eval)

Command: `PYTHONPATH=. python benchmarks/bench_eval.py --rounds {args.rounds} --threads {args.threads}` (git {git_revision()})

Machine: {machine_description()}; {args.threads} intra-op thread(s); the demo's tiny U-Net (12x32x32 latents, 64x64 images), batches of {BATCH}, fp32; median and best of {args.rounds} interleaved rounds. The last column is a training sample's time divided into the item's: what one item costs in training samples.

| work | items/s best | median | cost in training samples |
| --- | ---: | ---: | ---: |
{chr(10).join(rows)}

A training sample costs {fwd_ratio:.1f} validation-loss forwards here (forward, backward,
optimizer), and one generated image {gen_cost:.1f} training samples = {gen_cost * fwd_ratio:.0f} forwards,
against S g = 50 model rows predicted by the formula below (the pixel decode is free;
the benchmark samples 25 steps).

**Share of a training run.** Per evaluation every rank does its 1/R of: 2 L K loss forwards
(raw and EMA weights; L = eval.loss_samples, K = eval.timesteps), M generated images of S
steps with g = 2 model rows under guidance (M = eval.num_samples, S = eval.steps), and per
image one decode, one Inception and one CLIP pass. Between evaluations every rank trains E
(= eval.every) steps of B/R samples (B the global batch). In forward-equivalents:

    share = (2 L K + M S g (1 + d)) / (c E B)

with c a training sample's cost in forwards (3, or 4 with gradient checkpointing: `scaletrain
model-info configs/train/sdxl.yaml --json` gives train_flops_per_sample / flops_per_sample =
26.4 / 6.76 = 3.9) and d the decode + Inception + CLIP cost of an image over its S g forwards
(Inception-v3 is ~6 GFLOP and CLIP-L's image tower ~80 GFLOP against 50 x 6.76 TFLOP of
U-Net forwards at 1024 px; the VAE decode, not measured here, is taken as d <= 0.2). The
presets' intended scale (configs/train/sdxl.yaml, sd3_2b.yaml: 256 GPUs x 8 = B = 2048) with
eval.every = 2000 (their validation interval) and this section's defaults (L = 512, K = 8,
M = 1000, S = 30 from diffusion.sample_steps, g = 2):
share = (2 x 512 x 8 + 1000 x 30 x 2 x 1.2) / (3.9 x 2000 x 2048) = 80,192 / 15,974,400 =
0.50%. The 3% target holds for eval.every >= 335 at that scale; the share grows as 1/B, so
a 64-GPU run (B = 512) needs eval.every >= 1,340.
"""
    if args.no_write:
        print(text)
    else:
        write_section("eval", text)
        print(text)


if __name__ == "__main__":
    main()
