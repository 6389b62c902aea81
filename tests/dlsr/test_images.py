"""decode_image: limits before decoding, EXIF orientation, every mode to RGB, only ImageDecodeError raised."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dlsr.images import ImageDecodeError, decode_image, image_size


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kw)
    return info.value.reason


def test_rgb_jpeg_decodes_to_rgb():
    im = decode_image(_encode(Image.new("RGB", (32, 32), (200, 10, 10)), "JPEG"))
    assert im.mode == "RGB" and im.size == (32, 32)
    assert abs(int(np.asarray(im)[0, 0, 0]) - 200) < 8


def test_empty_and_byte_limit():
    assert _reason(b"") == "empty"
    assert _reason(_encode(Image.new("RGB", (8, 8)), "PNG"), max_bytes=10) == "too_many_bytes"


def test_pixel_limit_is_checked_from_the_header():
    assert _reason(_encode(Image.new("RGB", (20, 20)), "PNG"), max_pixels=399) == "too_many_pixels"
    # A PNG whose header claims 7000x7000 but holds no pixel data: refused on the header, not "truncated".
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    ihdr = struct.pack(">II", 7000, 7000) + png[24:29]
    forged = png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]
    assert _reason(forged) == "too_many_pixels"
    assert _reason(forged, max_pixels=10**8) in {"truncated", "not_an_image"}  # the same bytes, decoded


def test_not_an_image_and_truncated():
    assert _reason(b"hello, this is text, not pixels") == "not_an_image"
    data = _encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG"
    )
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("LA", (4, 4), (10, 0)), "PNG", (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG", (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), "PNG", (255, 255, 255)),
        (Image.new("I", (4, 4), 40000), "TIFF", (156, 156, 156)),
        (Image.new("F", (4, 4), 0.5), "TIFF", (128, 128, 128)),
    ],
)
def test_modes_become_rgb(image, fmt, expected):
    out = decode_image(_encode(image, fmt))
    assert out.mode == "RGB"
    assert tuple(int(v) for v in np.asarray(out)[0, 0]) == expected


def test_palette_with_transparency_composited_on_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    p.info["transparency"] = 0
    out = decode_image(_encode(p, "PNG", transparency=0))
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg():
    out = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert out.mode == "RGB" and np.asarray(out).min() > 240


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    px = np.asarray(decode_image(buf.getvalue()))[0, 0]
    assert px[0] > 200 and px[2] < 50


def test_garbage_raises_only_image_decode_error():
    rng = np.random.default_rng(1)
    good = _encode(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), "PNG")
    samples = [rng.bytes(int(n)) for n in rng.integers(1, 400, 30)]
    for _ in range(60):  # corrupt a valid PNG at random places
        b = bytearray(good)
        for pos in rng.integers(0, len(b), 4):
            b[pos] = int(rng.integers(0, 256))
        samples.append(bytes(b))
    outcomes = set()
    for s in samples:
        try:
            outcomes.add(decode_image(s).mode)
        except ImageDecodeError as exc:
            outcomes.add(exc.reason)
    assert "not_an_image" in outcomes
    assert outcomes <= {
        "RGB",
        "not_an_image",
        "truncated",
        "decode_failed",
        "too_many_pixels",
        "unsupported_mode",
    }


def test_image_size_reads_the_header_only():
    buf = io.BytesIO()
    Image.new("L", (28, 30)).save(buf, format="PNG")
    assert image_size(buf.getvalue()) == (28, 30)
    assert image_size(b"not an image") is None
