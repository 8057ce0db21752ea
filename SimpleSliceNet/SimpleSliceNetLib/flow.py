"""Conditional normalising flow over feature vectors (FrEIA AllInOneBlocks) and its likelihood."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class FlowConfig:
    blocks: int = 8
    clamp: float = 1.9
    hidden_ratio: float = 2.0
    pos_dim: int = 128
    # The paper encodes (h, w) only; adding the slab position lets the flow learn that anatomy
    # differs from the skull base to the vertex.
    pos_depth: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def positional_encoding(h: int, w: int, d: int, dim: int, depth: bool) -> torch.Tensor:
    """Sine/cosine encoding of each (h, w[, d]) grid position: tensor (h, w, d, dim)."""
    parts = 3 if depth else 2
    sizes = [2 * ((dim // parts) // 2)] * parts
    sizes[0] += dim - sum(sizes)  # any remainder goes to the first axis (stays even: dim is even)
    grids = torch.meshgrid(
        torch.arange(h, dtype=torch.float32),
        torch.arange(w, dtype=torch.float32),
        torch.arange(d, dtype=torch.float32),
        indexing="ij",
    )
    codes = []
    for size, position in zip(sizes, grids[:parts], strict=True):
        freq = torch.exp(torch.arange(0, size, 2, dtype=torch.float32) * (-math.log(10000.0) / size))
        angle = position[..., None] * freq
        codes.append(torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2))
    return torch.cat(codes, dim=-1)


def build_flow(dim: int, config: FlowConfig) -> nn.Module:
    """FrEIA SequenceINN of AllInOneBlocks conditioned on a positional code."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if config.pos_dim % 2:
        raise ValueError("pos_dim must be even")
    hidden = int(round(config.hidden_ratio * dim))

    def subnet(dims_in: int, dims_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dims_in, hidden), nn.ReLU(), nn.Linear(hidden, dims_out))

    flow = Ff.SequenceINN(dim)
    for _ in range(config.blocks):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(config.pos_dim,),
            subnet_constructor=subnet,
            affine_clamping=config.clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


_LOG_2PI = math.log(2 * math.pi)


def log_likelihood(flow: nn.Module, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """log p(x) / C for each row of ``features`` (N, C) under the flow with condition ``cond``."""
    z, log_jac = flow(features, c=[cond])
    dim = features.shape[1]
    return (-0.5 * dim * _LOG_2PI - 0.5 * (z**2).sum(dim=1) + log_jac) / dim
