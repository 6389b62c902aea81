"""Inference runtimes for the encoder's backbone: torch (eager), OpenVINO and ONNX Runtime (CPU).

Only the backbone's `features_only` forward runs in a runtime: pixels (N, 3, S, S) -> the L stage maps. Pooling
and the per-sample, per-stage z-score stay in torch fp32 (`Encoder.encode_pixels`), so every runtime computes the
features the same way after the backbone (docs/METHOD.md section 1).

A non-torch runtime runs an export of the backbone made once from the timm model (`torch.onnx.export`, dynamic
batch axis) and cached on disk:

    <export_dir>/<encoder name>-<key[:16]>-<runtime>/export.json      what the key was made of
    <export_dir>/<encoder name>-<key[:16]>-<runtime>/model.onnx       onnxruntime
    <export_dir>/<encoder name>-<key[:16]>-<runtime>/model.xml|.bin   openvino (IR converted from the ONNX file,
                                                                      weights kept in fp32)

The key is the sha256 of the torch encoder identity (weights sha256, stages, input size, ...) plus the runtime,
its version, the torch version and the ONNX opset: upgrading either package makes a new export, never a stale
one. A directory is written under a temporary name and renamed into place (atomic; a concurrent writer that
loses the race discards its copy). Nothing is ever downloaded: the export is made from the local torch model.

Features from another runtime differ from torch's by up to ~1e-5 (other kernels, other summation orders), so the
encoder identity carries the runtime when it is not torch and such features are cached and calibrated apart
(`tests/dlsr/test_runtimes.py` states the parity bounds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

RUNTIMES = ("torch", "openvino", "onnxruntime")
EXPORT_VERSION = 1
OPSET = 17
DEFAULT_EXPORT_DIR = Path(".cache/dlsr/exports")
_PIP = "pip install 'dlsr-monitor[cpu-runtimes]' (or pip install onnx onnxruntime openvino)"


class RuntimeUnavailableError(RuntimeError):
    """The requested runtime is not installed or cannot run this configuration (message names the fix)."""


class Runtime(Protocol):
    """Runs the backbone: normalised pixels (N, 3, S, S) float32 -> one (N, C_l, H_l, W_l) float32 map per stage."""

    name: str

    def run(self, pixels: np.ndarray) -> list[np.ndarray]: ...

    def describe(self) -> dict: ...


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {name!r}")
    return name


def runtime_version(name: str) -> str:
    """Installed version of a runtime's package ('' when it is not installed)."""
    check_runtime(name)
    if name == "torch":
        return torch.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def default_threads() -> int:
    """Intra-op threads of a runtime when none are given: torch's (its default is the number of physical cores)."""
    return max(1, int(torch.get_num_threads()))


# ---- export -------------------------------------------------------------------------------------------------


def export_key(identity: dict, runtime: str) -> dict:
    """What an export depends on: the torch encoder identity, the runtime and its version, torch, the opset."""
    base = {k: v for k, v in identity.items() if k not in ("runtime", "precision")}
    return {
        "export_version": EXPORT_VERSION,
        "identity": base,
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "torch": torch.__version__,
        "opset": OPSET,
    }


def export_directory(export_dir: str | Path, name: str, identity: dict, runtime: str) -> Path:
    key = export_key(identity, runtime)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Path(export_dir) / f"{name}-{digest[:16]}-{runtime}"


def export_onnx(model: torch.nn.Module, input_size: int, path: str | Path) -> list[str]:
    """Export a timm `features_only` backbone (fp32, CPU) to ONNX with a dynamic batch axis; returns output names."""
    model = model.eval()
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise RuntimeUnavailableError("export the backbone from a CPU encoder (device='cpu')")
    x = torch.zeros((2, 3, input_size, input_size), dtype=torch.float32)
    with torch.inference_mode():
        n_out = len(model(x))
    outputs = [f"stage{i}" for i in range(n_out)]
    axes = {"pixels": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript); it exports
        # these convolutional backbones exactly and needs nothing beyond torch and onnx.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["pixels"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return outputs


def ensure_export(
    model: torch.nn.Module, *, name: str, identity: dict, input_size: int, runtime: str, export_dir: str | Path
) -> Path:
    """The cached export directory for (identity, runtime, versions); made once, atomically."""
    if runtime == "torch":
        raise ValueError("the torch runtime runs the model itself: nothing to export")
    if not runtime_version(runtime):
        raise RuntimeUnavailableError(f"runtime {runtime!r} is not installed: {_PIP}")
    target = export_directory(export_dir, name, identity, runtime)
    if (target / "export.json").is_file():
        return target
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
    except ImportError as exc:
        raise RuntimeUnavailableError(f"exporting for {runtime} needs the package onnx: {_PIP}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        onnx_path = tmp / "model.onnx"
        outputs = export_onnx(model, input_size, onnx_path)
        if runtime == "openvino":
            import openvino as ov

            # compress_to_fp16=False: save_model would otherwise halve the weights (features would move ~1e-3).
            ov.save_model(ov.convert_model(str(onnx_path)), str(tmp / "model.xml"), compress_to_fp16=False)
            onnx_path.unlink()
        meta = {**export_key(identity, runtime), "outputs": outputs, "input_size": input_size}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True))  # last: marks it complete
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "export.json").is_file():  # not a lost race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process exported the same model first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---- the three runtimes -------------------------------------------------------------------------------------


class TorchRuntime:
    """torch eager on the encoder's device (channels-last; bf16 autocast when the precision is bf16)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return list(self.model(x))
        return list(self.model(x))

    @torch.inference_mode()
    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [m.float().cpu().numpy() for m in self.maps(torch.from_numpy(pixels))]

    def describe(self) -> dict:
        return {"runtime": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}


class OnnxRuntime:
    """ONNX Runtime, CPU execution provider, all graph optimisations, `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, directory: Path, *, threads: int, spin: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailableError(f"runtime 'onnxruntime' is not installed: {_PIP}") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory patterns are planned per input shape; with a dynamic batch they doubled the peak memory (Lite0
        # @224, batch 256: 8.2 GB with, 4.3 GB without) and bought no speed. The arena stays (without it: ~2x slower).
        opts.enable_mem_pattern = False
        # No busy-waiting between ops: spinning workers would steal the cores the decode threads need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.threads, self.spin = threads, spin
        self.version = ort.__version__
        self.session = ort.InferenceSession(
            str(directory / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": self.version, "threads": self.threads, "spin": self.spin}


class OpenVINORuntime:
    """OpenVINO on the CPU: `threads` inference threads shared by `streams` parallel inference requests.

    With streams > 1 a batch is split into `streams` parts that run at once (throughput mode); with 1 stream
    the whole batch runs as one request on all threads. Precision is pinned (f32, or bf16 when asked): the CPU
    plugin would otherwise pick bf16 by itself on CPUs that have it.
    """

    name = "openvino"

    def __init__(self, directory: Path, *, threads: int, streams: int = 1, precision: str = "fp32") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeUnavailableError(f"runtime 'openvino' is not installed: {_PIP}") from exc
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": int(streams),
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # Pinning threads to cores hurts on a machine shared with other processes (and the decode threads).
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(core.read_model(str(directory / "model.xml")), "CPU", config)
        self.threads, self.streams, self.precision = threads, streams, precision
        self.version = ov.__version__
        n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(max(n, streams))]
        self._lock = threading.Lock()  # infer requests are not shareable between concurrent callers

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock:
            parts = min(self.streams, len(x))
            if parts <= 1:
                req = self._requests[0]
                req.infer({0: x})
                return [np.array(req.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]
            chunks = np.array_split(x, parts)
            reqs = self._requests[:parts]
            for req, chunk in zip(reqs, chunks, strict=True):
                req.start_async({0: chunk})
            for req in reqs:
                req.wait()
            return [
                np.concatenate([np.array(r.get_output_tensor(i).data) for r in reqs])
                for i in range(len(self.compiled.outputs))
            ]

    def describe(self) -> dict:
        return {
            "runtime": "openvino",
            "version": self.version,
            "threads": self.threads,
            "streams": self.streams,
            "precision": self.precision,
        }


def make_runtime(
    runtime: str,
    model: torch.nn.Module,
    *,
    name: str,
    identity: dict,
    input_size: int,
    device: torch.device,
    precision: str,
    threads: int | None = None,
    streams: int = 1,
    export_dir: str | Path | None = None,
) -> Runtime:
    """The runtime `runtime` for this backbone (exporting it first if no export is cached)."""
    check_runtime(runtime)
    if runtime == "torch":
        return TorchRuntime(model, device, precision)
    if device.type != "cpu":
        raise RuntimeUnavailableError(f"runtime {runtime!r} runs on the CPU only: use device='cpu' or runtime='torch'")
    if runtime == "onnxruntime" and precision != "fp32":
        raise RuntimeUnavailableError(
            f"runtime 'onnxruntime' runs fp32 only (asked for {precision}): use precision='fp32', or 'openvino'"
        )
    threads = int(threads) if threads else default_threads()
    if threads < 1 or streams < 1:
        raise ValueError(f"threads and streams must be >= 1, got {threads} and {streams}")
    directory = ensure_export(
        model,
        name=name,
        identity=identity,
        input_size=input_size,
        runtime=runtime,
        export_dir=export_dir if export_dir is not None else DEFAULT_EXPORT_DIR,
    )
    if runtime == "onnxruntime":
        return OnnxRuntime(directory, threads=threads)
    return OpenVINORuntime(directory, threads=threads, streams=streams, precision=precision)
