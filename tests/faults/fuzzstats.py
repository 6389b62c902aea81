"""Executions per second of the hypothesis fuzzers (tests/dlsr/test_images_fuzz.py,
tests/common/test_contract_fuzz.py), printed as one line each at the end of the session.

A fuzz module calls `install(request.config)` once (a module fixture) and wraps its target calls in
`with counter(name):`; the summary plugin registers itself with pytest, so the lines appear whatever else ran.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tests.faults import report


#: Examples per fuzz test: small by default (both files < 60 s on 2 cores), DLSR_FUZZ_EXAMPLES for a long run.
def examples(default: int) -> int:
    value = os.environ.get("DLSR_FUZZ_EXAMPLES", "").strip()
    return max(1, int(value)) if value else default


@dataclass
class FuzzStat:
    name: str
    calls: int = 0
    busy_s: float = 0.0  # inside the target
    first: float = field(default_factory=time.monotonic)
    last: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)

    def note(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def line(self) -> str:
        wall = max(1e-9, (self.last or time.monotonic()) - self.first)
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: -kv[1])[:6])
        return (f"fuzz {self.name}: {self.calls} executions in {wall:.1f} s wall ({self.calls / wall:.0f} exec/s; "
                f"{self.calls / max(1e-9, self.busy_s):.0f} exec/s inside the target)" + (f" [{top}]" if top else ""))


STATS: dict[str, FuzzStat] = {}


class counter:  # noqa: N801 - used as `with counter(name):`
    """Counts one execution of `name` and the time spent in it."""

    def __init__(self, name: str) -> None:
        self.stat = STATS.setdefault(name, FuzzStat(name))

    def __enter__(self) -> FuzzStat:
        self.t0 = time.perf_counter()
        return self.stat

    def __exit__(self, *exc: object) -> None:
        self.stat.calls += 1
        self.stat.busy_s += time.perf_counter() - self.t0
        self.stat.last = time.monotonic()


class _Summary:
    def pytest_terminal_summary(self, terminalreporter) -> None:  # noqa: ANN001 - pytest's hook
        if not STATS:
            return
        terminalreporter.section("fuzzing")
        for stat in STATS.values():
            line = stat.line()
            report.FUZZ_LINES.append(line)
            terminalreporter.write_line(line)


def install(config) -> None:  # noqa: ANN001 - pytest.Config
    if not config.pluginmanager.has_plugin("dlsr-fuzz-summary"):
        config.pluginmanager.register(_Summary(), name="dlsr-fuzz-summary")
