"""The model, wrapped once: U-Net output (eps / v / x_0) -> x_0 and eps, with classifier-free guidance.

Every sampler sees one interface (k-diffusion's idea: wrap the model instead of changing the samplers):

    pred = denoiser(x, t, alpha_t, sigma_t, step)     # x = alpha_t x_0 + sigma_t eps (VP scale)
    pred.x0, pred.eps                                   # float32, x's shape

alpha_t and sigma_t are given by the sampler, computed as its diffusers scheduler computes them (from the
alpha_bar table for DDIM, from the VE sigma for DPM-Solver and the Euler family), so the conversion below
is that scheduler's to the last rounding. `step` is the plan's step index, for conditioning that changes
during the run (prompt editing); samplers pass it.

Guidance (Ho & Salimans 2022) and its rescale (Lin et al. 2023, sec. 3.4) act on the raw model output, as
in diffusers' pipelines, before the conversion: for a v-prediction model, guiding v and guiding x_0 differ
once the rescale is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ldm.sampling.schedule import PREDICTION_TYPES

# model(x, t, context) -> output: the U-Net's call; context is what the Denoiser was given for that step
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Prediction(NamedTuple):
    x0: torch.Tensor  # predicted clean latents
    eps: torch.Tensor  # predicted noise


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), optionally rescaled (Lin et al. 2023, sec. 3.4).

    Same operations as diffusers' pipeline and its `rescale_noise_cfg`.
    """
    guided = uncond + scale * (cond - uncond)
    if guidance_rescale > 0.0:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        rescaled = guided * (std_cond / std_guided)  # match the std of the conditional prediction (fixes overexposure)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def to_x0_eps(output: torch.Tensor, x: torch.Tensor, alpha_t, sigma_t, prediction_type: str) -> Prediction:
    """(x_0, eps) from a model output at x = alpha_t x_0 + sigma_t eps (diffusers' expressions for each type)."""
    if prediction_type == "epsilon":
        return Prediction((x - sigma_t * output) / alpha_t, output)
    if prediction_type == "v_prediction":  # v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)
        return Prediction(alpha_t * x - sigma_t * output, alpha_t * output + sigma_t * x)
    if prediction_type == "sample":
        return Prediction(output, (x - alpha_t * output) / sigma_t)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


class Denoiser:
    """A model and its prediction type, classifier-free guidance bound in.

    model(x, t, context) -> output. With guidance_scale > 1 the model runs once on the batch [x; x] with the
    contexts joined by `join(uncond, cond)` (default torch.cat), as diffusers does: one U-Net call per
    evaluation. `conditioning(step) -> (cond, uncond)`, when given, picks the contexts per step of the plan
    (scheduled prompts); otherwise `cond` / `uncond` serve every step. `after_step(i, x) -> x`, when given,
    changes the sample after each step (`step_done`: the inpainting blend).
    """

    def __init__(
        self,
        model: ModelFn,
        prediction_type: str = "epsilon",
        *,
        cond: Any = None,
        uncond: Any = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        model_dtype: torch.dtype | None = None,
        join: Callable[[Any, Any], Any] | None = None,
        conditioning: Callable[[int], tuple[Any, Any]] | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        self.model = model
        self.prediction_type = prediction_type
        self.cond, self.uncond = cond, uncond
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.model_dtype = model_dtype
        self.join = join or _join
        self.conditioning = conditioning
        self.after_step = after_step
        self._joined: tuple[Any, Any, Any] | None = None  # (uncond, cond, joined): joined once, not every step
        self.calls = 0  # model evaluations so far (what a sampler costs; tests count them)

    @property
    def guided(self) -> bool:
        """Whether guidance runs: diffusers' `do_classifier_free_guidance` (scale > 1)."""
        return self.guidance_scale > 1.0

    def contexts(self, step: int | None) -> tuple[Any, Any]:
        """(cond, uncond) for a step of the plan."""
        if self.conditioning is not None and step is not None:
            return self.conditioning(step)
        return self.cond, self.uncond

    def model_output(self, x: torch.Tensor, t, step: int | None = None) -> torch.Tensor:
        """The guided raw model output (float32) at x (fed to the model as given) and timestep t."""
        cond, uncond = self.contexts(step)
        t = torch.as_tensor(t)
        dtype = self.model_dtype or x.dtype
        self.calls += 1
        if not self.guided:
            return self.model(x.to(dtype), t, cond).float()
        if self._joined is None or self._joined[0] is not uncond or self._joined[1] is not cond:
            self._joined = (uncond, cond, self.join(uncond, cond))
        out = self.model(torch.cat([x, x]).to(dtype), t, self._joined[2]).float()
        out_uncond, out_cond = out.chunk(2)
        return cfg_combine(out_uncond, out_cond, self.guidance_scale, self.guidance_rescale)

    def step_done(self, i: int, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """x after step i of the plan, at its level i + 1, with `after_step` applied (inpainting with an ordinary
        model puts the known region back there, as diffusers' inpainting pipeline does after each scheduler step).

        x is in the VP scale; `sigma` (the level's VE sigma) says it is in the k-samplers' VE scale instead,
        x_0 + sigma eps: `after_step` always sees and returns VP latents."""
        if self.after_step is None:
            return x
        if sigma is None:
            return self.after_step(i, x)
        scale = (sigma**2 + 1) ** 0.5
        return self.after_step(i, x / scale) * scale

    def __call__(self, x: torch.Tensor, t, alpha_t, sigma_t, step: int | None = None) -> Prediction:
        out = self.model_output(x, t, step)
        return to_x0_eps(out, x.float(), alpha_t, sigma_t, self.prediction_type)


def _join(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if cond is None:
        return None
    return type(cond).cat([uncond, cond])  # e.g. Conditioning.cat
