"""The sampler registry: names users pick (ours and AUTOMATIC1111's), each with its plan rule and the
sigma schedules it accepts.

    info, schedule = resolve_sampler("DPM++ 2M Karras")           # -> SAMPLERS["dpmpp_2m"], "karras"
    plan = info.make_plan(noise_schedule, steps=25, sigma_schedule=schedule)
    x0 = info.fn(denoiser, plan.noise_scale * noise, plan, noise=Noise.from_seeds(seeds), eta=0.0)

The samplers themselves are small functions in `vp_solvers` (DDIM, PLMS, DPM-Solver++, UniPC, LCM: on
x_t directly) and `k_samplers` (Euler, Heun, DPM2, LMS, DPM++ SDE: k-diffusion's, on sigmas).
"""

from __future__ import annotations

from ldm.sampling import k_samplers, vp_solvers
from ldm.sampling.names import (
    A1111_SCHEDULES,
    ALIASES,
    CATALOG,
    SCHEDULE_LABELS,
    SIGMA_SCHEDULES,
    SamplerName,
    resolve_name,
    sampler_names,
)
from ldm.sampling.names import check_eta as _check_eta
from ldm.sampling.plan import SamplerInfo

SAMPLERS: dict[str, SamplerInfo] = {info.name: info for info in (*vp_solvers.SAMPLERS, *k_samplers.SAMPLERS)}
if SAMPLERS.keys() != CATALOG.keys():  # every name users can pick has its algorithm, and only those
    raise ImportError(f"sampler registry {sorted(SAMPLERS)} differs from ldm.sampling.names {sorted(CATALOG)}")

__all__ = [
    "A1111_SCHEDULES",
    "ALIASES",
    "SAMPLERS",
    "SCHEDULE_LABELS",
    "SIGMA_SCHEDULES",
    "check_eta",
    "resolve_sampler",
    "sampler_names",
]


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """(registry entry, sigma schedule) for our name, an alias or an A1111 name (ldm.sampling.names.resolve_name)."""
    entry, schedule = resolve_name(name, schedule)
    return SAMPLERS[entry.name], schedule


def check_eta(info: SamplerInfo | SamplerName, eta: float | None) -> float:
    """The eta to run with: the sampler's default for None; a nonzero eta for a sampler without one is an error."""
    return _check_eta(CATALOG[info.name], eta)
