"""LFDN: the latent feature diffusion network of DLSR (docs/METHOD.md section 2), an MLP of residual blocks.

Layout (Yang et al. 2024, section 3.2): SiLU -> Linear(D, W) input projection; sinusoidal timestep embedding ->
Linear -> SiLU -> Linear; N residual blocks [GroupNorm(1) -> SiLU -> Linear(W, W') + Linear(SiLU(temb));
GroupNorm(1) -> SiLU -> Dropout -> zero-init Linear(W', W); residual add]; output GroupNorm(1) -> SiLU ->
zero-init Linear(W, D). Every norm is per sample (no BatchNorm), so a sample's output never depends on its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM's positional encoding).

    Args:
        t: (N,) timesteps (any numeric dtype).
        dim: embedding size.
        max_period: the longest wavelength.

    Returns:
        (N, dim) float32 tensor [cos(t f_i), sin(t f_i)], zero-padded when dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group on (N, C) vectors.

    With a single group GroupNorm normalises each sample over all its channels and applies a per-channel affine,
    which is exactly layer_norm over C; layer_norm is the faster kernel on CPU, so forward uses it. The parameters
    (and the state-dict names) stay those of nn.GroupNorm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """One residual block on vectors, conditioned on the timestep embedding."""

    def __init__(self, width: int, hidden: int, temb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(width)
        self.lin1 = nn.Linear(width, hidden)
        self.temb_proj = nn.Linear(temb_dim, hidden)
        self.norm2 = GroupNorm1(hidden)
        self.dropout = nn.Dropout(dropout)
        self.lin2 = _zero_linear(hidden, width)  # zero-init: each block starts as the identity

    def forward(self, h: Tensor, temb_act: Tensor, index: Tensor | None = None) -> Tensor:
        """h: (N, W); temb_act: SiLU(temb), (U, E) rows per distinct timestep; index: (N,) row of each sample."""
        proj = self.temb_proj(temb_act)
        if index is not None:
            proj = proj.index_select(0, index)
        u = self.lin1(F.silu(self.norm1(h))) + proj  # (U=1 broadcasts over the batch)
        u = self.lin2(self.dropout(F.silu(self.norm2(u))))
        return h + u


class LFDN(nn.Module):
    """Latent feature diffusion network predicting x0 from (x_t, t).

    Args:
        dim: feature width D.
        width: block width W (paper: 2D).
        hidden: inner width W' of each block (paper: W).
        n_blocks: number of residual blocks N (paper: 16).
        temb_dim: timestep embedding size (default W).
        dropout: dropout inside each block (training only).
    """

    def __init__(
        self,
        dim: int,
        width: int | None = None,
        hidden: int | None = None,
        n_blocks: int = 16,
        temb_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim < 1 or n_blocks < 0:
            raise ValueError(f"LFDN needs dim >= 1 and n_blocks >= 0; got dim={dim}, n_blocks={n_blocks}")
        width = int(width or 2 * dim)
        hidden = int(hidden or width)
        temb_dim = int(temb_dim or width)
        self.dim, self.width, self.hidden, self.temb_dim = dim, width, hidden, temb_dim
        self.n_blocks = n_blocks
        self.input_proj = nn.Linear(dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.blocks = nn.ModuleList(ResBlock(width, hidden, temb_dim, dropout) for _ in range(n_blocks))
        self.out_norm = GroupNorm1(width)
        self.out = _zero_linear(width, dim)

    def forward(self, x: Tensor, t: Tensor, *, dedup: bool = True) -> Tensor:
        """Predict x0.

        Args:
            x: (N, D) noisy features x_t.
            t: (N,) integer timesteps in [0, T).
            dedup: compute the timestep path once per distinct timestep (see below); False = per sample.

        Returns:
            (N, D) prediction of x0.
        """
        # Why dedup: the timestep MLP and every block's temb projection depend on t alone, and t takes at most
        # T (=100) integer values. Computing them per distinct timestep and indexing costs U x W x W per block
        # instead of N x W x W: during training (N=256, U<=100) that removes over half of the temb cost, and at
        # scoring time (one t for the whole batch, U=1) it drops one of the three W x W matmuls of every block.
        # The rows are the same numbers the per-sample path computes, so the output does not change.
        if dedup:
            uniq, inverse = torch.unique(t, return_inverse=True)
            index: Tensor | None = None if uniq.numel() == 1 else inverse
            temb = self.time_mlp(timestep_embedding(uniq, self.temb_dim).to(x.dtype))
        else:
            index = None
            temb = self.time_mlp(timestep_embedding(t, self.temb_dim).to(x.dtype))
        temb_act = F.silu(temb)
        h = self.input_proj(F.silu(x))
        for block in self.blocks:
            h = block(h, temb_act, index)
        return self.out(F.silu(self.out_norm(h)))
