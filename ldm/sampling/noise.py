"""Where samplers get their randomness: per-image seeded generators, drawn exactly as diffusers draws.

Image i of a call has its own `torch.Generator("cpu").manual_seed(seed + i)`, so any image of a batch
can be regenerated alone. `randn` is diffusers' `randn_tensor`; `Noise.brownian` is the Brownian tree
(torchsde) that diffusers' DPMSolverSDEScheduler and k-diffusion's DPM++ SDE draw their noise from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor`.

    A CPU generator draws on the CPU whatever `device` is, then moves the result; a list of
    generators draws sample i of the batch from generator i (so image i can be regenerated alone).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, list) else generator).device
        if gen_device.type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_device.type != device.type:
            raise ValueError(f"cannot draw a {device} tensor from a {gen_device} generator; use a CPU generator")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class Noise:
    """The random source of one sampling call: a generator per image and, for Brownian-tree samplers, the
    image seeds. `Noise.from_seeds([s, s + 1, ...])` is what the pipeline builds."""

    def __init__(self, generator: Generator = None, seeds: Sequence[int] | int | None = None):
        self.generator = generator
        self.seeds = seeds

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> Noise:
        seeds = [int(s) for s in seeds]
        return cls([torch.Generator("cpu").manual_seed(s) for s in seeds], seeds)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, I) of x's shape, device and dtype, from the generator(s)."""
        return randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def brownian(self, x: torch.Tensor, sigma_min: float, sigma_max: float) -> BrownianTreeNoiseSampler:
        """A Brownian-tree noise sampler `(sigma, sigma_next) -> noise` over [sigma_min, sigma_max]: one tree per
        image when there is one seed per image, else one tree seeded with `seeds` (an int) or from the generator."""
        seed: int | list[int] | None
        if self.seeds is None:
            gen = self.generator[0] if isinstance(self.generator, list) else self.generator
            seed = int(torch.randint(0, 2**63 - 1, (), generator=gen).item()) if gen is not None else None
        elif isinstance(self.seeds, int):
            seed = self.seeds
        else:
            seed = list(self.seeds)
            if len(seed) != x.shape[0]:
                raise ValueError(f"{len(seed)} seeds for a batch of {x.shape[0]}; pass one per image")
        return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)


class BrownianTreeNoiseSampler:
    """Noise between two noise levels from a Brownian path over sigma (k-diffusion's sampler of the same name):
    (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, the same whichever steps query it.

    seed: an int (one path for the whole batch) or one int per image (one path each, stacked), as diffusers'
    `BatchedBrownianTree`, on torchsde's Brownian interval, so that seeds agree with diffusers'. Levels are
    taken as float32 0-d tensors and the scale computed in float32, as diffusers' `BrownianTreeNoiseSampler`
    does (the interval's ends and the query points are then the same numbers on both sides).
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | list[int] | None):
        try:
            import torchsde
        except ImportError:
            raise ValueError("this sampler needs torchsde (Brownian-tree noise): pip install torchsde") from None
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if isinstance(seed, list) else [seed]
        w0 = x[0] if self.batched else x
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.t0, self.t1, self.sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        self.trees = [
            torchsde.BrownianInterval(
                t0=float(self.t0),
                t1=float(self.t1),
                size=w0.shape,
                dtype=w0.dtype,
                device=w0.device,
                entropy=s,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for s in seeds
        ]

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)  # the path is queried low -> high
        w = torch.stack([tree(float(lo), float(hi)) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()
