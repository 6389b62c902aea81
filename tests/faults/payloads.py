"""Hostile inputs made in code (Pillow, numpy, zlib): broken and malicious image payloads, and poison headers.

`hostile_payloads()` -> {kind: bytes}; `poison_header_msgs(...)` -> messages whose value is a good image and
whose headers / key are not.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

from tests.integration.conftest import png_bomb

PAYLOAD_OVERSIZE_LIMIT = 2_000_000  # the hostile scenario runs with DLSR_MONITOR__MAX_IMAGE_BYTES at this


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(w: int = 96, h: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), rng.integers(0, 256, (h, w))], -1)
    im = Image.fromarray(arr.astype(np.uint8), "RGB")
    return im if mode == "RGB" else im.convert(mode)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_with_chunk(extra: bytes, *, before_idat: bool = True) -> bytes:
    png = _enc(_picture(32, 32), "PNG")
    head, rest = png[:33], png[33:]  # signature (8) + IHDR chunk (25)
    return head + extra + rest if before_idat else png[:-12] + extra + png[-12:]


def _corrupt_middle(data: bytes, seed: int, n: int = 40) -> bytes:
    rng = random.Random(seed)
    b = bytearray(data)
    lo, hi = len(b) // 4, len(b) - 4
    for _ in range(n):
        b[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(b)


def _gif_bomb() -> bytes:
    # A GIF whose logical screen and only frame claim 65535 x 65535 (4.3 Gpx), with almost no data.
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x4c\x01\x00"
    return header + frame + b"\x3b"


def _tiff_bomb() -> bytes:
    # A little-endian TIFF, one strip, claiming 100000 x 100000 pixels of 8-bit grey.
    entries = [
        (256, 4, 1, 100_000),  # ImageWidth LONG
        (257, 4, 1, 100_000),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # Photometric min-is-black
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, 100_000),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts (a lie)
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else
                                                      struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def _bmp_bomb() -> bytes:
    # BMP info header: 30000 x 30000 x 24 bit (900 Mpx), 54 bytes of file.
    w = h = 30_000
    return (b"BM" + struct.pack("<IHHI", 54 + w * h * 3, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, w * h * 3, 2835, 2835, 0, 0) + b"\x00" * 16)


def _png_ztxt_bomb() -> bytes:
    # A zTXt chunk that inflates to 64 MiB of text from ~64 KiB on the wire.
    text = zlib.compress(b"A" * (64 << 20), 9)
    return _png_with_chunk(_chunk(b"zTXt", b"Comment\x00\x00" + text))


def _png_zero_size() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def _cmyk_jpeg() -> bytes:
    return _enc(_picture(80, 60).convert("CMYK"), "JPEG", quality=90)


def _png16() -> bytes:
    arr = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    return _enc(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def _palette_transparent() -> bytes:
    im = _picture(40, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _enc(im, "PNG", transparency=0)


def _animated(fmt: str) -> bytes:
    frames = [_picture(48, 48, seed=i) for i in range(6)]
    kw = {"save_all": True, "append_images": frames[1:], "duration": 40, "loop": 0}
    if fmt == "GIF":
        frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
        kw["append_images"] = frames[1:]
    return _enc(frames[0], fmt, **kw)


def _exif_rotated() -> bytes:
    im = _picture(90, 30)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _enc(im, "JPEG", exif=exif.tobytes(), quality=90)


def _broken_exif_jpeg() -> bytes:
    # An APP1 Exif segment whose IFD offset points far past the end.
    jpg = _enc(_picture(40, 40), "JPEG")
    app1 = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\x00" * 8
    seg = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return jpg[:2] + seg + jpg[2:]


def _zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cat.png", _enc(_picture(16, 16), "PNG"))
    return buf.getvalue()


def _float_tiff() -> bytes:
    arr = np.linspace(-1e30, 1e30, 32 * 32, dtype=np.float32).reshape(32, 32)
    arr[0, 0] = np.nan
    arr[0, 1] = np.inf
    return _enc(Image.fromarray(arr, "F"), "TIFF")


def _int32_tiff() -> bytes:
    arr = np.linspace(-2**31, 2**31 - 1, 24 * 24).astype(np.int32).reshape(24, 24)
    return _enc(Image.fromarray(arr, "I"), "TIFF")


def _multipage_tiff() -> bytes:
    frames = [_picture(32, 32, seed=i) for i in range(8)]
    return _enc(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def _huge_icc_jpeg() -> bytes:
    return _enc(_picture(32, 32), "JPEG", icc_profile=b"\x00" * 60_000)


def hostile_payloads() -> dict[str, bytes]:
    """At least 25 kinds of bad, odd or malicious values, by name (deterministic)."""
    jpeg = _enc(_picture(), "JPEG", quality=90)
    png = _enc(_picture(), "PNG")
    gif = _enc(_picture().convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    webp = _enc(_picture(), "WEBP", quality=80)
    tiff = _enc(_picture(), "TIFF")
    progressive = _enc(_picture(200, 150), "JPEG", progressive=True, quality=90)
    rng = random.Random(7)
    return {
        "jpeg_truncated": jpeg[: len(jpeg) // 2],
        "jpeg_corrupt": _corrupt_middle(jpeg, 1),
        "jpeg_progressive_truncated": progressive[: len(progressive) * 2 // 3],
        "jpeg_soi_only": b"\xff\xd8\xff\xe0" + b"\x00" * 10,
        "png_truncated": png[: len(png) // 2],
        "png_corrupt_idat": _corrupt_middle(png, 2),
        "png_signature_only": png[:8],
        "gif_truncated": gif[: len(gif) // 2],
        "gif_corrupt": _corrupt_middle(gif, 3),
        "webp_truncated": webp[: len(webp) // 2],
        "webp_corrupt": _corrupt_middle(webp, 4),
        "tiff_truncated": tiff[: len(tiff) // 3],
        "tiff_corrupt": _corrupt_middle(tiff, 5),
        "png_bomb_10gpx": png_bomb(),
        "png_bomb_100mpx": png_bomb(10_000, 10_000),  # between Pillow's warning and its error: our limit decides
        "gif_bomb_4gpx": _gif_bomb(),
        "tiff_bomb_10gpx": _tiff_bomb(),
        "bmp_bomb_900mpx": _bmp_bomb(),
        "png_ztxt_bomb_64mib": _png_ztxt_bomb(),
        "png_huge_text_1mib": _png_with_chunk(_chunk(b"tEXt", b"Comment\x00" + b"x" * (1 << 20))),
        "png_zero_size": _png_zero_size(),
        "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
               b'<circle cx="50" cy="50" r="40"/></svg>',
        "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "json": json.dumps({"image": "not really", "pixels": [1, 2, 3]}).encode(),
        "zip": _zip_archive(),
        "gzip_of_png": zlib.compress(png),
        "pdf_header": b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "empty": b"",
        "random_16b": bytes(rng.getrandbits(8) for _ in range(16)),
        "random_64kib": bytes(rng.getrandbits(8) for _ in range(65536)),
        "nul_bytes_4kib": b"\x00" * 4096,
        "oversize_value": b"\xff\xd8\xff" + b"\x00" * (PAYLOAD_OVERSIZE_LIMIT + 1000),
        "one_pixel_png": _enc(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "one_pixel_gif": _enc(Image.new("P", (1, 1)), "GIF"),
        "aspect_1x20000_png": _enc(Image.new("RGB", (1, 20000), (0, 128, 255)), "PNG"),
        "aspect_20000x1_png": _enc(Image.new("RGB", (20000, 1), (0, 128, 255)), "PNG"),
        "cmyk_jpeg": _cmyk_jpeg(),
        "png_16bit": _png16(),
        "png_palette_transparency": _palette_transparent(),
        "png_la_alpha": _enc(_picture(30, 30).convert("LA"), "PNG"),
        "gif_animated": _animated("GIF"),
        "webp_animated": _animated("WEBP"),
        "webp_lossless_alpha": _enc(_picture(30, 30).convert("RGBA"), "WEBP", lossless=True),
        "jpeg_exif_rotated": _exif_rotated(),
        "jpeg_broken_exif": _broken_exif_jpeg(),
        "jpeg_huge_icc": _huge_icc_jpeg(),
        "tiff_float_nan_inf": _float_tiff(),
        "tiff_int32": _int32_tiff(),
        "tiff_multipage": _multipage_tiff(),
        "bmp_tiny": _enc(_picture(8, 8), "BMP"),
        "ico": _enc(_picture(32, 32), "ICO"),
    }


# Poison headers: (kind, headers, key). The value is a good image; `source` stays sane unless the test is it.
def poison_headers(offset_tag: str) -> list[tuple[str, list[tuple[str, bytes]], bytes | None]]:
    src = [("source", b"poison")]
    out: list[tuple[str, list[tuple[str, bytes]], bytes | None]] = []
    for name, ts in [
        ("ts_nan", b"nan"), ("ts_inf", b"inf"), ("ts_neg_inf", b"-inf"), ("ts_1e300", b"1e300"), ("ts_minus_1", b"-1"),
        ("ts_far_future", b"4102444800"), ("ts_far_past", b"86400"), ("ts_ms_far_future", b"99999999999999"),
        ("ts_non_utf8", b"\xff\xfe\x80\x81"), ("ts_100kb", b"1" * 100_000), ("ts_iso_garbage", b"2024-13-45T99:99"),
        ("ts_iso_year_1", b"0001-01-01T00:00:00"), ("ts_empty", b""),
    ]:
        out.append((name, [*src, ("ts", ts)], b"poison"))
    out += [
        ("image_id_100kb", [*src, ("image_id", b"i" * 100_000)], b"poison"),
        ("image_id_non_utf8", [*src, ("image_id", b"\xc3\x28\xa0\xa1")], b"poison"),
        ("image_id_control_chars", [*src, ("image_id", f"id\x00\n\r\x1b[2J{offset_tag}".encode())], b"poison"),
        ("source_non_utf8", [("source", b"\xff\xfe\xfd")], b"poison-key"),
        ("source_huge", [("source", b"s" * 100_000)], b"poison"),
        ("source_redis_glob", [("source", b"cam:*?[]\x00\t")], b"poison"),
        ("key_huge", [], b"k" * 100_000),
        ("key_non_utf8_no_source", [], b"\xff\xfe\xfd\xfc"),
        ("key_none_no_headers", [], None),
        ("header_name_unicode", [*src, ("ts\u202e", b"1"), ("\U0001f4a5", b"\xff" * 10)], b"poison"),
        ("duplicate_headers", [("source", b"a"), ("source", b"b"), ("ts", b"nan"), ("ts", b"1")], b"poison"),
        ("many_headers", [*src] + [(f"h{i}", b"v" * 100) for i in range(2000)], b"poison"),
        ("dlq_header_spoof", [*src, ("error", b"fake"), ("origin", b"x:0:0"), ("error_detail", b"z")], b"poison"),
    ]
    return out
