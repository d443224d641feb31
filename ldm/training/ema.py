"""Exponential moving average of parameters (Polyak averaging), as the original SD training keeps."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for the given parameters (by name).

    `warmup`: decay grows as min(decay, (1 + n) / (10 + n)) over the first updates (as the
    original LitEma), so early averages are not dominated by the random init.
    """

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float = 0.9999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, nn.Parameter]) -> None:
        self.num_updates += 1
        d = self.current_decay()
        for k, p in named_params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)  # shadow + (1-d) * (p - shadow)

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Write the averages into the parameters; returns the previous values (for restore)."""
        backup = {k: p.detach().clone() for k, p in named_params.items()}
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.dtype))
        return backup

    @torch.no_grad()
    def restore(self, named_params: dict[str, nn.Parameter], backup: dict[str, torch.Tensor]) -> None:
        for k, p in named_params.items():
            p.copy_(backup[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks '{sorted(missing)[0]}'; the checkpoint is for another model/mode")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items() if k in self.shadow}
