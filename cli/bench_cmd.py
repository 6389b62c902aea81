"""`dlsr bench ...`: the method benchmarks (ood, ablations, corruptions, speed, validate, epochs, calibration,
input-size, quality), the drift benchmark and the service throughput benchmark. Each module in `bench/` has
`add_arguments(parser)` and `run(args, settings) -> int`;
the argument definitions are light, the heavy imports (torch, timm) happen inside `run`.
"""

from __future__ import annotations

import argparse
import importlib

_BENCHES = {
    "ood": "CIFAR-10 vs every OOD set: DLSR (MSE, MFsim5, MFsim4) vs kNN vs Mahalanobis, over seeds",
    "ablations": "AUROC against t, single- vs multi-layer features, 8 vs 16 LFDN blocks",
    "corruptions": "code-corrupted CIFAR-10 test vs clean: AUROC per corruption and severity",
    "speed": "encoder-alone vs whole-scorer images/s at the same batch size",
    "validate": "choose DLSR settings on a validation split (held-out classes, corrupted held-out images)",
    "epochs": "AUROC against LFDN training epochs (validation proxy and test sets)",
    "throughput": "end-to-end messages/s of the monitor service",
    "input-size": "AUROC and images/s against the encoder input size for 32x32 sources (CIFAR-10 vs OOD sets)",
    "calibration": "realised false-alarm rate over random calibration draws: marginal vs pac thresholds",
    "quality": "AUROC and false alarms per encoder runtime and precision (torch, onnxruntime, openvino, bf16, int8)",
    "drift": "false drift alarms on correlated video and delay after a shift, per-frame vs per-scene evidence",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dlsr bench <name>`; each sets `handler(args, settings) -> int`."""
    p = sub.add_parser("bench", help="Benchmarks: OOD quality, ablations, corruptions, speed, throughput")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, help_text in _BENCHES.items():
        bp = bsub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(_module(name))
        except ImportError as exc:
            bp.set_defaults(handler=_unavailable(name, exc))
            continue
        module.add_arguments(bp)
        bp.set_defaults(handler=_runner(name))


def _module(name: str) -> str:
    return f"dlsr_monitor.bench.{name.replace('-', '_')}"


def _runner(name: str):
    def handler(args: argparse.Namespace, settings) -> int:
        return int(importlib.import_module(_module(name)).run(args, settings) or 0)

    return handler


def _unavailable(name: str, exc: ImportError):
    def handler(args: argparse.Namespace, settings) -> int:
        print(f"dlsr bench {name}: not available in this install ({exc})")
        return 1

    return handler
