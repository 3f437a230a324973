"""An exponential moving average of a model's weights, swapped in for validation and checkpoints.

Training steps on the raw weights; after each step the average moves towards them by (1 - decay),
with decay ramped up as min(decay, (1 + n) / (10 + n)) over the first updates so that the average
does not linger at the initial weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a value in (0, 1), got {decay!r}")
        self.decay, self.updates = decay, 0
        self.params = list(model.parameters())
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights."""
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.current_decay())

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block and its own weights again after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"weight average: expected {len(self.shadow)} tensors, got {len(state['shadow'])}")
        with torch.no_grad():
            for s, x in zip(self.shadow, state["shadow"]):
                s.copy_(x)
        self.updates = int(state["updates"])
