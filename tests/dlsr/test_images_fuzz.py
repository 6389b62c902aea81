"""Fuzzing `dlsr.images` (hypothesis): whatever the bytes, `decode_image` returns a loaded RGB image within the
pixel limit or raises `ImageDecodeError` with a known reason, never anything else; `decoded_bytes` never raises
and is >= 0 (and > 0 for anything `decode_image` accepts, or the decode budget would reserve nothing for it).

Inputs: random bytes; mutations (bit flips, bytes, interesting 16/32-bit values, truncation, insertion,
deletion, duplication) of small valid PNG / JPEG / GIF / WebP / TIFF / BMP seeds; PNGs built chunk by chunk
with valid CRCs and any header fields. Warnings are ignored as in production (pytest turns them into errors).

Size: DLSR_FUZZ_EXAMPLES examples per test (default small: this file and tests/common/test_contract_fuzz.py
take well under a minute together on 2 cores); executions per second are printed at the end of the session.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dlsr.images import ImageDecodeError, decode_image, decoded_bytes
from tests.faults.fuzzstats import counter, examples, install

REASONS = {"empty", "too_many_bytes", "too_many_pixels", "not_an_image", "truncated", "unsupported_mode",
           "decode_failed"}
MAX_PIXELS = 1_000_000  # small, so a mutated header cannot make one example slow; the contract holds for any
MAX_BYTES = 1_000_000



def fuzz(default_examples: int) -> settings:
    return settings(deadline=None, database=None, max_examples=examples(default_examples),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# Seconds per test: out of `make test-fast`, in `make test`; a long DLSR_FUZZ_EXAMPLES run gets a longer timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 + examples(0) // 10)]

@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary(request):
    install(request.config)


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    frames = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB") for _ in range(3)]
    return {
        "png_rgb": _enc(rgb, "PNG"),
        "png_rgba": _enc(rgb.convert("RGBA"), "PNG"),
        "png_palette_trns": _enc(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=1),
        "png_16bit": _enc(Image.fromarray((rng.integers(0, 65535, (6, 7))).astype(np.uint16)), "PNG"),
        "png_grey": _enc(rgb.convert("L"), "PNG"),
        "jpeg": _enc(rgb, "JPEG", quality=80),
        "jpeg_progressive": _enc(rgb, "JPEG", quality=80, progressive=True),
        "jpeg_cmyk": _enc(rgb.convert("CMYK"), "JPEG"),
        "gif": _enc(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "gif_animated": _enc(frames[0].convert("P"), "GIF", save_all=True,
                             append_images=[f.convert("P") for f in frames[1:]], duration=20),
        "webp_lossy": _enc(rgb, "WEBP", quality=70),
        "webp_lossless": _enc(rgb.convert("RGBA"), "WEBP", lossless=True),
        "tiff": _enc(rgb, "TIFF"),
        "tiff_float": _enc(Image.fromarray(rng.normal(size=(5, 6)).astype(np.float32), "F"), "TIFF"),
        "bmp": _enc(rgb, "BMP"),
    }


SEEDS = _seeds()
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 40_000, 1_000_000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    b = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        if not b:
            break
        op = draw(st.sampled_from(["flip", "byte", "u16", "u32", "truncate", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            b[pos] = draw(st.integers(0, 255))
        elif op in ("u16", "u32"):
            v = draw(st.sampled_from(INTERESTING))
            fmt = draw(st.sampled_from(["<", ">"])) + ("H" if op == "u16" else "I")
            packed = struct.pack(fmt, v & (0xFFFF if op == "u16" else 0xFFFFFFFF))
            b[pos:pos + len(packed)] = packed
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 64))]
        else:
            n = draw(st.integers(1, 256))
            b[pos:pos] = b[pos:pos + n]
    return name, bytes(b)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@st.composite
def built_png(draw) -> bytes:
    """A PNG with valid CRCs and arbitrary header fields / chunks / pixel stream."""
    big = st.sampled_from([0, 1000, 2000, 65535, 2**31 - 1, 2**32 - 1])
    w = draw(st.one_of(st.integers(1, 64), big) if draw(st.integers(0, 5)) else big)
    h = draw(st.one_of(st.integers(1, 64), big) if draw(st.integers(0, 5)) else big)
    valid = [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3), (8, 4),
             (16, 4), (8, 6), (16, 6)]
    if draw(st.integers(0, 6)):
        depth, ctype = draw(st.sampled_from(valid))
    else:
        depth, ctype = draw(st.integers(0, 255)), draw(st.integers(0, 255))
    interlace = draw(st.sampled_from([0, 0, 1, 2]))
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace))]
    if ctype == 3 or draw(st.integers(0, 4)) == 0:
        n = draw(st.integers(0, 256))
        chunks.append(_chunk(b"PLTE", draw(st.binary(min_size=3 * n, max_size=3 * n))))
    if draw(st.integers(0, 3)) == 0:
        chunks.append(_chunk(b"tRNS", draw(st.binary(max_size=16))))
    sizes = {b"gAMA": 4, b"pHYs": 9, b"acTL": 8, b"fcTL": 26, b"sBIT": 3}
    for tag in draw(st.lists(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"pHYs", b"gAMA",
                                              b"acTL", b"fcTL", b"sBIT"]), max_size=2)):
        n = sizes.get(tag)
        body = draw(st.binary(min_size=n, max_size=n) if n and draw(st.booleans()) else st.binary(max_size=64))
        chunks.append(_chunk(tag, body))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ctype, 1)
    row_bytes = (w * channels * depth + 7) // 8 if 0 < w <= 64 and 0 < depth <= 16 else 0
    if row_bytes and 0 < h <= 64 and draw(st.integers(0, 3)):  # a plausible pixel stream: filter byte + row
        rows = [bytes([draw(st.integers(0, 4))]) + draw(st.binary(min_size=row_bytes, max_size=row_bytes))
                for _ in range(h)]
        raw = b"".join(rows)
        raw = raw[: draw(st.integers(0, len(raw)))] if draw(st.integers(0, 9)) == 0 else raw
    else:
        raw = draw(st.binary(max_size=2048))
    idat = zlib.compress(raw) if draw(st.integers(0, 4)) else raw
    chunks.append(_chunk(b"IDAT", idat))
    if draw(st.booleans()):
        chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _check(data: bytes, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # production does not turn Pillow's warnings into errors
        with counter(name) as stat:
            estimate = decoded_bytes(data)
            try:
                im = decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
            except ImageDecodeError as exc:
                stat.note(exc.reason)
                assert exc.reason in REASONS, f"unknown reason {exc.reason!r} ({exc})"
                assert isinstance(estimate, int) and estimate >= 0
                return
            stat.note("decoded")
    assert isinstance(estimate, int) and estimate >= 0
    assert im.mode == "RGB", im.mode
    w, h = im.size
    assert 0 < w * h <= MAX_PIXELS, im.size
    assert im.getpixel((0, 0)) is not None  # fully loaded, readable
    assert estimate > 0, f"decode_image accepted a {w}x{h} image that decoded_bytes sizes at 0"


@fuzz(3000)
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"GIF89a")
@example(b"\xff\xd8\xff")
@example(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
@example(b"II*\x00")
def test_random_bytes(data):
    _check(data, "decode_image random bytes")


@fuzz(4000)
@given(mutated())
def test_mutated_seeds(case):
    _check(case[1], "decode_image mutated seeds")


@fuzz(3000)
@given(built_png())
def test_built_png(data):
    _check(data, "decode_image built PNG")


def test_seeds_decode():
    """The seeds themselves are good images (else the mutations would start from garbage)."""
    for name, data in SEEDS.items():
        im = decode_image(data)
        assert im.mode == "RGB", name
