"""The operator's loop on the real Tansu broker and Redis with a real monitor process and the real (small) model:
60 CIFAR-10 (cam-id) and 40 MNIST (cam-ood) images are scored; `dlsr triage --source cam-ood` fetches the flagged
originals by offset (two forged score records come back as missing with their reasons), writes a contact sheet
with one thumbnail per image and an HTML page naming each; `dlsr vet accept` of the selection puts exactly those
images on the vetted topic with provenance (a rerun adds nothing) and the trainer's intake stores exactly their
sha256s; `dlsr vet reject` of the other flagged images makes them the trainer's reference OOD set, the accepted
ones being conflicts left as they were; one trainer job then fits on the vetted store and its AUROC gate scores
exactly the confirmed set (a new version going live is tests/integration/test_trainer_swap.py).

Set DLSR_TEST_TRIAGE_SHEET=/some/path.png to keep a copy of the contact sheet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from dlsr_monitor.common.contract import parse_score
from tests.integration.conftest import Item, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
N_ID, N_OOD, ACCEPTED = 60, 40, 20
KEEP_SHEET = os.environ.get("DLSR_TEST_TRIAGE_SHEET")  # read before the fixture hides DLSR_* variables


@pytest.fixture
def cli_env(monkeypatch, tmp_path, test_settings):
    """DLSR_* for in-process `dlsr` runs: the test's broker, topics, Redis prefix, a trainer workdir."""
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    (tmp_path / "empty.toml").write_text("")
    k, r = test_settings.kafka, test_settings.redis
    env = {
        "DLSR_CONFIG_FILE": str(tmp_path / "empty.toml"),
        "DLSR_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "DLSR_KAFKA__INPUT_TOPIC": k.input_topic,
        "DLSR_KAFKA__SCORES_TOPIC": k.scores_topic,
        "DLSR_KAFKA__ALERTS_TOPIC": k.alerts_topic,
        "DLSR_KAFKA__VETTED_TOPIC": k.vetted_topic,
        "DLSR_KAFKA__CONNECT_RETRIES": "2",
        "DLSR_KAFKA__RETRY_BACKOFF_S": "0.2",
        "DLSR_REDIS__URL": r.url,
        "DLSR_REDIS__PREFIX": r.prefix,
        "DLSR_REDIS__CONNECT_RETRIES": "2",
        "DLSR_TRAINER__WORKDIR": str(tmp_path / "trainer"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # away from the repository's .env / dlsr.toml
    return env


def dlsr(capsys, *argv: str) -> tuple[int, str, str]:
    from dlsr_monitor.cli.main import main

    capsys.readouterr()
    rc = main(list(argv))
    got = capsys.readouterr()
    return rc, got.out, got.err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_triage_then_vet_accept_and_reject_reach_the_trainer(
    test_settings, published_model, data_dir, tansu, topics, monitors, readers, cli_env, capsys, tmp_path
):
    from kafka import KafkaProducer

    from dlsr_monitor.common.confirmed_ood import confirmed_files
    from dlsr_monitor.common.kafka_io import KafkaSource, ensure_topics
    from dlsr_monitor.config import load_settings
    from dlsr_monitor.console.triage import BACKGROUND, sheet_geometry
    from dlsr_monitor.trainer.intake import VettedIntake, VettedStore, split_entries
    from dlsr_monitor.trainer.reference_ood import reference_ood_images

    t0 = time.monotonic()
    ensure_topics(tansu, topics.all(), partitions=3)
    cifar = load_images(data_dir, "cifar10", "test", N_ID, seed=11)
    mnist = load_images(data_dir, "mnist", "test", N_OOD, seed=11)
    items = [Item(v, "cam-id", "id", f"id-{i}") for i, v in enumerate(cifar)]
    items += [Item(v, "cam-ood", "ood", f"ood-{i}") for i, v in enumerate(mnist)]
    scores = readers(topics.scores)
    mon = monitors("triage")
    produce(tansu, topics.input, items)
    wait_until(lambda: len(scores.poll()) >= N_ID + N_OOD, 300, "100 score records", (mon,))
    assert mon.terminate() == 0, mon.log()[-2000:]
    recs = [parse_score(r.value) for r in scores.poll(1.0)]
    assert len({(r.partition, r.offset) for r in recs}) == N_ID + N_OOD
    flagged = {r.image_id: r for r in recs if r.source == "cam-ood" and r.is_ood}
    assert len(flagged) >= ACCEPTED + 5, f"only {len(flagged)} of {N_OOD} MNIST images flagged"
    t_stream = time.monotonic() - t0

    # Two forged records: one names an offset that holds another image, one an offset past the end.
    real = max(flagged.values(), key=lambda r: r.score)
    other = next(r for r in recs if r.partition == real.partition and r.offset != real.offset)
    forged = [
        real.model_copy(update={"image_id": "forged-mismatch", "offset": other.offset, "score": real.score + 2}),
        real.model_copy(update={"image_id": "forged-gone", "offset": 10**6, "score": real.score + 1}),
    ]
    producer = KafkaProducer(bootstrap_servers=tansu, acks="all")
    for f in forged:
        producer.send(topics.scores, key=b"cam-ood", value=f.to_bytes())
    producer.flush(30)
    producer.close()

    # ---- triage ------------------------------------------------------------------------------
    out_dir = tmp_path / "triage"
    rc, out, err = dlsr(capsys, "triage", "--source", "cam-ood", "--since", "1h", "--limit", str(ACCEPTED + 2),
                        "--out", str(out_dir), "--json")  # fmt: skip
    assert rc == 0, err
    lines = json_lines(out)
    by_score = sorted(flagged.values(), key=lambda r: (-r.score, r.ts))
    chosen = [r.image_id for r in by_score[:ACCEPTED]]
    assert [x["image_id"] for x in lines] == ["forged-mismatch", "forged-gone", *chosen]
    reasons = {x["image_id"]: x.get("reason") for x in lines if x["status"] == "missing"}
    assert reasons == {"forged-mismatch": "sha256_mismatch", "forged-gone": "beyond_end"}
    ok = [x for x in lines if x["status"] == "ok"]
    assert all(x["alert_id"] == f"ood:{x['image_id']}" for x in ok)  # read from the alerts topic
    assert all(x["sha256"] == flagged[x["image_id"]].sha256 for x in ok)

    # The trainer publishes per-stage calibration, so every record carries `layers` and each cell has a stage bar.
    assert all(flagged[x["image_id"]].layers for x in ok)
    geo = sheet_geometry(ACCEPTED, 8, stages=True)
    with Image.open(out_dir / "contact_sheet.png") as sheet:
        sheet.load()
        assert sheet.size == (geo.width, geo.height) == (8 * geo.cell_w, geo.header_h + math.ceil(ACCEPTED / 8) * geo.cell_h)
        assert sheet.text["dlsr:thumbnails"] == str(ACCEPTED) and sheet.text["dlsr:grid"] == "3x8"
        assert json.loads(sheet.text["dlsr:image_ids"]) == chosen
        filled = [sheet.crop(geo.thumb_box(i)).getcolors(1 << 16) != [(128 * 128, BACKGROUND)] for i in range(24)]
        assert filled == [True] * ACCEPTED + [False] * 4  # one thumbnail per fetched image, the rest empty
    if KEEP_SHEET:
        shutil.copy(out_dir / "contact_sheet.png", KEEP_SHEET)
    page = (out_dir / "index.html").read_text()
    assert all(f'data-image-id="{i}"' in page for i in chosen)
    assert page.count("data:image/") == ACCEPTED and "forged-mismatch" in page and "sha256_mismatch" in page
    selection = json.loads((out_dir / "selection.json").read_text())
    assert [s["image_id"] for s in selection["items"]] == chosen

    # ---- vet accept: exactly those images on the vetted topic, with provenance; a rerun adds nothing ----------
    rc, out, err = dlsr(capsys, "vet", "accept", "--selection", str(out_dir / "selection.json"), "--by", "tester",
                        "--note", "false alarms", "--json")  # fmt: skip
    assert rc == 0, err
    assert [x["status"] for x in json_lines(out)] == ["accepted"] * ACCEPTED
    vetted = readers(topics.vetted)
    vetted.wait_for(ACCEPTED, 30)
    want = {flagged[i].sha256: flagged[i] for i in chosen}
    got = {}
    for m in vetted.records:
        h = {k: v.decode() for k, v in m.headers}
        sha = hashlib.sha256(m.value).hexdigest()
        rec = want[sha]
        assert h["sha256"] == sha and h["origin"] == f"{rec.topic}:{rec.partition}:{rec.offset}"
        assert (h["image_id"], h["source"], h["alert_id"]) == (rec.image_id, "cam-ood", f"ood:{rec.image_id}")
        assert (h["vetted_by"], h["note"]) == ("tester", "false alarms") and h["vetted_at"].endswith("Z")
        got[sha] = m
    assert set(got) == set(want) and len(vetted.records) == ACCEPTED
    rc, out, err = dlsr(capsys, "vet", "accept", "--selection", str(out_dir / "selection.json"), "--json")
    assert rc == 0 and [x["status"] for x in json_lines(out)] == ["already_accepted"] * ACCEPTED
    time.sleep(2.0)
    assert len(vetted.poll(1.0)) == ACCEPTED, "a second accept republished images"

    # ---- the trainer's intake takes in exactly those images ---------------------------------------
    settings = load_settings()
    store = VettedStore(settings.trainer.workdir)
    intake = VettedIntake(KafkaSource(settings.kafka, settings.kafka.vetted_topic, "trainer-under-test"), store)
    try:
        deadline = time.monotonic() + 60
        while len(store) < ACCEPTED and time.monotonic() < deadline:
            intake.poll(1.0)
        intake.poll(1.0)
    finally:
        intake.close()
    assert {e.sha for e in store.entries()} == set(want) and intake.rejected == 0
    assert {e.source for e in store.entries()} == {"cam-ood"}
    assert split_entries(store.entries()).sizes()["total"] == ACCEPTED  # what the next job fits, calibrates, holds out

    # ---- vet reject the other flagged images: confirmed OOD for the trainer's AUROC gate --------------------
    rest = [r.image_id for r in by_score[ACCEPTED:]]
    rc, out, err = dlsr(capsys, "vet", "reject", "--source", "cam-ood", "--since", "1h", "--by", "tester",
                        "--note", "digits, not photos", "--json")  # fmt: skip
    assert rc == 1, "the accepted images are conflicts, so not every image is in the state asked for"
    status = {x["image_id"]: x["status"] for x in json_lines(out)}
    assert {i for i, s in status.items() if s == "rejected"} == set(rest)
    assert {i for i, s in status.items() if s == "conflict"} == set(chosen)
    assert status["forged-mismatch"] == "missing" and status["forged-gone"] == "missing"
    rejected = {flagged[i].sha256 for i in rest}
    files = confirmed_files(settings.trainer.workdir)
    assert {p.stem for p in files} == rejected and all(p.suffix in (".png", ".jpg") for p in files)
    ref = reference_ood_images(None, settings.trainer.workdir)
    assert {hashlib.sha256(item.data).hexdigest() for item in ref} == rejected
    with_configured = reference_ood_images(data_dir / "mnist" / "test.zip", settings.trainer.workdir, limit=100)
    assert len(with_configured) == 100 + len(rest)  # DLSR_TRAINER__REFERENCE_OOD keeps working, the set is added
    rc, out, _ = dlsr(capsys, "vet", "reject", "--id", rest[0], "--id", "no-such-image", "--json")
    assert rc == 1 and [x["status"] for x in json_lines(out)] == ["already_rejected", "unknown_id"]
    assert len(confirmed_files(settings.trainer.workdir)) == len(rest)

    # ---- vet list: what was decided, by whom ----------------------------------------------------
    rc, out, _ = dlsr(capsys, "vet", "list", "--json", "--limit", "500")
    decisions = json_lines(out)
    assert rc == 0 and len(decisions) == ACCEPTED + len(rest)
    assert {d["decision"] for d in decisions if d["image_id"] in chosen} == {"accept"}
    assert {d["by"] for d in decisions} == {"tester"}
    rc, out, _ = dlsr(capsys, "vet", "list", "--decision", "reject")
    assert rc == 0 and "digits, not photos" in out and rest[0] in out
    t_vet = time.monotonic() - t0 - t_stream

    # ---- one trainer job: it fits on the vetted store, its AUROC gate scores exactly the confirmed set -------
    from dlsr_monitor.trainer.intake import ingest_path
    from dlsr_monitor.trainer.schedule import build_service

    t1 = time.monotonic()
    model = settings.model.model_copy(update={
        "input_size": 128, "alpha": 0.05, "device": "cpu", "artifact_store": test_settings.model.artifact_store,
        "feature_cache": ROOT / ".cache" / "test-features",
    })  # fmt: skip
    trainer = settings.trainer.model_copy(update={"detector": {"n_blocks": 2, "epochs": 3}, "reference_size": 50})
    svc = build_service(settings.model_copy(update={"model": model, "trainer": trainer}), intake=False,
                        progress=False)  # fmt: skip
    assert svc.ctx.store.root == settings.trainer.workdir
    ingest_path(svc.ctx.store, data_dir / "cifar10" / "train.zip", limit=300)  # the rest of the vetted ID data
    job = svc.run_once("manual")
    assert job is not None and job.data_sizes["total"] == 300 + ACCEPTED, job.message
    auroc = job.gates["auroc"]
    assert auroc["value"] is not None and f"n={len(rest)})" in auroc["detail"], auroc
    print(f"\nstream + scoring {t_stream:.1f} s, triage and vetting {t_vet:.1f} s, trainer job "
          f"{time.monotonic() - t1:.1f} s ({job.outcome}; {auroc['detail']}); {len(flagged)} of {N_OOD} MNIST "
          f"flagged, {ACCEPTED} accepted, {len(rest)} rejected")  # fmt: skip
