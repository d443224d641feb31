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
from ldm.sampling.plan import SIGMA_SCHEDULES, SamplerInfo

SAMPLERS: dict[str, SamplerInfo] = {info.name: info for info in (*vp_solvers.SAMPLERS, *k_samplers.SAMPLERS)}

# Names kept from earlier releases: name -> (sampler, schedule)
ALIASES: dict[str, tuple[str, str]] = {"dpmpp_2m_karras": ("dpmpp_2m", "karras")}

# AUTOMATIC1111 "Schedule type" values (>= 1.9) -> ours; A1111 writes the label ("Karras") in infotexts
A1111_SCHEDULES: dict[str, str] = {
    "Automatic": "default",
    "Karras": "karras",
    "Exponential": "exponential",
    "Beta": "beta",
}
SCHEDULE_LABELS: dict[str, str] = {
    "default": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
}
# A1111 < 1.6 wrote the schedule into the sampler name: "DPM++ 2M Karras", "DPM++ 2M SDE Exponential"
_SUFFIXES = {" Karras": "karras", " Exponential": "exponential"}


def sampler_names() -> list[str]:
    """What --sampler accepts: our names, then the aliases."""
    return [*SAMPLERS, *ALIASES]


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """(registry entry, sigma schedule) for our name, an alias or an A1111 name, checked against each other.

    `schedule` None takes the one the name implies ("DPM++ 2M Karras", "dpmpp_2m_karras") or "default".
    A schedule the sampler cannot use is a ValueError listing the ones it can.
    """
    implied = None
    if name in ALIASES:
        name, implied = ALIASES[name]
    elif name not in SAMPLERS:
        by_a1111 = {info.a1111: info.name for info in SAMPLERS.values()}
        for suffix, sched in _SUFFIXES.items():
            if name.endswith(suffix) and name[: -len(suffix)] in by_a1111:
                name, implied = by_a1111[name[: -len(suffix)]], sched
                break
        else:
            if name not in by_a1111:
                raise ValueError(
                    f"unknown sampler {name!r}; use one of {', '.join(sampler_names())} "
                    f"(or their AUTOMATIC1111 names: {', '.join(by_a1111)})"
                )
            name = by_a1111[name]
    info = SAMPLERS[name]
    if schedule is not None and schedule not in SIGMA_SCHEDULES:
        schedule = A1111_SCHEDULES.get(schedule, schedule)
        if schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SIGMA_SCHEDULES)}")
    if schedule is not None and implied is not None and schedule != implied and schedule != "default":
        raise ValueError(f"sampler {name!r} given as {implied!r} by its name and schedule {schedule!r}; give one")
    schedule = implied if schedule in (None, "default") and implied is not None else (schedule or "default")
    if schedule not in info.schedules:
        raise ValueError(
            f"schedule {schedule!r} is not available for sampler {info.name!r}; it takes {', '.join(info.schedules)}"
        )
    return info, schedule


def check_eta(info: SamplerInfo, eta: float | None) -> float:
    """The eta to run with: the sampler's default for None; a nonzero eta for a sampler without one is an error."""
    if eta is None:
        return info.eta or 0.0
    if info.eta is None and eta != 0:
        takes = [i.name for i in SAMPLERS.values() if i.eta is not None]
        raise ValueError(f"eta={eta}: sampler {info.name!r} takes no eta; leave it at 0, or use {', '.join(takes)}")
    return float(eta)
