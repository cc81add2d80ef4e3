"""The Injectable Realignment Model (IRM).

Architecture from arXiv 2407.03621 ("The Mysterious Case of Neuron 1512"): an MLP that reads the residual
stream after layer 0's attention block and emits one hidden-size vector per injection layer:

    Linear(h, w) ReLU, depth x [Linear(w, w) ReLU], Linear(w, h * n),   w = width_multiplier * h

with h the model's hidden size and n the number of injection layers (paper: depth 3, multiplier 3).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from irm_hpc.errors import ConfigError


class IRM(nn.Module):
    """Injectable Realignment Model.

    Args:
        hidden_size: the frozen model's hidden size h.
        injection_layers: model layer indices that receive a vector (ascending, unique).
        width_multiplier: w = width_multiplier * h (paper: 3).
        depth: number of hidden Linear(w, w) + ReLU blocks (paper: 3).

    Raises:
        ConfigError (a ValueError): empty or duplicated ``injection_layers``, non-positive sizes.
    """

    def __init__(self, hidden_size: int, injection_layers: Sequence[int], width_multiplier: int = 3, depth: int = 3):
        super().__init__()
        layers = [int(i) for i in injection_layers]
        if not layers:
            raise ConfigError("IRM needs at least one injection layer")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"duplicate injection layers: {layers}")
        if hidden_size <= 0 or width_multiplier <= 0 or depth < 0:
            raise ConfigError(f"bad IRM sizes: hidden={hidden_size} width_multiplier={width_multiplier} depth={depth}")
        self.hidden_size = hidden_size
        self.injection_layers = sorted(layers)
        width = width_multiplier * hidden_size
        blocks: list[nn.Module] = [nn.Linear(hidden_size, width), nn.ReLU()]
        for _ in range(depth):
            blocks += [nn.Linear(width, width), nn.ReLU()]
        blocks.append(nn.Linear(width, hidden_size * len(layers)))
        self.net = nn.Sequential(*blocks)

    @property
    def n_layers(self) -> int:
        """Number of injection layers n."""
        return len(self.injection_layers)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Map the post-attention residual of layer 0 to injection vectors.

        Args:
            resid: (batch, seq, hidden) residual stream after layer 0's attention block.

        Returns:
            (batch, seq, n_layers, hidden) injection vectors, one per injection layer (ascending order),
            in the IRM's parameter dtype.
        """
        out = self.net(resid.to(self.net[0].weight.dtype))
        return out.view(*resid.shape[:-1], self.n_layers, self.hidden_size)
