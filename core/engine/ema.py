"""Exponential moving averages of model weights, several decays at once.

For each decay ``d`` and each floating parameter ``p``, one update is

    ema <- d * ema + (1 - d) * p

(Polyak averaging as used by DDPM, EDM, DiT). With ``warmup`` the decay of update ``n``
(counting from 0) is ``min(d, (1 + n) / (10 + n))``, so early averages are not dominated by the
random initialisation. Buffers (e.g. normalisation statistics) and non-floating tensors are
copied, not averaged. Shadows keep the parameters' layout: under FSDP they are sharded like
the parameters, and :meth:`EMA.state_dict` gathers them (a collective every rank must enter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def decay_key(decay: float) -> str:
    """The name a decay is stored under in state dicts and file names (``"0.999"``)."""
    return repr(float(decay))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


class EMA:
    """EMA shadows of ``model``'s parameters and buffers for each decay in ``decays``."""

    def __init__(self, model: nn.Module, decays: Iterable[float] = (0.999,), warmup: bool = False):
        self.decays = [float(d) for d in decays]
        for d in self.decays:
            if not 0.0 < d < 1.0:
                raise ValueError(f"EMA decay must be in (0, 1), got {d!r}")
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadows: dict[str, dict[str, torch.Tensor]] = {
            decay_key(d): self._snapshot(model) for d in self.decays
        }

    @staticmethod
    def _named(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model.named_parameters()
        yield from model.named_buffers()

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self._named(model)}

    def effective_decay(self, decay: float, n: int | None = None) -> float:
        """The decay used by update number ``n`` (default: the next update)."""
        n = self.num_updates if n is None else n
        return min(decay, (1.0 + n) / (10.0 + n)) if self.warmup else decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into every shadow."""
        named = list(self._named(model))
        params = dict(model.named_parameters())
        for d in self.decays:
            shadow = self.shadows[decay_key(d)]
            eff = self.effective_decay(d)
            avg_s, avg_p = [], []
            for n, t in named:
                s = shadow[n]
                if n in params and t.is_floating_point():
                    avg_s.append(s)
                    avg_p.append(t.detach())
                else:
                    s.copy_(t)
            if not avg_s:
                continue
            if any(_is_dtensor(s) for s in avg_s):
                for s, p in zip(avg_s, avg_p):
                    s.mul_(eff).add_(p, alpha=1.0 - eff)
            else:
                torch._foreach_mul_(avg_s, eff)
                torch._foreach_add_(avg_s, avg_p, alpha=1.0 - eff)
        self.num_updates += 1

    def averaged(self, decay: float | None = None, full: bool = True) -> dict[str, torch.Tensor]:
        """The shadow of ``decay`` (default: the first) as ``name -> tensor``; gathered if ``full``."""
        key = decay_key(self.decays[0] if decay is None else decay)
        if key not in self.shadows:
            raise ValueError(f"no EMA with decay {decay!r}; decays are {self.decays}")
        return {n: (_full(t) if full else t) for n, t in self.shadows[key].items()}

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, decay: float | None = None) -> Iterator[nn.Module]:
        """Temporarily load the shadow of ``decay`` into ``model`` (in place); restore exactly on exit."""
        shadow = self.averaged(decay, full=False)
        backup = {}
        with torch.no_grad():
            for n, t in self._named(model):
                backup[n] = t.detach().clone()
                t.copy_(shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in self._named(model):
                    t.copy_(backup[n])

    def state_dict(self) -> dict:
        """Plain dict (weights_only-loadable); DTensor shadows are gathered to full tensors on CPU."""
        return {
            "decays": list(self.decays),
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadows": {k: {n: _full(t).detach().cpu() for n, t in s.items()} for k, s in self.shadows.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore shadows of the decays present in both; others keep their current values."""
        self.num_updates = int(state["num_updates"])
        saved = state["shadows"]
        for key, shadow in self.shadows.items():
            if key not in saved:
                continue
            src = saved[key]
            missing = set(shadow) - set(src)
            if missing:
                raise KeyError(f"EMA state for decay {key} lacks {sorted(missing)[:5]}")
            for n, t in shadow.items():
                v = src[n]
                if _is_dtensor(t):
                    from torch.distributed.tensor import distribute_tensor

                    v = distribute_tensor(v.to(t.device_mesh.device_type), t.device_mesh, t.placements)
                t.copy_(v)
