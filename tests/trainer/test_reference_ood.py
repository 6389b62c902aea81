"""The AUROC gate's reference OOD set: DLSR_TRAINER__REFERENCE_OOD plus the images confirmed by `dlsr vet reject`
(<workdir>/confirmed_ood), on the fake method and real Redis."""

from __future__ import annotations

import hashlib

from dlsr_monitor.common.confirmed_ood import confirmed_ood_dir
from dlsr_monitor.trainer.history import PROMOTED, REJECTED
from dlsr_monitor.trainer.job import run_job
from dlsr_monitor.trainer.reference_ood import reference_ood_images

from .conftest import vectors


def _confirm(folder, items) -> set[str]:
    # Fake "images" (float vectors); the reader picks files by extension, the fake method reads the bytes.
    folder.mkdir(parents=True, exist_ok=True)
    names = set()
    for data, _ in items:
        sha = hashlib.sha256(data).hexdigest()
        (folder / f"{sha}.png").write_bytes(data)
        names.add(f"{sha}.png")
    return names


def test_loader_adds_the_confirmed_folder_to_the_configured_set(tmp_path):
    assert reference_ood_images(None, tmp_path) is None  # nothing configured, nothing confirmed: gate skipped
    confirmed = _confirm(confirmed_ood_dir(tmp_path), vectors(4, seed=9))
    only = reference_ood_images(None, tmp_path)
    assert {item.name for item in only} == confirmed and len(only) == 4
    configured = tmp_path / "known_ood"
    _confirm(configured, vectors(3, seed=8))
    both = reference_ood_images(configured, tmp_path, limit=2)
    assert len(both) == 4  # each part up to the limit
    assert len(reference_ood_images(configured, None)) == 3  # no workdir: the configured set alone, as before


def test_a_job_gates_on_auroc_against_confirmed_ood_images(ctx):
    ctx.store.add_many(vectors(600, seed=1))
    assert ctx.config.reference_ood is None
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == PROMOTED and rec.gates["auroc"]["value"] is None  # no OOD set yet: skipped

    _confirm(confirmed_ood_dir(ctx.store.root), vectors(30, seed=5, shift=6.0))
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == PROMOTED, rec.message
    assert rec.gates["auroc"]["value"] > 0.99 and "n=30" in rec.gates["auroc"]["detail"]

    # confirmed "OOD" that looks like the vetted data fails the gate, by a stated margin
    _confirm(confirmed_ood_dir(ctx.store.root), vectors(300, seed=6))
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == REJECTED and not rec.gates["auroc"]["passed"]
    assert "n=330" in rec.gates["auroc"]["detail"] and "short by" in rec.gates["auroc"]["detail"]
