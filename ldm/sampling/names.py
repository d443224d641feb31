"""The sampler and schedule names users pick, and what each accepts: no torch here, so that a command line or a
request is checked in milliseconds, before any heavy import or model load.

The algorithms themselves are registered in `ldm.sampling.samplers.SAMPLERS` (one `SamplerInfo` per name
below, taking its A1111 name, schedules and eta from this catalogue).
"""

from __future__ import annotations

from dataclasses import dataclass

SIGMA_SCHEDULES = ("default", "karras", "exponential", "beta")
_ALL = SIGMA_SCHEDULES
_DEFAULT = ("default",)


@dataclass(frozen=True)
class SamplerName:
    name: str  # ours: "dpmpp_2m" (--sampler, pipe(sampler=...), the HTTP API)
    a1111: str  # AUTOMATIC1111's name: "DPM++ 2M"
    schedules: tuple[str, ...] = _DEFAULT  # the sigma schedules its diffusers scheduler supports
    eta: float | None = None  # default eta where the sampler takes one (DDIM); None: it takes none


CATALOG: dict[str, SamplerName] = {
    s.name: s
    for s in (
        SamplerName("ddim", "DDIM", eta=0.0),
        SamplerName("plms", "PLMS"),
        SamplerName("dpmpp_2m", "DPM++ 2M", _ALL),
        SamplerName("dpmpp_2m_sde", "DPM++ 2M SDE", _ALL),
        SamplerName("dpmpp_3m_sde", "DPM++ 3M SDE", _ALL),
        SamplerName("unipc", "UniPC", _ALL),
        SamplerName("lcm", "LCM"),
        SamplerName("euler", "Euler", _ALL),
        SamplerName("euler_a", "Euler a"),
        SamplerName("heun", "Heun", _ALL),
        SamplerName("dpm2", "DPM2", _ALL),
        SamplerName("dpm2_a", "DPM2 a", _ALL),
        SamplerName("lms", "LMS", _ALL),
        SamplerName("dpmpp_sde", "DPM++ SDE", _ALL),
    )
}

# Names kept from earlier releases: name -> (sampler, schedule)
ALIASES: dict[str, tuple[str, str]] = {"dpmpp_2m_karras": ("dpmpp_2m", "karras")}

# AUTOMATIC1111 "Schedule type" values (>= 1.9) -> ours; A1111 writes the label ("Karras") in infotexts
A1111_SCHEDULES: dict[str, str] = {
    "Automatic": "default",
    "Karras": "karras",
    "Exponential": "exponential",
    "Beta": "beta",
}
SCHEDULE_LABELS: dict[str, str] = {v: k for k, v in A1111_SCHEDULES.items()}
# A1111 < 1.6 wrote the schedule into the sampler name: "DPM++ 2M Karras", "DPM++ 2M SDE Exponential"
_SUFFIXES = {" Karras": "karras", " Exponential": "exponential"}


def sampler_names() -> list[str]:
    """What --sampler accepts: our names, then the aliases."""
    return [*CATALOG, *ALIASES]


def resolve_name(name: str, schedule: str | None = None) -> tuple[SamplerName, str]:
    """(catalogue entry, sigma schedule) for our name, an alias or an A1111 name, checked against each other.

    `schedule` None takes the one the name implies ("DPM++ 2M Karras", "dpmpp_2m_karras") or "default".
    A schedule the sampler cannot use is a ValueError listing the ones it can.
    """
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name (a string), got {name!r}")
    if schedule is not None and not isinstance(schedule, str):
        raise ValueError(f"schedule must be a name (a string), got {schedule!r}")
    implied = None
    if name in ALIASES:
        name, implied = ALIASES[name]
    elif name not in CATALOG:
        by_a1111 = {entry.a1111: entry.name for entry in CATALOG.values()}
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
    entry = CATALOG[name]
    if schedule is not None and schedule not in SIGMA_SCHEDULES:
        schedule = A1111_SCHEDULES.get(schedule, schedule)
        if schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SIGMA_SCHEDULES)}")
    if schedule is not None and implied is not None and schedule != implied and schedule != "default":
        raise ValueError(f"sampler {name!r} given as {implied!r} by its name and schedule {schedule!r}; give one")
    schedule = implied if schedule in (None, "default") and implied is not None else (schedule or "default")
    if schedule not in entry.schedules:
        raise ValueError(
            f"schedule {schedule!r} is not available for sampler {entry.name!r}; it takes {', '.join(entry.schedules)}"
        )
    return entry, schedule


def check_eta(entry: SamplerName, eta: float | None) -> float:
    """The eta to run with: the sampler's default for None; a nonzero eta for a sampler without one is an error."""
    if eta is None:
        return entry.eta or 0.0
    if entry.eta is None and eta != 0:
        takes = [e.name for e in CATALOG.values() if e.eta is not None]
        raise ValueError(f"eta={eta}: sampler {entry.name!r} takes no eta; leave it at 0, or use {', '.join(takes)}")
    return float(eta)
