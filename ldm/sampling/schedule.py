"""The Stable Diffusion noise schedule: betas, alphas_cumprod, forward noising and
conversions between the model's prediction types.

Notation (DDPM, Ho et al. 2020; DDIM, Song et al. 2020):

    beta_t          per-step noise variance, t = 0 .. T-1 (T = num_train_timesteps)
    alpha_bar_t     prod_{s<=t} (1 - beta_s)             -> `alphas_cumprod[t]`
    x_t             sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps      (eq. 4 of DDPM)
    v               sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0      (Salimans & Ho 2022, sec. 4)
    sigma_t         sqrt((1 - alpha_bar_t) / alpha_bar_t): the variance-exploding noise level
                    of x_t / sqrt(alpha_bar_t), the "sigmas" of k-diffusion / Euler / DPM-Solver

Numerics follow diffusers' `DDIMScheduler` bit for bit: betas, alphas and their
cumulative product are computed and kept in float32 (not float64), and the
timestep lists are computed with the same numpy expressions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers DDIMScheduler's constructor defaults: what a scheduler_config.json key
# that is absent means (this is what `DDIMScheduler.from_config(cfg)` does).
_DIFFUSERS_DDIM_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
    set_alpha_to_one=True,
    clip_sample=True,
    clip_sample_range=1.0,
    thresholding=False,
    rescale_betas_zero_snr=False,
)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_{T-1} = 0 (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last  # last becomes 0
    alphas_bar_sqrt *= first / (first - last)  # first keeps its value
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """Discrete-time diffusion schedule. The defaults are the schedule of every SD 1.x / 2.x model."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear": sqrt(beta) linear in t; "linear": beta linear in t
    trained_betas: tuple[float, ...] | None = None  # explicit betas, overriding the three fields above
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "v_prediction" (SD 2.x 768-v) or "sample"
    timestep_spacing: str = "leading"
    steps_offset: int = 1  # added to "leading" timesteps: SD samples t = 981, 961, ..., 1 at 50 steps
    set_alpha_to_one: bool = False  # DDIM's last step goes to alpha_bar = 1 (True) or alpha_bar_0 (False, SD)
    clip_sample: bool = False  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] (pixel models)
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    betas: torch.Tensor = field(init=False, repr=False)  # (T,) float32
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)  # (T,) float32, alpha_bar_t
    final_alpha_cumprod: torch.Tensor = field(init=False, repr=False)  # () float32, alpha_bar "at t = -1"

    @classmethod
    def sd15(cls) -> NoiseSchedule:
        """SD 1.x and the 512-pixel SD 2.x "base" models (epsilon prediction)."""
        return cls()

    @classmethod
    def sd21(cls) -> NoiseSchedule:
        """SD 2.x 768-pixel "v" models (v prediction)."""
        return cls(prediction_type="v_prediction")

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}"
            )
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            if len(self.trained_betas) != T:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values, num_train_timesteps is {T}")
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32 cumprod, as diffusers
        self.final_alpha_cumprod = torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @classmethod
    def from_diffusers_config(cls, config: dict) -> NoiseSchedule:
        """Build from a diffusers scheduler_config.json dict (any scheduler class).

        Absent keys take DDIMScheduler's defaults, exactly as `DDIMScheduler.from_config`;
        keys that do not change the schedule (`_class_name`, `skip_prk_steps`, ...) are ignored.
        """
        c = {**_DIFFUSERS_DDIM_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DDIM_DEFAULTS}}
        if c.pop("thresholding"):
            raise ValueError(
                "thresholding=True (dynamic thresholding) is not supported; it is meant for pixel-space "
                "models, set it to false for latent diffusion"
            )
        if c["trained_betas"] is not None:
            c["trained_betas"] = tuple(float(b) for b in c["trained_betas"])
        return cls(**c)

    def to_diffusers_config(self) -> dict:
        """The scheduler_config.json dict (DDIMScheduler) that gives this schedule."""
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": list(self.trained_betas) if self.trained_betas is not None else None,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            "thresholding": False,
        }

    # ---- timesteps -------------------------------------------------------------------------------

    def timesteps(self, num_steps: int, spacing: str | None = None, device=None) -> torch.Tensor:
        """The `num_steps` timesteps of a sampling run, descending, int64 (diffusers DDIMScheduler.set_timesteps).

        spacing (default `self.timestep_spacing`), for T = 1000 and 10 steps:
          "leading":  0, 100, ..., 900 plus steps_offset, reversed -> 901, 801, ..., 1 (SD, steps_offset=1)
          "trailing": T, T - T/n, ... rounded, minus 1             -> 999, 899, ..., 99
          "linspace": linspace(0, T-1, n) rounded, reversed        -> 999, 888, ..., 0
        """
        spacing = self.timestep_spacing if spacing is None else spacing
        T = self._check_steps(num_steps)
        if spacing == "leading":
            step_ratio = T // num_steps
            ts = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            # arange with a float step; for 62 step counts (61, 103, ...) float error gives it one extra
            # element ~0 -> t = -1, which diffusers keeps. We drop it: the first num_steps agree.
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64)[:num_steps] - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
        else:
            raise ValueError(f"timestep spacing {spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
        self._check_range(ts, num_steps, spacing)
        return torch.from_numpy(ts).to(device)

    # ---- per-timestep coefficients ---------------------------------------------------------------

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar_t, float32; t < 0 means "after the last step" and gives `final_alpha_cumprod`.

        A scalar t (int or 0-d tensor) gives a 0-d tensor, a (B,) t gives (B,).
        """
        t = torch.as_tensor(t).cpu()
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.final_alpha_cumprod)

    def sigmas(self) -> torch.Tensor:
        """(T,) float32 sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), indexed by t (ascending).

        With zero terminal SNR alpha_bar_{T-1} = 0 would give sigma = inf; like diffusers' Euler and
        DPM-Solver schedulers we then use alpha_bar_{T-1} = 2**-24 instead.
        """
        a = self.alphas_cumprod.clone()
        if self.rescale_betas_zero_snr:
            a[-1] = 2**-24
        return ((1 - a) / a) ** 0.5

    # ---- sigma schedules of the k-diffusion-style samplers ---------------------------------------

    def sigma_to_t(self, sigma) -> np.ndarray:
        """The fractional timestep t with sigma_t = `sigma`: linear interpolation of log sigma between the two
        neighbouring table entries, clamped to 0 .. T-1 (k-diffusion's `sigma_to_t`, diffusers' `_sigma_to_t`).

        float64 array of sigma's shape. Computed one value at a time with diffusers' numpy expressions (float32
        table, float64 sigma), so that the rounded timesteps of Karras schedules agree exactly.
        """
        log_sigmas = np.log(self.sigmas().numpy())  # (T,) float32, ascending in t
        sigma = np.asarray(sigma, dtype=np.float64)
        return np.array([_sigma_to_t(s, log_sigmas) for s in sigma.reshape(-1)], dtype=np.float64).reshape(sigma.shape)

    def dpm_solver_schedule(self, num_steps: int, karras: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,) int64, sigmas (n+1,) float32 ending in 0) of an n-step DPM-Solver run, exactly as
        diffusers' `DPMSolverMultistepScheduler.set_timesteps` (final_sigmas_type="zero", no lambda clipping).

        Without Karras sigmas the timesteps are spaced over n + 1 points, the last one dropped (so unlike DDIM's,
        e.g. "leading" at 10 steps: 901, 811, ..., 91), and sigma_i = sigma(t_i). With `karras` the sigmas are
        `karras_sigmas(n, sigma_0, sigma_{T-1})` whatever the spacing, and t_i = round(sigma_to_t(sigma_i)).
        """
        T = self._check_steps(num_steps)
        table = self.sigmas()
        if karras:
            sigmas = karras_sigmas(num_steps, table[0].item(), table[-1].item())
            ts = self.sigma_to_t(sigmas).round().astype(np.int64)
        else:
            if self.timestep_spacing == "leading":
                step_ratio = T // (num_steps + 1)
                ts = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
                ts += self.steps_offset
            elif self.timestep_spacing == "linspace":
                ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
            else:  # "trailing": DDIM's (see `timesteps` for the float-error step diffusers adds, which we drop)
                ts = self.timesteps(num_steps, "trailing").numpy()
            self._check_range(ts, num_steps)
            sigmas = table.numpy()[ts]  # diffusers' np.interp at integer t: the table entries themselves
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # sigma = 0 after the last step: x_0
        return torch.from_numpy(ts), torch.from_numpy(sigmas)

    def euler_schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,) float32, sigmas (n+1,) float32 ending in 0) of an n-step Euler run, exactly as diffusers'
        `EulerAncestralDiscreteScheduler.set_timesteps` (and `EulerDiscreteScheduler`'s without Karras sigmas).

        "leading" and "trailing" timesteps are DDIM's (as floats); "linspace" ones are not rounded
        (25 steps: 999, 957.375, ...), and their sigmas are interpolated linearly in t between table entries.
        """
        T = self._check_steps(num_steps)
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
        else:
            ts = self.timesteps(num_steps).numpy().astype(np.float32)
        self._check_range(ts, num_steps)
        sigmas = np.interp(ts, np.arange(0, T), self.sigmas().numpy())  # float64 from the float32 table
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return torch.from_numpy(ts), torch.from_numpy(sigmas)

    def _check_steps(self, num_steps) -> int:
        T = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer from 1 to num_train_timesteps={T}, got {num_steps!r}")
        return T

    def _check_range(self, ts: np.ndarray, num_steps: int, spacing: str | None = None) -> None:
        T = self.num_train_timesteps
        if ts.max() >= T or ts.min() < 0:
            spacing = self.timestep_spacing if spacing is None else spacing
            raise ValueError(
                f"{num_steps} {spacing!r} steps with steps_offset={self.steps_offset} reach t={ts.max()}, "
                f"outside 0..{T - 1}; use fewer steps or 'trailing' spacing"
            )

    # ---- forward process and prediction types ----------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; t scalar or (B,)."""
        a = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[torch.as_tensor(t).to(x0.device)]
        a = _per_sample(a, x0.ndim)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def to_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x_0, predicted eps) from the model's output at x_t, following `prediction_type`."""
        a = _per_sample(self.alpha_bar(t).to(x_t.device), x_t.ndim)
        b = 1 - a
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - b**0.5 * eps) / a**0.5  # invert x_t = sqrt(a) x_0 + sqrt(1-a) eps
        elif self.prediction_type == "v_prediction":
            x0 = a**0.5 * x_t - b**0.5 * model_output
            eps = a**0.5 * model_output + b**0.5 * x_t
        else:  # "sample"
            x0 = model_output
            eps = (x_t - a**0.5 * x0) / b**0.5
        return x0, eps

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the model should output for (x_0, eps) at t: the training target for `prediction_type`."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        a = _per_sample(self.alpha_bar(t).to(x0.device).to(x0.dtype), x0.ndim)
        return a**0.5 * eps - (1 - a) ** 0.5 * x0  # v


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5).

    float64, with diffusers' `_convert_to_karras` expressions; rho = 7 is the paper's choice.
    """
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    # sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: np.float64, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t` for one sigma (same numpy expressions and dtypes: the rounding matters)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, 1)
    # the last t with log sigma_t <= log sigma, at most T-2 so that t+1 exists
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)  # interpolation weight in log sigma
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))  # back to t


def _per_sample(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """A 0-d coefficient stays 0-d; a (B,) one becomes (B, 1, ..., 1) to broadcast over a (B, ...) tensor."""
    return a if a.ndim == 0 else a.reshape(-1, *([1] * (ndim - 1)))
