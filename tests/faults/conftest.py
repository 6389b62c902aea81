"""Fixtures of the fault suite: the `fault_runner` (tests.faults.runner: every selected scenario runs on a
few threads, each test waits for its own) and the end-of-session table (also written as JSON under the pytest
tmp dir).

Reduced form by default (`make test`); `DLSR_FAULTS=full` (`make faults`) runs the long form.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import report
from tests.faults.harness import MODE
from tests.faults.runner import BODIES, Runner


@pytest.fixture(scope="session")
def fault_report_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "faults-report.json"
    report.STATE["json_path"] = path
    return path


@pytest.fixture(scope="session")
def fault_runner(request, tmp_path_factory, small_model, tansu, redis_url, data_dir, fault_report_path):
    """Runs the selected scenarios (those whose test_<name> is in this session), a few at a time."""
    selected = {}
    for item in request.session.items:
        name = item.name.removeprefix("test_").split("[")[0]
        if name in BODIES and "fault_runner" in getattr(item, "fixturenames", ()):
            selected[name] = item.nodeid
    report.STATE["order"] = list(selected)
    runner = Runner(selected=selected, tmp_factory=tmp_path_factory, small_model=small_model, tansu=tansu,
                    redis_url=redis_url, data_dir=data_dir)
    try:
        yield runner
    finally:
        runner.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fill in each scenario row's status; a scenario that failed before it could count gets a row too."""
    rep = yield
    if rep.when == "call" or (rep.failed and "fault_runner" in getattr(item, "fixturenames", ())):
        if hasattr(rep, "wasxfail"):
            status = "xpass" if rep.passed else "xfail"
        else:
            status = "passed" if rep.passed else ("FAILED" if rep.failed else rep.outcome)
        rows = [r for r in report.ROWS if r.nodeid == item.nodeid]
        if not rows and "fault_runner" in getattr(item, "fixturenames", ()) and status != "passed":
            msg = str(getattr(rep, "longreprtext", "") or "").strip().splitlines()
            err = next((ln for ln in reversed(msg) if ln.startswith("E ")), msg[-1] if msg else "")
            rows = [report.record(report.Row(scenario=item.name.removeprefix("test_").split("[")[0], mode=MODE,
                                             nodeid=item.nodeid, notes=f"{rep.when}: {err[:300]}"))]
        for row in rows:
            if row.status in ("?", "passed"):
                row.status = status
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not report.ROWS:
        return
    tr = terminalreporter
    tr.section(f"fault scenarios ({MODE} form)")
    order = report.STATE.get("order") or []
    report.ROWS.sort(key=lambda r: order.index(r.scenario) if r.scenario in order else len(order))
    for line in report.format_table(report.ROWS):
        tr.write_line(line)
    path = report.STATE.get("json_path")
    if path is not None:
        report.write_json(Path(path), report.ROWS)
        tr.write_line(f"fault table written to {path}")
