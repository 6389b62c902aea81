"""VettedStore and the hash split: dedup, arrival order, fixed reference sample."""

from __future__ import annotations

import io

from PIL import Image

from dlsr_monitor.trainer.intake import VettedStore, ingest_path, split_entries

from .conftest import vectors


def test_dedup_and_arrival_order_across_instances(tmp_path):
    a = VettedStore(tmp_path / "v")
    b = VettedStore(tmp_path / "v")  # a second trainer process on the same volume
    items = vectors(50, seed=1)
    assert a.add_many(items) == (50, 0)
    assert b.add_many(items[:10] + vectors(5, seed=2)) == (5, 10)
    e = a.entries()
    assert len(e) == 55 and [x.index for x in e] == list(range(55))
    assert [it.data for it in a.images(e[:3])] == [d for d, _ in items[:3]]


def test_split_is_by_content_and_reference_is_fixed(tmp_path):
    s = VettedStore(tmp_path / "v")
    s.add_many(vectors(2000, seed=1))
    sp1 = split_entries(s.entries(), holdout_fraction=0.1, calibration_fraction=0.2, reference_size=50)
    s.add_many(vectors(500, seed=2))
    sp2 = split_entries(
        s.entries(), holdout_fraction=0.1, calibration_fraction=0.2, reference_size=50, since_index=2000
    )
    assert 150 < len(sp1.holdout) < 250 and 300 < len(sp1.calibration) < 500
    assert sp1.reference == sp2.reference  # appending data never changes the reference sample
    assert {e.sha for e in sp1.fit} <= {e.sha for e in sp2.fit}  # an image never changes side
    assert all(e.index >= 2000 for e in sp2.fresh) and len(sp2.fresh) == len(sp2.holdout) - len(sp1.holdout)


def test_ingest_folder_checks_decoding(tmp_path):
    d = tmp_path / "imgs" / "cls"
    d.mkdir(parents=True)
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="PNG")
        (d / f"{i}.png").write_bytes(buf.getvalue())
    (d / "broken.png").write_bytes(b"not an image")
    s = VettedStore(tmp_path / "v")
    out = ingest_path(s, tmp_path / "imgs")
    assert out["added"] == 4 and len(out["bad"]) == 1 and "broken.png" in out["bad"][0]
    assert ingest_path(s, tmp_path / "imgs")["duplicates"] == 4
