"""A burst of images just under the pixel limit (~39.7 Mpx each, ~0.6 MB on the wire): all are scored, and the
monitor's peak RSS (VmHWM) is printed against its RSS before the burst and against the decoded-bytes budget."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest

from tests.faults.harness import Msg, image_msgs, pick, wait_progress
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import load_images

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]

WIDTH, HEIGHT = 7300, 5438  # 39,697,400 px, just under DLSR_MONITOR__MAX_IMAGE_PIXELS (40,000,000)
BUDGET = 512 << 20  # DLSR_MONITOR__MAX_DECODED_BYTES for the run: two images' worth of decoded pixels
THREADS = 4  # decode threads: more than the budget admits at once, so the budget is what bounds memory


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def big_png(seed: int) -> bytes:
    """A WIDTH x HEIGHT RGB PNG whose rows repeat (it compresses ~400:1), different per seed."""
    rng = np.random.default_rng(seed)
    row = np.zeros((WIDTH, 3), np.uint8)
    row[:, 0] = np.arange(WIDTH) % 256
    row[:, 1] = rng.integers(0, 256)
    row[:, 2] = (np.arange(WIDTH) // 64 * 37 + seed) % 256
    raw_row = b"\x00" + row.tobytes()
    c = zlib.compressobj(6)
    idat = b"".join([c.compress(raw_row) for _ in range(HEIGHT)] + [c.flush()])
    ihdr = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@scenario_body("memory_burst")
def scenario_memory_burst(s: Scenario) -> None:
    from dlsr.images import decoded_bytes

    s.prepare(partitions=3)
    n_big = pick(4, 16)
    mon = s.monitor("burst", DLSR_MONITOR__MAX_DECODED_BYTES=BUDGET, DLSR_MONITOR__DECODE_THREADS=THREADS)
    bigs = [big_png(i) for i in range(n_big)]
    per_image = decoded_bytes(bigs[0])
    # Warm up on small images first (model, threads, allocator), then measure from a settled RSS.
    warm = image_msgs(load_images(s.data_dir, "cifar10", "test", 16, seed=81), ["camM"])
    s.send(warm)
    wait_progress(s.outputs, s.sent, len(s.sent), 120, alive=(mon,))
    time.sleep(1.5)
    before = mon.status()
    s.send([Msg(v, b"camM", [("source", b"camM")], i % 3, "big") for i, v in enumerate(bigs)])
    wait_progress(s.outputs, s.sent, len(s.sent), pick(150, 400), alive=(mon,))
    after = mon.status()
    mib = 1 << 20
    growth = after.get("VmHWM", 0) - before.get("VmRSS", 0)
    s.extra.update({
        "images": n_big, "image_px": WIDTH * HEIGHT, "wire_bytes_each": len(bigs[0]),
        "decoded_estimate_each_mib": round(per_image / mib, 1), "budget_mib": BUDGET // mib,
        "decode_threads": THREADS, "rss_before_mib": round(before.get("VmRSS", 0) / mib),
        "hwm_before_mib": round(before.get("VmHWM", 0) / mib), "hwm_after_mib": round(after.get("VmHWM", 0) / mib),
        "growth_mib": round(growth / mib),
    })
    admitted = max(1, BUDGET // max(1, per_image))  # images the budget lets decode at once, by the estimate
    s.extra.update({"admitted_at_once": admitted, "within_budget": growth <= BUDGET})
    s.notes.append(
        f"{n_big} x {WIDTH}x{HEIGHT} PNG ({len(bigs[0]) // 1024} KiB each, ~{per_image / mib:.0f} MiB decoded "
        f"each); RSS before {before.get('VmRSS', 0) / mib:.0f} MiB (peak so far {before.get('VmHWM', 0) / mib:.0f}), "
        f"peak after {after.get('VmHWM', 0) / mib:.0f} MiB: +{growth / mib:.0f} MiB vs budget {BUDGET // mib} MiB "
        f"({THREADS} decode threads; the estimate admits {admitted} at once) -> "
        + ("within the budget" if growth <= BUDGET else f"OVER the budget by {(growth - BUDGET) / mib:.0f} MiB")
    )
    row, t = s.finish(timeout_s=60, alive=[mon])
    s.check(row, t)
    big_scored = [r for r in s.outputs.score_recs if r.source == "camM"]
    assert len({(r.partition, r.offset) for r in big_scored}) == len(s.sent), "every big image scored"
    # README's bound: idle RSS + the decoded-bytes budget + two batches of preprocessed pixels + the fetched
    # message values (here the whole burst on the wire).
    bound = BUDGET + 2 * 64 * 3 * 224 * 224 * 4 + sum(len(b) for b in bigs)
    assert growth <= bound, s.notes[-1]


def test_memory_burst(fault_runner):
    fault_runner.result("memory_burst", RESULT_TIMEOUT_S)
