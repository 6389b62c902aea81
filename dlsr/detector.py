"""DLSR, the method of the paper (METHOD.md sections 2-4), behind the `BaseDetector` interface of `dlsr.base`.

An LFDN is trained to denoise the encoder's multi-layer features; an image is scored by how badly its features
are reconstructed (see `dlsr.scores`). The baselines in `dlsr.baselines` share the interface, so everything
downstream (monitor, trainer, benchmarks) can use any of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Unpack

import numpy as np
import torch
from torch import Tensor

from dlsr.base import BaseDetector, BaseOptions, pad_rows, register_detector
from dlsr.diffusion import SCHEDULES, GaussianDiffusion
from dlsr.exceptions import DLSRError, FeatureWidthError, NotFittedError
from dlsr.lfdn import LFDN
from dlsr.scores import SCORES, check_score_name

if TYPE_CHECKING:  # the encoder is only ever passed in; importing it here would load timm for baseline users
    from dlsr.encoder import Encoder


@register_detector
class DLSRDetector(BaseDetector):
    """Diffusion-based layer-wise semantic reconstruction (Yang et al., NeurIPS 2024).

    Args:
        encoder: frozen feature encoder (optional: features-only use needs `boundaries` for MFsim).
        score: "mse", "mfsim5" (all layers, the paper) or "mfsim4" (layers 2..L, the official code).
        t: noise level in [1, T] for scoring (paper Fig. 4: 3..10 is best).
        ddim_steps: DDIM steps from t to 0 (default t, as the official code; 1 = one direct x0 prediction).
        eta: DDIM stochasticity (official code: 1).
        n_draws: noise draws averaged per score (a fixed bank: the same noise for every image).
        n_blocks, width, hidden, temb_dim, dropout: LFDN shape (paper: 16 blocks, W = W' = 2D).
        T, schedule: diffusion steps and beta schedule (paper: 100, "sqrt_linear").
        epochs, batch_size, lr, weight_decay, ema_decay, warmup_steps: training (paper: 150 epochs, batch 256,
            lr 1e-3 x batch/256, AdamW weight decay 0.02, cosine schedule, EMA of the weights).
        seed: seeds the initial weights, the training order and noise, and the scoring noise bank.
        score_amp: also score under bf16 autocast on CUDA (faster, but no longer exactly batch-independent).
        train_amp: train under bf16 autocast (fp32 master weights); None = on CUDA only. On a CPU with
            AVX512-BF16 (e.g. this project's EPYC box) True roughly halves the training time.
        min_batch: tiny scoring batches are zero-padded to this many rows so BLAS uses the same kernel for
            every batch size (batch-size-independent float32 scores on CPU).
        base: device, boundaries, batch sizes, progress (`BaseOptions`, see `BaseDetector`); on CUDA training
            runs under bf16 autocast.
    """

    kind: ClassVar[str] = "dlsr"

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        score: str = "mfsim5",
        t: int = 5,
        ddim_steps: int | None = None,
        eta: float = 1.0,
        n_draws: int = 1,
        n_blocks: int = 16,
        width: int | None = None,
        hidden: int | None = None,
        temb_dim: int | None = None,
        dropout: float = 0.0,
        T: int = 100,
        schedule: str = "sqrt_linear",
        epochs: int = 150,
        batch_size: int = 256,
        lr: float | None = None,
        weight_decay: float = 0.02,
        ema_decay: float = 0.999,
        warmup_steps: int = 0,
        seed: int = 0,
        score_amp: bool = False,
        train_amp: bool | None = None,
        min_batch: int = 16,
        **base: Unpack[BaseOptions],
    ) -> None:
        super().__init__(encoder, **base)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        if T < 1:
            raise ValueError(f"T must be >= 1; got {T}")
        self._check_t(t, ddim_steps, T)
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1; got {n_draws}")
        if not eta >= 0.0:
            raise ValueError(
                f"eta must be >= 0 (0 = deterministic DDIM, 1 = the official sampler); got {eta}"
            )
        if epochs < 0 or batch_size < 1:
            raise ValueError(
                f"need epochs >= 0 and batch_size >= 1; got epochs={epochs}, batch_size={batch_size}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.score_name = check_score_name(score, self.boundaries)
        self.t, self.ddim_steps = int(t), (int(ddim_steps) if ddim_steps is not None else None)
        self.eta, self.n_draws = float(eta), int(n_draws)
        self.n_blocks, self.width, self.hidden, self.temb_dim = int(n_blocks), width, hidden, temb_dim
        self.dropout, self.T, self.schedule = float(dropout), int(T), schedule
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.lr = float(lr) if lr is not None else 1e-3 * batch_size / 256
        self.weight_decay, self.ema_decay = float(weight_decay), float(ema_decay)
        self.warmup_steps, self.seed, self.score_amp = int(warmup_steps), int(seed), bool(score_amp)
        self.train_amp = train_amp
        if min_batch < 1:
            raise ValueError(f"min_batch must be >= 1; got {min_batch}")
        self.min_batch = int(min_batch)
        self.diffusion = GaussianDiffusion(self.T, self.schedule).to(self.device)
        self.model: LFDN | None = None  # the EMA weights: what scores (and what is saved)
        self._raw: LFDN | None = None  # the trained weights, kept for warm starts in this process
        self.history: list[float] = []  # mean training loss per epoch

    @staticmethod
    def _check_t(t: int, ddim_steps: int | None, T: int) -> None:
        if not 1 <= int(t) <= T:
            raise ValueError(f"t must be in [1, T={T}] (paper: 3..10 works best); got {t}")
        if ddim_steps is not None and not 1 <= int(ddim_steps) <= int(t):
            raise ValueError(
                f"ddim_steps must be in [1, t={t}] (1 = a direct x0 prediction); got {ddim_steps}"
            )

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    def _build(self, dim: int) -> LFDN:
        return LFDN(dim, self.width, self.hidden, self.n_blocks, self.temb_dim, self.dropout)

    # -- training ----------------------------------------------------------------------------------------

    def _fit_tensor(
        self,
        x: Tensor,
        *,
        progress: bool,
        warm_start: bool = False,
        epochs: int | None = None,
        lr: float | None = None,
    ) -> None:
        """Train the LFDN with AdamW, a cosine learning-rate schedule and an EMA of the weights.

        Args:
            x: (N, D) features on the device.
            warm_start: continue from the current weights (the trainer's refit) instead of a fresh init.
            epochs, lr: overrides for this call (e.g. a shorter, gentler warm-started refit).
        """
        n, d = int(x.shape[0]), int(x.shape[1])
        epochs = self.epochs if epochs is None else int(epochs)
        lr = self.lr if lr is None else float(lr)
        if warm_start and self.model is not None:
            if self.dim != d:
                raise FeatureWidthError(
                    f"warm start needs D={self.dim} features like the current model; got D'={d}"
                )
            raw = copy.deepcopy(self._raw if self._raw is not None else self.model)
            ema = copy.deepcopy(self.model)
        else:
            # Seeded init without touching the caller's global RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                raw = self._build(d)
            ema = copy.deepcopy(raw)
        # A loaded (or scoring) model has its gradients switched off: the trained copy needs them back.
        raw = raw.to(self.device).train().requires_grad_(True)
        ema = ema.to(self.device).eval().requires_grad_(False)
        params = [p for p in raw.parameters()]
        ema_params = [p for p in ema.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay, foreach=True)
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = max(1, epochs * steps_per_epoch)
        warmup = self.warmup_steps

        def lr_factor(step: int) -> float:
            # Linear warm-up (optional), then cosine decay to 0 over the run (the paper's cosine schedule).
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen_cpu = torch.Generator().manual_seed(self.seed + 1)
        gen_dev = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        amp = self.device.type == "cuda" if self.train_amp is None else bool(self.train_amp)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs * steps_per_epoch, desc="fit LFDN", unit="step")
        step = 0
        history: list[float] = []
        try:
            # Dropout draws from the global RNG: fork it so training is reproducible and leaves callers alone.
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + 3)
                for epoch in range(epochs):
                    perm = torch.randperm(n, generator=gen_cpu).to(self.device)
                    loss_sum = torch.zeros((), device=self.device)
                    for i in range(0, n, self.batch_size):
                        xb = x.index_select(0, perm[i : i + self.batch_size])
                        b = xb.shape[0]
                        k = torch.randint(0, self.T, (b,), generator=gen_dev, device=self.device)
                        noise = torch.randn(xb.shape, generator=gen_dev, device=self.device)
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                            loss = self.diffusion.loss(raw, xb, k, noise)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        # EMA with a warm-up (decay (1+s)/(10+s) early on) so short runs are not dominated by
                        # the random initial weights.
                        decay = min(self.ema_decay, (1.0 + step) / (10.0 + step))
                        with torch.no_grad():
                            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
                        loss_sum += loss.detach() * b
                        step += 1
                        if bar is not None:
                            bar.update(1)
                    mean_loss = float(loss_sum) / n
                    if not math.isfinite(mean_loss):
                        raise DLSRError(
                            f"LFDN training diverged (loss {mean_loss} in epoch {epoch + 1}); lower lr (now {lr:g})"
                        )
                    history.append(mean_loss)
                    if bar is not None:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4g}")
        finally:
            if bar is not None:
                bar.close()
        self._raw, self.model = raw.eval(), ema
        self.history = (self.history if warm_start else []) + history

    # -- scoring -----------------------------------------------------------------------------------------

    def noise_bank(self, t: int, ddim_steps: int, n_draws: int | None = None) -> Tensor:
        """The fixed noise of the scorer: (K, n_noise, D), drawn once from the seed, the same for every image.

        Noise shared by all images (rather than drawn per call, or per batch) is what makes a score a function of
        the image alone: independent of batch size and batch composition, and reproducible across calls.
        """
        if self.dim is None:
            raise NotFittedError("the noise bank needs the feature width: call fit() first")
        k = self.n_draws if n_draws is None else int(n_draws)
        need = self.diffusion.n_noise(t, ddim_steps, self.eta)
        gen = torch.Generator().manual_seed(self.seed + 7919 * t + 104_729 * ddim_steps)
        bank = torch.randn((k, need, self.dim), generator=gen, dtype=torch.float32)
        return bank.to(self.device)

    def _settings(self, t: int | None, ddim_steps: int | None) -> tuple[int, int]:
        t = self.t if t is None else int(t)
        steps = ddim_steps if ddim_steps is not None else (self.ddim_steps if t == self.t else None)
        steps = t if steps is None else min(int(steps), t)
        self._check_t(t, steps, self.T)
        return t, steps

    @torch.no_grad()
    def reconstruct(
        self, z0: Tensor, *, t: int | None = None, ddim_steps: int | None = None, draw: int = 0
    ) -> Tensor:
        """Noise (N, D) features to level t and reconstruct them with DDIM using noise draw `draw` of the bank."""
        self._require_fitted()
        assert self.model is not None
        t, steps = self._settings(t, ddim_steps)
        bank = self.noise_bank(t, steps, n_draws=max(self.n_draws, draw + 1))[draw]
        n = z0.shape[0]
        z0 = pad_rows(z0, self.min_batch)  # batch-size-independent rounding (see pad_rows)
        amp = self.device.type == "cuda" and self.score_amp
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            return self.diffusion.reconstruct(self.model, z0, t, steps, self.eta, bank).float()[:n]

    @torch.no_grad()
    def _score_tensor(
        self, x: Tensor, *, score: str | None = None, t: int | None = None, ddim_steps: int | None = None
    ) -> Tensor:
        return self._score_many(x, (score or self.score_name,), t=t, ddim_steps=ddim_steps)[
            score or self.score_name
        ]

    @torch.no_grad()
    def _score_many(
        self, x: Tensor, names: Sequence[str], *, t: int | None, ddim_steps: int | None
    ) -> dict[str, Tensor]:
        assert self.boundaries is not None
        for name in names:
            check_score_name(name, self.boundaries)
        out = {name: torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) for name in names}
        for draw in range(self.n_draws):
            rec = self.reconstruct(x, t=t, ddim_steps=ddim_steps, draw=draw)
            for name in names:
                out[name] += SCORES[name](x, rec, self.boundaries)
        return {name: v / self.n_draws for name, v in out.items()}

    def score_all(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        scores: Sequence[str] = ("mse", "mfsim5", "mfsim4"),
        t: int | None = None,
        ddim_steps: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Several scores from one reconstruction pass (benchmarks and ablations): name -> (N,) float64."""
        self._require_fitted()
        x = self._inputs(features, images, False, fitting=False)
        bs = int(batch_size or self.score_batch_size)
        out = {name: np.empty(x.shape[0], dtype=np.float64) for name in scores}
        for i in range(0, x.shape[0], bs):
            part = self._score_many(x[i : i + bs], tuple(scores), t=t, ddim_steps=ddim_steps)
            for name, v in part.items():
                out[name][i : i + bs] = v.cpu().numpy()
        return out

    # -- persistence -------------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "score": self.score_name,
            "t": self.t,
            "ddim_steps": self.ddim_steps,
            "eta": self.eta,
            "n_draws": self.n_draws,
            "n_blocks": self.n_blocks,
            "width": self.width,
            "hidden": self.hidden,
            "temb_dim": self.temb_dim,
            "dropout": self.dropout,
            "T": self.T,
            "schedule": self.schedule,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "ema_decay": self.ema_decay,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            "score_amp": self.score_amp,
            "train_amp": self.train_amp,
            "min_batch": self.min_batch,
            **super().hyperparameters(),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        self._require_fitted()
        assert self.model is not None
        return {f"lfdn.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        assert self.dim is not None
        model = self._build(self.dim)
        state = {k.removeprefix("lfdn."): v for k, v in tensors.items() if k.startswith("lfdn.")}
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._raw = None
