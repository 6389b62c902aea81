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

int8 (optional, never a default): post-training static quantization of that ONNX export with ONNX Runtime's
`quantize_static` (QDQ format; weights int8 per output channel, activations uint8 per tensor from their min/max
over calibration images, a sample of the fit set). The one quantized graph runs in ONNX Runtime, and OpenVINO
reads its QDQ pairs as int8 operations. Its directory is `...-<runtime>-int8`, keyed as above plus the
quantization (method and the sha256 of the calibration images), so a model is always scored with the int8 graph
it was calibrated with; without the calibration images a missing int8 export cannot be remade, and is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

RUNTIMES = ("torch", "openvino", "onnxruntime")
# 2: TF "same" padding is exported as constant Pad ops (was: computed from the input's shape at run time, which
# the int8 quantizer turned into quantized arithmetic on shapes). Same features, a new directory.
EXPORT_VERSION = 2
QUANTIZATION_METHOD = "onnxruntime-static-qdq"
CALIBRATION_BATCH = 32
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


def quantization_spec(calibration_sha256: str, n_images: int) -> dict:
    """What an int8 export depends on beyond the fp32 one: the method, its settings, the calibration images."""
    return {
        "method": QUANTIZATION_METHOD,
        "weights": "int8 per channel",
        "activations": "uint8 per tensor, min/max",
        "calibration_sha256": calibration_sha256,
        "calibration_images": int(n_images),
    }


def export_key(identity: dict, runtime: str, quantization: dict | None = None) -> dict:
    """What an export depends on: the torch encoder identity, the runtime and its version, torch, the opset
    (and, for int8, the quantization with its calibration set)."""
    base = {k: v for k, v in identity.items() if k not in ("runtime", "precision", "quantization")}
    key = {
        "export_version": EXPORT_VERSION,
        "identity": base,
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "torch": torch.__version__,
        "opset": OPSET,
    }
    if quantization is not None:
        # The quantizer is ONNX Runtime's whichever runtime runs the result: its version counts too.
        key["quantization"] = {**quantization, "onnxruntime": runtime_version("onnxruntime")}
    return key


def export_directory(
    export_dir: str | Path, name: str, identity: dict, runtime: str, quantization: dict | None = None
) -> Path:
    key = export_key(identity, runtime, quantization)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Path(export_dir) / f"{name}-{digest[:16]}-{runtime}{'-int8' if quantization is not None else ''}"


class _StaticSamePad(torch.nn.Module):
    """A TF-"same" convolution whose padding, fixed by the export's input size, is a constant."""

    def __init__(self, conv: torch.nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv, self.pad = conv, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, self.pad), c.weight, c.bias, c.stride, 0, c.dilation, c.groups
        )


def static_padding(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """A copy of `model` with timm's dynamic "same" padding (`Conv2dSame`) made constant for this input size.

    Dynamic padding exports as Shape -> arithmetic -> Pad; the int8 quantizer quantized that arithmetic (stage
    maps came out a pixel short). The padding depends only on the input size, which an export fixes anyway.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    sizes: dict[str, tuple[int, int]] = {}
    model = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
        for n, m in model.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.inference_mode():
        model(torch.zeros((1, 3, input_size, input_size)))
    for h in hooks:
        h.remove()
    for n, (ih, iw) in sizes.items():
        m = model.get_submodule(n)
        ph = get_same_padding(ih, m.kernel_size[0], m.stride[0], m.dilation[0])
        pw = get_same_padding(iw, m.kernel_size[1], m.stride[1], m.dilation[1])
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _StaticSamePad(m, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return model


def export_onnx(model: torch.nn.Module, input_size: int, path: str | Path) -> list[str]:
    """Export a timm `features_only` backbone (fp32, CPU) to ONNX with a dynamic batch axis; returns output names."""
    model = static_padding(model.eval(), input_size)
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


def quantize_onnx(source: Path, target: Path, batches: Iterable[np.ndarray]) -> None:
    """int8 QDQ copy of an fp32 ONNX graph, activation ranges from `batches` of pixels (N, 3, S, S)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise RuntimeUnavailableError(f"int8 quantization needs the package onnxruntime: {_PIP}") from exc

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {"pixels": np.ascontiguousarray(x, dtype=np.float32)}

    prepared = target.with_name("prepared.onnx")
    # The quantizer's recommended preparation (shape inference, graph clean-up); the symbolic pass is not needed.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,  # ONNX Runtime and OpenVINO both run QDQ graphs as int8 kernels
        per_channel=True,  # per tensor, the folded batch norms' wide weight ranges gave ~5x the feature error
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    prepared.unlink()


def ensure_export(
    model: torch.nn.Module,
    *,
    name: str,
    identity: dict,
    input_size: int,
    runtime: str,
    export_dir: str | Path,
    quantization: dict | None = None,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
) -> Path:
    """The cached export directory for (identity, runtime, versions[, quantization]); made once, atomically.

    Args:
        quantization: `quantization_spec(...)` for an int8 export, None for fp32.
        calibration: for int8, yields the calibration images' preprocessed batches; needed only when the int8
            export is not cached yet (it cannot be made without them).
    """
    if runtime == "torch":
        raise ValueError("the torch runtime runs the model itself: nothing to export")
    if not runtime_version(runtime):
        raise RuntimeUnavailableError(f"runtime {runtime!r} is not installed: {_PIP}")
    target = export_directory(export_dir, name, identity, runtime, quantization)
    if (target / "export.json").is_file():
        return target
    if quantization is not None and calibration is None:
        raise RuntimeUnavailableError(
            f"no int8 export of {name} for {runtime} calibrated on images "
            f"{quantization.get('calibration_sha256', '?')[:12]} in {export_dir}: quantize it again from the same "
            "calibration images (Encoder.create(..., precision='int8', calibration=images)), or use fp32"
        )
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
        if quantization is not None:
            fp32_path = tmp / "fp32.onnx"
            onnx_path.rename(fp32_path)
            quantize_onnx(fp32_path, onnx_path, calibration())
            fp32_path.unlink()
        if runtime == "openvino":
            import openvino as ov

            # compress_to_fp16=False: save_model would otherwise halve the weights (features would move ~1e-3).
            ov.save_model(ov.convert_model(str(onnx_path)), str(tmp / "model.xml"), compress_to_fp16=False)
            onnx_path.unlink()
        meta = {**export_key(identity, runtime, quantization), "outputs": outputs, "input_size": input_size}
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

    def __init__(self, directory: Path, *, threads: int, spin: bool = False, precision: str = "fp32") -> None:
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
        self.threads, self.spin, self.precision = threads, spin, precision
        self.version = ort.__version__
        self.session = ort.InferenceSession(
            str(directory / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def describe(self) -> dict:
        return {
            "runtime": "onnxruntime",
            "version": self.version,
            "threads": self.threads,
            "spin": self.spin,
            "precision": self.precision,
        }


class OpenVINORuntime:
    """OpenVINO on the CPU: `threads` inference threads shared by `streams` parallel inference requests.

    With streams > 1 a batch is split into `streams` parts that run at once (throughput mode); with 1 stream
    the whole batch runs as one request on all threads. Precision is pinned (f32, or bf16 when asked): the CPU
    plugin would otherwise pick bf16 by itself on CPUs that have it. An int8 export runs its quantized
    operations in int8 and the rest in f32.
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
    quantization: dict | None = None,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
) -> Runtime:
    """The runtime `runtime` for this backbone (exporting it first if no export is cached).

    For precision "int8", `quantization` names the int8 export and `calibration` makes it when it is not cached
    (see `ensure_export`).
    """
    check_runtime(runtime)
    if runtime == "torch":
        if precision == "int8":
            raise RuntimeUnavailableError("precision 'int8' runs in a CPU runtime: use runtime='onnxruntime' or 'openvino'")
        return TorchRuntime(model, device, precision)
    if device.type != "cpu":
        raise RuntimeUnavailableError(f"runtime {runtime!r} runs on the CPU only: use device='cpu' or runtime='torch'")
    if runtime == "onnxruntime" and precision == "bf16":
        raise RuntimeUnavailableError(
            "runtime 'onnxruntime' runs fp32 or int8 only (asked for bf16): use precision='fp32', or 'openvino'"
        )
    if (precision == "int8") != (quantization is not None):
        raise ValueError("an int8 runtime needs its quantization (quantization_spec), and only int8 takes one")
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
        quantization=quantization,
        calibration=calibration,
    )
    if runtime == "onnxruntime":
        return OnnxRuntime(directory, threads=threads, precision=precision)
    return OpenVINORuntime(directory, threads=threads, streams=streams, precision=precision)
