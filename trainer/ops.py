"""The real method behind a job: dlsr Encoder + FeatureCache + a detector (see job.ModelOps).

The detector is DLSR by default; `ModelSettings.detector` can choose a baseline on the same features
(Mahalanobis, kNN), which the monitor serves like any artifact.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import ModelSettings

import numpy as np

log = logging.getLogger(__name__)

# Hyperparameters that fix the LFDN's shape or the score: a warm start needs them unchanged.
_SHAPE_KEYS = ("n_blocks", "width", "hidden", "temb_dim", "T", "schedule", "score", "t", "ddim_steps")


class DlsrOps:
    """Features through the cache, fit (cold or warm-started from the live LFDN), load with verification.

    Args:
        model: `config.ModelSettings` (encoder, weights, stages, input size, device, batch size, score).
        detector_kwargs: extra detector arguments (TrainerSettings.detector), e.g. n_blocks, epochs for DLSR,
            k for kNN, shrinkage for Mahalanobis.
        refit_epochs: epochs of a warm-started refit (None: a fifth of the full epochs, at least 1).
    """

    def __init__(
        self, model: ModelSettings, detector_kwargs: dict | None = None, refit_epochs: int | None = None
    ) -> None:
        from dlsr.cache import FeatureCache
        from dlsr.devices import resolve_device
        from dlsr.encoder import Encoder

        self.model = model
        self.device = resolve_device(model.device)
        self.encoder = Encoder.create(
            name=model.encoder,
            weights=model.encoder_weights,
            stages=tuple(model.stages),
            input_size=model.input_size,
            device=self.device,
            precision=getattr(model, "precision", "auto"),
            runtime=getattr(model, "runtime", "torch"),
            threads=getattr(model, "runtime_threads", None),
            streams=getattr(model, "runtime_streams", 1),
            export_dir=getattr(model, "export_cache", None),
        )
        self.cache = FeatureCache(model.feature_cache)
        # DLSR_MODEL__* knobs first, then TrainerSettings.detector overrides (e.g. a smaller LFDN for CPU refits).
        # Unset knobs (None) keep the detector's own defaults.
        self.kind = getattr(model, "detector", "dlsr")
        if self.kind == "dlsr":
            base = {k: v for k, v in model.detector_kwargs().items() if v is not None}
        else:  # the DLSR_MODEL__* LFDN knobs mean nothing to a baseline
            base = {"encode_batch_size": model.batch_size}
        self.kwargs = {**base, **(detector_kwargs or {})}
        self.refit_epochs = refit_epochs
        self.last_encoded = 0

    def identity(self) -> dict:
        return self.encoder.identity()

    def features(self, images: Any, *, progress: bool = True) -> np.ndarray:
        res = self.cache.extract(self.encoder, images, batch_size=self.model.batch_size, progress=progress)
        self.last_encoded = res.n_encoded
        if res.failures and len(res.names) != len(images):
            names = ", ".join(f.name for f in res.failures[:5])
            raise RuntimeError(f"{len(res.failures)} vetted images could not be encoded (e.g. {names})")
        return res.features

    def new_detector(self) -> Any:
        from dlsr.base import detector_class

        return detector_class(self.kind)(self.encoder, device=self.device, **self.kwargs)

    def can_warm_start(self, old: Any) -> bool:
        # Only an LFDN continues training; a baseline refits from scratch in seconds.
        if self.kind != "dlsr" or getattr(old, "kind", None) != "dlsr":
            return False
        mine = {k: v for k, v in self.encoder.identity().items() if k != "device"}
        theirs = {k: v for k, v in (old.encoder_identity or {}).items() if k != "device"}
        if mine != theirs:
            log.info("encoder changed since the live model: fitting cold")
            return False
        fresh = self.new_detector().hyperparameters()
        live = old.hyperparameters()
        changed = [k for k in _SHAPE_KEYS if k in fresh and fresh.get(k) != live.get(k)]
        if changed:
            log.info("detector settings %s changed since the live model: fitting cold", changed)
            return False
        return True

    def fit(self, features: np.ndarray, *, warm_from: Any | None, progress: bool = True) -> Any:
        if warm_from is None:
            det = self.new_detector()
            return det.fit(features, progress=progress)
        epochs = self.refit_epochs or max(1, int(getattr(warm_from, "epochs", 5)) // 5)
        # Training settings (lr, batch, EMA) come from the current configuration, the weights from the live model.
        training = ("batch_size", "lr", "weight_decay", "ema_decay", "warmup_steps", "epochs")
        warm_from.config = replace(warm_from.config, **{k: self.kwargs[k] for k in training if k in self.kwargs})
        warm_from.progress = progress
        # A loaded detector warm-starts too: fit(warm_start=True) trains a copy of its frozen scoring weights.
        return warm_from.fit(features, progress=progress, warm_start=True, epochs=epochs)

    def load(self, path: Path) -> Any:
        from dlsr.artifacts import load_detector

        return load_detector(path, device=self.device, encoder=self.encoder)
