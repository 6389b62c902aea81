"""Decode untrusted image bytes into RGB PIL images, with limits checked before the pixels are decoded.

The monitor calls `decode_image` for every message it consumes, so it raises only `ImageDecodeError` (a
`ValueError` carrying a short `reason` slug) whatever the bytes are.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Modes Pillow converts to RGB correctly with a plain `convert("RGB")`.
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "HSV", "P"}
# Modes that carry an alpha channel: composited on white so a transparent background looks like paper,
# the same way for every alpha mode.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. `reason` is a short slug for metrics and dead-letter headers.

    Reasons: empty, too_many_bytes, too_many_pixels, not_an_image, truncated, unsupported_mode, decode_failed.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def decode_image(data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode `data` to a fully loaded RGB image (EXIF orientation applied, first frame of animations).

    Args:
        data: the encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF, ... whatever Pillow reads).
        max_bytes: refuse larger inputs without parsing them.
        max_pixels: refuse images whose header declares more pixels, before decoding the pixels.

    Raises:
        ImageDecodeError: with `reason` one of the slugs listed on the class; never anything else.
    """
    try:
        return _decode(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any other failure inside Pillow: bytes are data, never a crash
        raise ImageDecodeError("decode_failed", f"{type(exc).__name__}: {exc}") from exc


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, without decoding pixels; None when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - unreadable headers are decode_image's to report
        return None


def decoded_bytes(data: bytes) -> int:
    """Upper estimate of the memory `decode_image(data)` holds at its peak, read from the header only.

    0 when the header is unreadable (`decode_image` then fails fast without decoding pixels). Used to keep the
    decoded pixels in flight within a budget.
    """
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            width, height, mode = *im.size, im.mode
    except Exception:  # noqa: BLE001 - unreadable headers are decode_image's to report
        return 0
    pixels = max(0, int(width)) * max(0, int(height))
    # Pillow keeps every multi-band image at 4 bytes a pixel (RGB included) and 1-band 8-bit ones at 1; the
    # peak is the decoded frame + the copies of the RGB conversion: alpha is composited on white (RGBA,
    # background, composite, RGB); 16-bit and float frames are rescaled through float64 (8 bytes) to 8 bits.
    # Measured: a 39.7 Mpx RGB PNG peaks at 303 MiB, i.e. 8 bytes a pixel.
    if mode in _ALPHA_MODES or mode == "P":
        per_pixel = 4 + 4 + 4 + 4
    elif mode.startswith("I") or mode == "F":
        per_pixel = 4 + 8 + 1 + 4
    else:
        per_pixel = (1 if mode in ("L", "1") else 4) + 4
    return pixels * per_pixel


def _decode(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError("not_an_image", f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageDecodeError("empty", "0 bytes")
    if size > max_bytes:
        raise ImageDecodeError("too_many_bytes", f"{size} bytes > limit {max_bytes}")
    try:
        # Image.open reads only the header: the size check below happens before any pixel is decoded.
        im = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", "no image format recognised") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("not_an_image", str(exc)) from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("not_an_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} > limit {max_pixels} pixels")
    try:
        im.seek(0)  # first frame of an animation
        im.load()
    except OSError as exc:
        msg = str(exc)
        reason = (
            "truncated" if "truncat" in msg.lower() or "broken data stream" in msg.lower() else "not_an_image"
        )
        raise ImageDecodeError(reason, msg) from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("truncated", str(exc)) from exc
    # A broken EXIF block is not worth dropping the picture for: keep it unrotated.
    with contextlib.suppress(Exception):
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        mode, im = "RGBA", im.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError("unsupported_mode", f"cannot convert mode {mode} to RGB") from exc


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel image to 8 bits."""
    a = arr.astype(np.float64)
    if a.ndim != 2:
        raise ImageDecodeError("unsupported_mode", f"mode {mode} with shape {arr.shape}")
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0  # full 16-bit range onto 0..255
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif lo < 0 or hi > 255:
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
