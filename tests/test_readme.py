"""README: the two set-up commands, a settings table generated from the code, commands that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dlsr_monitor.cli.main import build_parser, subparsers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _settings_table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exactly_two_setup_commands_near_the_top():
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", README, re.S)
    assert first_block and first_block.start() < 1500, "the set-up commands must come first"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command_and_make_has_both_targets():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)


def test_settings_table_is_generated_from_the_settings_model():
    mod = _settings_table_module()
    table = mod.table()
    assert table in README, "README settings table is stale: run `make settings-table`"
    # Every field of every section is in it, so the table cannot silently omit a setting.
    from dlsr_monitor.config import Settings

    for section, field in Settings.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"`DLSR_{section.upper()}__{name.upper()}`" in table


def test_settings_table_check_mode_detects_drift(tmp_path):
    mod = _settings_table_module()
    stale = tmp_path / "README.md"
    stale.write_text(README.replace("| `DLSR_MODEL__ALPHA` |", "| `DLSR_MODEL__ALPHA_OLD` |"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check", str(stale)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "stale" in proc.stderr
    assert mod.replace_table(README, mod.table()) == README


def test_every_dlsr_command_in_the_readme_exists():
    tree = build_parser()
    mentioned = set(re.findall(r"`dlsr ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", README))
    assert mentioned
    top = subparsers(tree)
    for cmd, sub in mentioned:
        assert cmd in top, f"README mentions `dlsr {cmd}`, which does not exist"
        children = subparsers(top[cmd])
        if sub and children:
            assert sub in children, f"README mentions `dlsr {cmd} {sub}`, which does not exist"


def test_figures_section_is_marked_for_the_lead():
    assert README.count("<!-- figures -->") == 1 and README.count("<!-- /figures -->") == 1
    start, end = README.index("<!-- figures -->"), README.index("<!-- /figures -->")
    # Placeholders live only inside the figures section.
    assert "FIGURES:" not in README[:start] + README[end:]
