"""Diffusion objective, noise schedule, CFG dropout and sampler config. Owned by issue 4.

One section (``diffusion:``) configures both training (the objective) and sampling defaults, so
that a sampler built from a run's config matches how the model was trained.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_origin

from scaletrain.core.config_base import require

# SD3 eq. 20: the mode sampler's map is monotone (a valid density) only for this range of s.
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

DISCRETE_OBJECTIVES = ("eps", "v", "x0")
FLOW_ONLY_WEIGHTINGS = ("sigma_sqrt", "cosmap", "logit_normal", "mode")


@dataclass
class DiffusionConfig:
    """What the model predicts, on which noise process, weighted how; and how to sample."""

    # ---- objective ----------------------------------------------------------------------
    # eps / v / x0: discrete-time variance-preserving diffusion, x_t = a_t x0 + s_t eps with
    # a_t^2 + s_t^2 = 1 (Ho et al. 2020); the model predicts eps, v = a_t eps - s_t x0
    # (Salimans & Ho 2022) or x0. flow: rectified flow x_t = (1-t) x0 + t eps, the model
    # predicts the velocity eps - x0 (Esser et al. 2024, "SD3", sec. 2).
    objective: Literal["eps", "v", "x0", "flow"] = "eps"

    # ---- discrete noise schedule (eps / v / x0 only) ---------------------------------------
    # linear: DDPM betas linspace(beta_start, beta_end); scaled_linear: SD/SDXL betas
    # linspace(sqrt(beta_start), sqrt(beta_end))^2; cosine: Nichol & Dhariwal 2021 eq. 17.
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    cosine_offset: float = 0.008  # the "s" of Nichol & Dhariwal 2021 eq. 17
    # Rescale the schedule so alpha_bar at the last timestep is exactly 0 (Lin et al. 2024,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1). Needs v or x0.
    zero_terminal_snr: bool = False

    # ---- training timestep sampling ---------------------------------------------------------
    # A draw u in (0, 1) from this density picks the timestep: flow uses t = u (then the
    # shift); discrete schedules use index floor(u * num_train_timesteps).
    # uniform; logit_normal: logit(u) ~ N(logit_mean, logit_std) (SD3 eq. 19); mode: SD3
    # eq. 20 with mode_scale; cosmap: SD3 eq. 21.
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "cosmap"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # Resolution-dependent timestep shift (flow only, SD3 sec. 5.3.2):
    # t' = s t / (1 + (s - 1) t), applied in training and in sampling. With shift_auto_base
    # = 0 the shift s is `shift`. With shift_auto_base = n > 0 (the latent side length of the
    # base resolution, e.g. 32 for 256 px images and an 8x VAE) s = shift * sqrt(h*w / n^2)
    # for latents of size h x w, i.e. sqrt(m/n) relative to `shift` at the base resolution.
    shift: float = 1.0
    shift_auto_base: int = 0

    # ---- loss weighting -----------------------------------------------------------------
    # uniform: plain MSE on the target. min_snr: Min-SNR-gamma (Hang et al. 2023), the
    # weight min(SNR, gamma) on the x0 error expressed for the chosen target (eps:
    # min(SNR,g)/SNR; v: min(SNR,g)/(SNR+1); x0: min(SNR,g); flow velocity: min(SNR,g) t^2).
    # Flow only (SD3 sec. 3.1, sampling t from pi(t) equals weighting a uniform t by pi(t)):
    # logit_normal, mode, cosmap weight by that density; sigma_sqrt weights by t^-2.
    loss_weighting: Literal[
        "uniform", "min_snr", "sigma_sqrt", "cosmap", "logit_normal", "mode"
    ] = "uniform"
    min_snr_gamma: float = 5.0

    # ---- classifier-free guidance dropout (training) ----------------------------------
    # Per-sample probabilities, each input drawn independently; cfg_drop_prompt drops the
    # text tokens and the pooled embedding together (the whole prompt) on top of that.
    cfg_drop_prompt: float = 0.1
    cfg_drop_text: float = 0.0
    cfg_drop_pooled: float = 0.0
    cfg_drop_time_ids: float = 0.0
    # What a dropped input becomes: zeros, or the stored empty-prompt encoding (given to the
    # objective at construction or in the batch as "null_cond"; time_ids always become zeros).
    cfg_null: Literal["zeros", "empty_prompt"] = "zeros"

    # ---- sampling defaults --------------------------------------------------------------
    # auto: ddim for eps/v/x0, euler for flow. eps/v/x0: ddim, euler, dpm2 (second order,
    # Lu et al. 2022); flow: euler, heun (second order).
    sampler: Literal["auto", "ddim", "euler", "dpm2", "heun"] = "auto"
    sample_steps: int = 30
    guidance_scale: float = 5.0
    # phi of Lin et al. 2024 sec. 3.4 (0 disables the rescale).
    guidance_rescale: float = 0.0
    # DDIM eta (Song et al. 2021 eq. 16) or Euler-ancestral eta; 0 = deterministic.
    eta: float = 0.0
    # Which training timesteps the discrete samplers visit; trailing starts at the last one
    # (Lin et al. 2024 sec. 3.3, table 2).
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    # Discrete euler/dpm2 only: the Karras et al. 2022 (eq. 5, rho=7) sigma grid instead of
    # the timestep spacing (with zero terminal SNR: sigma = inf first, then Karras from the
    # largest finite sigma, which wastes steps at huge sigmas; prefer the spacing there).
    karras_sigmas: bool = False

    @property
    def is_flow(self) -> bool:
        return self.objective == "flow"

    @property
    def resolved_sampler(self) -> str:
        if self.sampler != "auto":
            return self.sampler
        return "euler" if self.is_flow else "ddim"

    def __post_init__(self) -> None:
        # Literal fields are checked by the YAML loader; check them here too for direct use.
        for f in fields(self):
            allowed = get_args(_HINTS[f.name]) if get_origin(_HINTS[f.name]) is Literal else ()
            value = getattr(self, f.name)
            require(
                not allowed or value in allowed,
                f.name,
                f"got {value!r}; allowed: " + ", ".join(map(repr, allowed)),
            )
        require(
            self.num_train_timesteps > 1,
            "num_train_timesteps",
            f"must be > 1, got {self.num_train_timesteps}",
        )
        require(
            0.0 < self.beta_start < self.beta_end < 1.0,
            "beta_start",
            f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}",
        )
        require(
            self.cosine_offset >= 0.0, "cosine_offset", f"must be >= 0, got {self.cosine_offset}"
        )
        require(
            not (self.zero_terminal_snr and self.objective in ("eps", "flow")),
            "zero_terminal_snr",
            f"needs objective v or x0 (eps cannot be inverted to x0 at SNR 0, Lin et al. 2024 "
            f"sec. 3.2; flow already reaches pure noise), got {self.objective!r}",
        )
        require(self.logit_std > 0.0, "logit_std", f"must be > 0, got {self.logit_std}")
        require(
            -1.0 <= self.mode_scale <= MODE_SCALE_MAX,
            "mode_scale",
            f"must be in [-1, {MODE_SCALE_MAX:.4f}] (SD3 eq. 20), got {self.mode_scale}",
        )
        require(self.shift > 0.0, "shift", f"must be > 0, got {self.shift}")
        require(
            self.shift_auto_base >= 0,
            "shift_auto_base",
            f"must be >= 0, got {self.shift_auto_base}",
        )
        require(
            self.is_flow or (self.shift == 1.0 and self.shift_auto_base == 0),
            "shift",
            f"the timestep shift applies to objective flow only, got objective {self.objective!r}",
        )
        require(self.min_snr_gamma > 0.0, "min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        require(
            self.is_flow or self.loss_weighting not in FLOW_ONLY_WEIGHTINGS,
            "loss_weighting",
            f"{self.loss_weighting!r} is a rectified-flow (SD3) weighting; objective is "
            f"{self.objective!r}",
        )
        for name in ("cfg_drop_prompt", "cfg_drop_text", "cfg_drop_pooled", "cfg_drop_time_ids"):
            p = getattr(self, name)
            require(0.0 <= p <= 1.0, name, f"is a probability, must be in [0, 1], got {p}")
        require(self.sample_steps >= 1, "sample_steps", f"must be >= 1, got {self.sample_steps}")
        require(
            self.is_flow or self.sample_steps <= self.num_train_timesteps,
            "sample_steps",
            f"must be <= num_train_timesteps ({self.num_train_timesteps}), got {self.sample_steps}",
        )
        require(
            self.guidance_scale >= 0.0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}"
        )
        require(
            0.0 <= self.guidance_rescale <= 1.0,
            "guidance_rescale",
            f"must be in [0, 1], got {self.guidance_rescale}",
        )
        require(self.eta >= 0.0, "eta", f"must be >= 0, got {self.eta}")
        sampler = self.resolved_sampler
        require(
            not (self.is_flow and sampler == "ddim"),
            "sampler",
            "ddim is for discrete schedules (eps/v/x0); use euler or heun for flow",
        )
        require(
            not (not self.is_flow and sampler == "heun"),
            "sampler",
            "heun is for objective flow; use ddim, euler or dpm2 for eps/v/x0",
        )
        require(
            not (self.is_flow and sampler == "dpm2"),
            "sampler",
            "dpm2 is for discrete schedules (eps/v/x0); use euler or heun for flow",
        )
        require(
            not (sampler == "dpm2" and self.eta != 0.0),
            "eta",
            "dpm2 is deterministic; eta must be 0",
        )
        require(
            not (self.is_flow and self.eta != 0.0),
            "eta",
            "flow samplers are deterministic ODE solvers; eta must be 0",
        )


_HINTS = typing.get_type_hints(DiffusionConfig)
