"""Gaussian diffusion on feature vectors: schedule, forward noising, x0-prediction loss, DDIM reconstruction.

Notation (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"): timestep indices k = 0..T-1, beta_k the schedule,
alpha_bar_k = prod_{i<=k} (1 - beta_i). "Noise level t" (t = 1..T) in the scorer means t forward steps, i.e.
index k = t - 1: t = 1 adds only beta_0 of noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


def sqrt_linear_betas(T: int, beta_start: float = 0.0015, beta_end: float = 0.0195) -> np.ndarray:
    """betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2: the DLSR / latent-diffusion schedule."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. 2020, section 4)."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "sqrt_linear": sqrt_linear_betas,
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def make_betas(name: str, T: int) -> np.ndarray:
    """The (T,) float64 betas of the named schedule; an unknown name is a ValueError listing the known ones."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if T < 1:
        raise ValueError(f"T must be >= 1; got {T}")
    return SCHEDULES[name](T)


def ddim_timesteps(t: int, steps: int) -> list[int]:
    """Indices visited by DDIM from noise level t down to 0: `steps` evenly spaced values from t-1 to 0.

    steps = t gives t-1, t-2, ..., 0 (the official code); steps = 1 gives [t-1] (one direct x0 prediction).
    """
    if not 1 <= steps <= t:
        raise ValueError(f"ddim_steps must be in [1, t={t}]; got {steps}")
    if steps == 1:
        return [t - 1]
    # floor(x + 0.5) is monotone and the spacing is >= 1, so the indices are distinct and end at 0.
    return [int(np.floor(v + 0.5)) for v in np.linspace(t - 1, 0, steps)]


def q_sample(x0: Tensor, sqrt_ab: Tensor, sqrt_1m_ab: Tensor, noise: Tensor) -> Tensor:
    """Forward process q(x_k | x_0) = N(sqrt(ab_k) x0, (1 - ab_k) I) (DDPM eq. 4), reparameterised."""
    return sqrt_ab * x0 + sqrt_1m_ab * noise


def ddim_step(
    x_k: Tensor, x0_hat: Tensor, ab_k: float, ab_prev: float, eta: float, noise: Tensor | None
) -> Tensor:
    """One DDIM update x_k -> x_prev given the predicted x0 (Song et al. 2021, eq. 12 and eq. 16 for sigma).

    eps_hat = (x_k - sqrt(ab_k) x0_hat) / sqrt(1 - ab_k);
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_k)) sqrt(1 - ab_k / ab_prev);
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma noise.
    """
    eps_hat = (x_k - ab_k**0.5 * x0_hat) / (1.0 - ab_k) ** 0.5
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_k)) ** 0.5 * (1.0 - ab_k / ab_prev) ** 0.5
    out = ab_prev**0.5 * x0_hat + max(1.0 - ab_prev - sigma**2, 0.0) ** 0.5 * eps_hat
    if sigma > 0.0 and noise is not None:
        out = out + sigma * noise
    return out


class GaussianDiffusion(nn.Module):
    """The schedule as buffers plus the training loss and the DDIM reconstruction used for scoring.

    Args:
        T: number of diffusion steps (paper: 100).
        schedule: name in SCHEDULES (paper: "sqrt_linear" from 0.0015 to 0.0195).
    """

    def __init__(self, T: int = 100, schedule: str = "sqrt_linear") -> None:
        super().__init__()
        betas = make_betas(schedule, T)
        ab = np.cumprod(1.0 - betas)
        self.T, self.schedule = T, schedule
        # Float64 copies on the host for the scalar DDIM coefficients (exact, device-independent).
        self._ab = ab
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32), persistent=False)
        self.register_buffer("alphas_cumprod", torch.tensor(ab, dtype=torch.float32), persistent=False)
        self.register_buffer("sqrt_ab", torch.tensor(np.sqrt(ab), dtype=torch.float32), persistent=False)
        self.register_buffer(
            "sqrt_1m_ab", torch.tensor(np.sqrt(1.0 - ab), dtype=torch.float32), persistent=False
        )

    def loss(self, model: nn.Module, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """L2 loss of the x0 prediction at indices k (DDPM's simple loss with x0 as the target)."""
        x_k = q_sample(x0, self.sqrt_ab[k][:, None], self.sqrt_1m_ab[k][:, None], noise)
        pred = model(x_k, k)
        return torch.mean((pred.float() - x0) ** 2)

    def n_noise(self, t: int, steps: int, eta: float) -> int:
        """How many (D,) noise vectors a reconstruction consumes: one to noise, one per stochastic DDIM step."""
        return 1 + (steps - 1 if eta > 0 else 0)

    @torch.no_grad()
    def reconstruct(
        self, model: nn.Module, x0: Tensor, t: int, steps: int, eta: float, noise: Tensor
    ) -> Tensor:
        """Noise x0 to level t, then run DDIM back to 0 and return the reconstruction of x0.

        Args:
            model: network predicting x0 from (x_k, k).
            x0: (N, D) clean features.
            t: noise level in [1, T] (index t - 1).
            steps: DDIM steps in [1, t].
            eta: DDIM stochasticity (0 = deterministic path, 1 = the official code's DDPM-like sampler).
            noise: (n_noise, D) or (n_noise, N, D) noise; the same (D,) vector for every image keeps each image's
                score independent of the batch it comes in.

        Returns:
            (N, D) reconstruction.
        """
        if not 1 <= t <= self.T:
            raise ValueError(f"t must be in [1, T={self.T}]; got {t}")
        seq = ddim_timesteps(t, steps)
        need = self.n_noise(t, steps, eta)
        if noise.shape[0] < need:
            raise ValueError(f"reconstruction needs {need} noise vectors; got {noise.shape[0]}")
        n = x0.shape[0]
        k0 = seq[0]
        x = q_sample(x0, float(self._ab[k0] ** 0.5), float((1.0 - self._ab[k0]) ** 0.5), noise[0])
        x0_hat = x
        for i, k in enumerate(seq):
            kk = torch.full((n,), k, dtype=torch.long, device=x0.device)
            x0_hat = model(x, kk).float()
            if i + 1 == len(seq):
                break
            k_prev = seq[i + 1]
            eps = noise[1 + i] if eta > 0 else None
            x = ddim_step(x, x0_hat, float(self._ab[k]), float(self._ab[k_prev]), eta, eps)
        return x0_hat
