"""DLSR, the method of the paper (docs/METHOD.md sections 2-4), behind the `BaseDetector` interface.

An LFDN is trained to denoise the encoder's multi-layer features; an image is scored by how badly its features
are reconstructed (see `dlsr.scores`). The baselines in `dlsr.baselines` share the interface, so everything
downstream (monitor, trainer, benchmarks) can use any of them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from dlsr.base import BaseDetector, pad_rows, register_detector
from dlsr.diffusion import SCHEDULES, GaussianDiffusion
from dlsr.exceptions import DLSRError, FeatureWidthError, NotFittedError
from dlsr.lfdn import LFDN
from dlsr.scores import SCORES, STAGE_KIND, STAGE_SCORES, check_score_name

if TYPE_CHECKING:  # the encoder is only ever passed in; importing it here would load timm for baseline users
    from dlsr.encoder import Encoder


def _check_t(t: int, ddim_steps: int | None, T: int) -> None:
    if not 1 <= int(t) <= T:
        raise ValueError(f"t must be in [1, T={T}] (paper: 3..10 works best); got {t}")
    if ddim_steps is not None and not 1 <= int(ddim_steps) <= int(t):
        raise ValueError(f"ddim_steps must be in [1, t={t}] (1 = a direct x0 prediction); got {ddim_steps}")


@dataclass(frozen=True)
class FitEstimate:
    """`DLSRDetector.estimate_fit`: training steps of the fit, measured seconds per step, their product."""

    steps: int
    step_s: float
    seconds: float
    probe_steps: int
    epochs: int

    def line(self, config: DLSRConfig, device: str) -> str:
        """One line for a person about to wait: the LFDN size, the step count and the estimate."""
        width = config.width if config.width is not None else "2D"
        return (
            f"estimated LFDN fit: {_duration(self.seconds)} ({self.steps} steps x {self.step_s * 1000:.0f} ms, "
            f"timed over {self.probe_steps} probe steps on {device}; {config.n_blocks} blocks, width {width}, "
            f"{self.epochs} epochs)"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class DLSRConfig:
    """Every hyperparameter of DLSR; the defaults are the paper's LFDN (docs/METHOD.md section 2).

    Change one with `dataclasses.replace(DLSRConfig(), n_blocks=8)`. Invalid values are refused here; that the
    score fits the layer layout is checked by the detector, which knows the layout.

    Attributes:
        score: "mse", "mfsim5" (all layers, the paper) or "mfsim4" (layers 2..L, the official code).
        t: noise level in [1, T] for scoring (paper Fig. 4: 3..10 is best).
        ddim_steps: DDIM steps from t to 0 (default t, as the official code; 1 = one direct x0 prediction).
        eta: DDIM stochasticity (official code: 1).
        n_draws: noise draws averaged per score (a fixed bank: the same noise for every image).
        n_blocks, width, hidden, temb_dim, dropout: LFDN shape (paper: 16 blocks, W = W' = 2D).
        T, schedule: diffusion steps and beta schedule (paper: 100, "sqrt_linear").
        epochs, batch_size, lr, weight_decay, ema_decay, warmup_steps: training (paper: 150 epochs, batch 256,
            lr 1e-3 x batch/256 (lr=None), AdamW weight decay 0.02, cosine schedule, EMA of the weights).
        seed: seeds the initial weights, the training order and noise, and the scoring noise bank.
        score_amp: also score under bf16 autocast on CUDA (faster, but no longer exactly batch-independent).
        train_amp: train under bf16 autocast (fp32 master weights); None = on CUDA only. On a CPU with
            AVX512-BF16 (e.g. this project's EPYC box) True roughly halves the training time.
        min_batch: tiny scoring batches are zero-padded to this many rows so BLAS uses the same kernel for
            every batch size (batch-size-independent float32 scores on CPU).
    """

    score: str = "mfsim5"
    t: int = 5
    ddim_steps: int | None = None
    eta: float = 1.0
    n_draws: int = 1
    n_blocks: int = 16
    width: int | None = None
    hidden: int | None = None
    temb_dim: int | None = None
    dropout: float = 0.0
    T: int = 100
    schedule: str = "sqrt_linear"
    epochs: int = 150
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float = 0.02
    ema_decay: float = 0.999
    warmup_steps: int = 0
    seed: int = 0
    score_amp: bool = False
    train_amp: bool | None = None
    min_batch: int = 16

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}")
        if self.T < 1:
            raise ValueError(f"T must be >= 1; got {self.T}")
        _check_t(self.t, self.ddim_steps, self.T)
        if self.n_draws < 1:
            raise ValueError(f"n_draws must be >= 1; got {self.n_draws}")
        if not self.eta >= 0.0:
            raise ValueError(
                f"eta must be >= 0 (0 = deterministic DDIM, 1 = the official sampler); got {self.eta}"
            )
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(
                f"need epochs >= 0 and batch_size >= 1; got epochs={self.epochs}, batch_size={self.batch_size}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        check_score_name(self.score)
        if self.min_batch < 1:
            raise ValueError(f"min_batch must be >= 1; got {self.min_batch}")

    def resolved(self) -> DLSRConfig:
        """The config a detector keeps (and saves): numbers in their canonical types, lr=None made explicit."""
        return replace(
            self,
            t=int(self.t),
            ddim_steps=None if self.ddim_steps is None else int(self.ddim_steps),
            eta=float(self.eta),
            n_draws=int(self.n_draws),
            n_blocks=int(self.n_blocks),
            dropout=float(self.dropout),
            T=int(self.T),
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            lr=float(self.lr) if self.lr is not None else 1e-3 * self.batch_size / 256,
            weight_decay=float(self.weight_decay),
            ema_decay=float(self.ema_decay),
            warmup_steps=int(self.warmup_steps),
            seed=int(self.seed),
            score_amp=bool(self.score_amp),
            min_batch=int(self.min_batch),
        )


_CONFIG_FIELDS = frozenset(f.name for f in fields(DLSRConfig))


class _ConfigField:
    """A DLSRConfig field as a detector attribute (the API before DLSRConfig): reads `detector.config`, and
    assigning it replaces the config (validated)."""

    def __init__(self, field: str = "") -> None:
        self.field = field  # "" = the attribute's own name (set by __set_name__)

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = self.field or name

    def __get__(self, det: DLSRDetector | None, owner: type | None = None) -> Any:
        return self if det is None else getattr(det.config, self.field)

    def __set__(self, det: DLSRDetector, value: Any) -> None:
        det.config = replace(det.config, **{self.field: value})


@register_detector
class DLSRDetector(BaseDetector):
    """Diffusion-based layer-wise semantic reconstruction (Yang et al., NeurIPS 2024).

    `DLSRDetector(config=DLSRConfig(n_blocks=8))` and `DLSRDetector(n_blocks=8)` build the same detector.

    Args:
        encoder: frozen feature encoder (optional: features-only use needs `boundaries` for MFsim).
        config: the hyperparameters (default `DLSRConfig()`, the paper's).
        options: DLSRConfig fields, which replace those of `config`, and the base options (device, boundaries,
            batch sizes, progress: `BaseOptions`, see `BaseDetector`). On CUDA training runs under bf16 autocast.
    """

    kind: ClassVar[str] = "dlsr"

    # The hyperparameters as attributes, as before DLSRConfig; `score_name` because `score` is the scoring method.
    score_name = _ConfigField("score")
    t = _ConfigField()
    ddim_steps = _ConfigField()
    eta = _ConfigField()
    n_draws = _ConfigField()
    n_blocks = _ConfigField()
    width = _ConfigField()
    hidden = _ConfigField()
    temb_dim = _ConfigField()
    dropout = _ConfigField()
    T = _ConfigField()
    schedule = _ConfigField()
    epochs = _ConfigField()
    batch_size = _ConfigField()
    lr = _ConfigField()
    weight_decay = _ConfigField()
    ema_decay = _ConfigField()
    warmup_steps = _ConfigField()
    seed = _ConfigField()
    score_amp = _ConfigField()
    train_amp = _ConfigField()
    min_batch = _ConfigField()

    def __init__(
        self, encoder: Encoder | None = None, *, config: DLSRConfig | None = None, **options: Any
    ) -> None:
        hyper = {name: options.pop(name) for name in _CONFIG_FIELDS & options.keys()}
        super().__init__(encoder, **options)  # the rest are base options (a wrong name is a TypeError there)
        self._config = self._checked(replace(config or DLSRConfig(), **hyper))
        self.diffusion = GaussianDiffusion(self._config.T, self._config.schedule).to(self.device)
        self.model: LFDN | None = None  # the EMA weights: what scores (and what is saved)
        self._raw: LFDN | None = None  # the trained weights, kept for warm starts in this process
        self.history: list[float] = []  # mean training loss per epoch

    @property
    def config(self) -> DLSRConfig:
        """The hyperparameters in force (lr resolved).

        Assign a new config between fits to change training settings, e.g. `replace(det.config, epochs=5)`; the
        LFDN shape fields (n_blocks, width, hidden, temb_dim) must stay those of a fitted model.
        """
        return self._config

    @config.setter
    def config(self, config: DLSRConfig) -> None:
        config = self._checked(config)
        if (config.T, config.schedule) != (self._config.T, self._config.schedule):
            self.diffusion = GaussianDiffusion(config.T, config.schedule).to(self.device)
        self._config = config

    def _checked(self, config: DLSRConfig) -> DLSRConfig:
        check_score_name(config.score, self.boundaries)  # mfsim4 needs at least 2 layers
        return config.resolved()

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    @property
    def has_stage_scores(self) -> bool:
        return self.is_fitted and self.boundaries is not None

    def _build(self, dim: int) -> LFDN:
        c = self.config
        return LFDN(dim, c.width, c.hidden, c.n_blocks, c.temb_dim, c.dropout)

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
        cfg = self.config
        n, d = int(x.shape[0]), int(x.shape[1])
        epochs = cfg.epochs if epochs is None else int(epochs)
        lr = cfg.lr if lr is None else float(lr)
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
                torch.manual_seed(cfg.seed)
                raw = self._build(d)
            ema = copy.deepcopy(raw)
        # A loaded (or scoring) model has its gradients switched off: the trained copy needs them back.
        raw = raw.to(self.device).train().requires_grad_(True)
        ema = ema.to(self.device).eval().requires_grad_(False)
        params = [p for p in raw.parameters()]
        ema_params = [p for p in ema.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, foreach=True)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = max(1, epochs * steps_per_epoch)
        warmup = cfg.warmup_steps

        def lr_factor(step: int) -> float:
            # Linear warm-up (optional), then cosine decay to 0 over the run (the paper's cosine schedule).
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        gen_cpu = torch.Generator().manual_seed(cfg.seed + 1)
        gen_dev = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        amp = self.device.type == "cuda" if cfg.train_amp is None else bool(cfg.train_amp)
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
                torch.manual_seed(cfg.seed + 3)
                for epoch in range(epochs):
                    perm = torch.randperm(n, generator=gen_cpu).to(self.device)
                    loss_sum = torch.zeros((), device=self.device)
                    for i in range(0, n, cfg.batch_size):
                        xb = x.index_select(0, perm[i : i + cfg.batch_size])
                        b = xb.shape[0]
                        k = torch.randint(0, cfg.T, (b,), generator=gen_dev, device=self.device)
                        noise = torch.randn(xb.shape, generator=gen_dev, device=self.device)
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                            loss = self.diffusion.loss(raw, xb, k, noise)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        # EMA with a warm-up (decay (1+s)/(10+s) early on) so short runs are not dominated by
                        # the random initial weights.
                        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
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

    def estimate_fit(
        self, n_samples: int, dim: int, *, epochs: int | None = None, probe_steps: int = 3, budget_s: float = 2.0
    ) -> FitEstimate:
        """How long `fit` on (n_samples, dim) features would take here: a timed probe of the real training step.

        Trains a throw-away LFDN of this config's shape on random features (the same `_fit_tensor` code, device
        and autocast as a fit): one warm-up step, then up to `probe_steps` timed steps, fewer when the warm-up
        says they would take longer than `budget_s`; the time per step times the fit's step count. The detector
        itself is left untouched. `epochs`: of the fit to estimate (default the config's; a warm refit's fewer).
        """
        cfg = self.config
        epochs = int(cfg.epochs if epochs is None else epochs)
        total = epochs * math.ceil(int(n_samples) / cfg.batch_size)
        probe = copy.copy(self)  # shares the diffusion buffers; `_fit_tensor` only rebinds model, _raw, history
        probe.model = probe._raw = None
        probe.history = []
        gen = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        x = torch.randn((cfg.batch_size, int(dim)), generator=gen).to(self.device)
        probe._fit_tensor(x, progress=False, epochs=1)  # warm-up: allocations, kernel choice
        self._sync()
        warm = time.perf_counter() - t0
        k = max(1, min(int(probe_steps), int(budget_s / max(warm, 1e-3))))
        x = torch.randn((cfg.batch_size * k, int(dim)), generator=gen).to(self.device)
        t0 = time.perf_counter()
        probe._fit_tensor(x, progress=False, epochs=1)
        self._sync()
        step_s = (time.perf_counter() - t0) / k
        return FitEstimate(steps=total, step_s=step_s, seconds=total * step_s, probe_steps=k, epochs=epochs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- scoring -----------------------------------------------------------------------------------------

    def noise_bank(self, t: int, ddim_steps: int, n_draws: int | None = None) -> Tensor:
        """The fixed noise of the scorer: (K, n_noise, D), drawn once from the seed, the same for every image.

        Noise shared by all images (rather than drawn per call, or per batch) is what makes a score a function of
        the image alone: independent of batch size and batch composition, and reproducible across calls.
        """
        if self.dim is None:
            raise NotFittedError("the noise bank needs the feature width: call fit() first")
        k = self.config.n_draws if n_draws is None else int(n_draws)
        need = self.diffusion.n_noise(t, ddim_steps, self.config.eta)
        gen = torch.Generator().manual_seed(self.config.seed + 7919 * t + 104_729 * ddim_steps)
        bank = torch.randn((k, need, self.dim), generator=gen, dtype=torch.float32)
        return bank.to(self.device)

    def _settings(self, t: int | None, ddim_steps: int | None) -> tuple[int, int]:
        cfg = self.config
        t = cfg.t if t is None else int(t)
        steps = ddim_steps if ddim_steps is not None else (cfg.ddim_steps if t == cfg.t else None)
        steps = t if steps is None else min(int(steps), t)
        _check_t(t, steps, cfg.T)
        return t, steps

    @torch.no_grad()
    def reconstruct(
        self, z0: Tensor, *, t: int | None = None, ddim_steps: int | None = None, draw: int = 0
    ) -> Tensor:
        """Noise (N, D) features to level t and reconstruct them with DDIM using noise draw `draw` of the bank."""
        self._require_fitted()
        assert self.model is not None
        t, steps = self._settings(t, ddim_steps)
        cfg = self.config
        bank = self.noise_bank(t, steps, n_draws=max(cfg.n_draws, draw + 1))[draw]
        n = z0.shape[0]
        z0 = pad_rows(z0, cfg.min_batch)  # batch-size-independent rounding (see pad_rows)
        amp = self.device.type == "cuda" and cfg.score_amp
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            return self.diffusion.reconstruct(self.model, z0, t, steps, cfg.eta, bank).float()[:n]

    @torch.no_grad()
    def _score_tensor(
        self, x: Tensor, *, score: str | None = None, t: int | None = None, ddim_steps: int | None = None
    ) -> Tensor:
        name = score or self.config.score
        return self._score_many(x, (name,), t=t, ddim_steps=ddim_steps)[name]

    @torch.no_grad()
    def _score_tensor_stages(
        self, x: Tensor, *, score: str | None = None, t: int | None = None, ddim_steps: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The score and its per-layer errors (`dlsr.scores.STAGE_SCORES`) from the same reconstruction."""
        name = score or self.config.score
        out = self._score_many(x, (name,), t=t, ddim_steps=ddim_steps, stages=True)
        return out[name], out[f"{name}:stages"]

    @torch.no_grad()
    def _score_many(
        self, x: Tensor, names: Sequence[str], *, t: int | None, ddim_steps: int | None, stages: bool = False
    ) -> dict[str, Tensor]:
        """name -> (N,) scores from one reconstruction per draw; with `stages`, also "<name>:stages" -> (N, S)."""
        assert self.boundaries is not None
        for name in names:
            check_score_name(name, self.boundaries)
        out = {name: torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) for name in names}
        n_layers = len(self.boundaries) - 1
        kinds = {STAGE_KIND[name] for name in names} if stages else set()
        per_stage = {k: torch.zeros((x.shape[0], n_layers), dtype=torch.float64, device=x.device) for k in kinds}
        n_draws = self.config.n_draws
        for draw in range(n_draws):
            rec = self.reconstruct(x, t=t, ddim_steps=ddim_steps, draw=draw)
            for name in names:
                out[name] += SCORES[name](x, rec, self.boundaries)
            for kind in kinds:
                per_stage[kind] += STAGE_SCORES[kind](x, rec, self.boundaries)
        result = {name: v / n_draws for name, v in out.items()}
        if stages:
            result |= {f"{name}:stages": per_stage[STAGE_KIND[name]] / n_draws for name in names}
        return result

    def score_all(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        scores: Sequence[str] = ("mse", "mfsim5", "mfsim4"),
        t: int | None = None,
        ddim_steps: int | None = None,
        batch_size: int | None = None,
        stages: bool = False,
    ) -> dict[str, np.ndarray]:
        """Several scores from one reconstruction pass (benchmarks and ablations): name -> (N,) float64.

        With `stages`, also "<name>:stages" -> (N, S) float64, the per-layer errors behind each score (as
        `score_stages(score=name)` gives them).
        """
        self._require_fitted()
        x = self._inputs(features, images, False, fitting=False)
        bs = int(batch_size or self.score_batch_size)
        out = {name: np.empty(x.shape[0], dtype=np.float64) for name in scores}
        if stages:
            assert self.boundaries is not None
            n_layers = len(self.boundaries) - 1
            out |= {f"{name}:stages": np.empty((x.shape[0], n_layers), dtype=np.float64) for name in scores}
        for i in range(0, x.shape[0], bs):
            part = self._score_many(x[i : i + bs], tuple(scores), t=t, ddim_steps=ddim_steps, stages=stages)
            for name, v in part.items():
                out[name][i : i + bs] = v.cpu().numpy()
        return out

    # -- persistence -------------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {**asdict(self.config), **super().hyperparameters()}

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
