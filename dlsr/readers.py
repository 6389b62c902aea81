"""Image sets as (name, bytes) items: zip files, ImageFolder trees, flat folders and numpy arrays.

Items stay encoded bytes so the feature cache can key them by content (sha256 of the bytes). Decoding happens
later (`decode_items`); a file that does not decode is reported by name, never fatal.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dlsr.images import ImageDecodeError, decode_image, image_size

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageItem:
    """One encoded image and the name it is reported under (path inside the zip or folder)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class ImageFailure:
    """An item that could not be read or decoded."""

    name: str
    reason: str
    detail: str = ""


@runtime_checkable
class ImageSet(Protocol):
    """A sized, re-iterable collection of `ImageItem`s."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[ImageItem]: ...


@dataclass
class LazyImageSet:
    """An `ImageSet` whose bytes are read on iteration; `errors` collects items that could not be read."""

    names: list[str]
    _read: Callable[[list[str]], Iterator[tuple[str, bytes]]]
    source: str = ""
    errors: list[ImageFailure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[ImageItem]:
        for name, data in self._read(self.names):
            yield ImageItem(name, data)

    def __repr__(self) -> str:
        return f"LazyImageSet({self.source!r}, {len(self)} images)"


@dataclass
class MemoryImageSet:
    """An `ImageSet` held in memory."""

    items: list[ImageItem]
    source: str = "memory"
    errors: list[ImageFailure] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self.items)


def _subset(names: list[str], limit: int | None, seed: int) -> list[str]:
    """A deterministic subset (same names for the same limit and seed), kept in the original order."""
    if limit is None or limit >= len(names):
        return names
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    # A prefix of one seeded permutation: subsets with the same seed are nested (limit 5000 is inside
    # limit 10000), so growing a subset reuses every feature cached for the smaller one.
    idx = np.random.default_rng(seed).permutation(len(names))[:limit]
    return [names[i] for i in sorted(idx)]


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not Path(name).name.startswith(".")


def open_images(path: str | Path, *, limit: int | None = None, seed: int = 0) -> LazyImageSet:
    """Open a zip, an ImageFolder tree (`<label>/<file>`) or a flat folder of images.

    Names are paths relative to the zip or folder root (e.g. `airplane/0001.jpg`), sorted.

    Args:
        path: a `.zip` file or a directory.
        limit: keep a random subset of this many images (deterministic given `seed`), in sorted order.
        seed: seed of the subset.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` holds no image files.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"image source {p} does not exist: pass a .zip, an image folder or a flat folder"
        )
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise ValueError(f"{p} is neither a folder nor a zip file")
        with zipfile.ZipFile(p) as zf:
            names = sorted(i.filename for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename))
        reader = _zip_reader(p)
    else:
        names = sorted(
            f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file() and _is_image_name(f.name)
        )
        reader = _folder_reader(p)
    if not names:
        raise ValueError(f"{p} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    image_set = LazyImageSet(_subset(names, limit, seed), reader, source=str(p))
    image_set._read = _recording(reader, image_set.errors)
    return image_set


def _recording(
    reader: Callable[[list[str]], Iterator[tuple[str, bytes | ImageFailure]]], errors: list[ImageFailure]
) -> Callable[[list[str]], Iterator[tuple[str, bytes]]]:
    # Unreadable entries go to `errors` (once per name) instead of stopping the iteration.
    def read(names: list[str]) -> Iterator[tuple[str, bytes]]:
        seen = {e.name for e in errors}
        for name, data in reader(names):
            if isinstance(data, ImageFailure):
                if name not in seen:
                    errors.append(data)
                    seen.add(name)
                continue
            yield name, data

    return read


def _zip_reader(path: Path) -> Callable[[list[str]], Iterator[tuple[str, bytes | ImageFailure]]]:
    def read(names: list[str]) -> Iterator[tuple[str, bytes | ImageFailure]]:
        with zipfile.ZipFile(path) as zf:  # opened per iteration: safe to iterate from several threads
            for name in names:
                try:
                    yield name, zf.read(name)
                except (zipfile.BadZipFile, OSError, KeyError, EOFError) as exc:
                    yield name, ImageFailure(name, "unreadable", str(exc))

    return read


def _folder_reader(root: Path) -> Callable[[list[str]], Iterator[tuple[str, bytes | ImageFailure]]]:
    def read(names: list[str]) -> Iterator[tuple[str, bytes | ImageFailure]]:
        for name in names:
            try:
                yield name, (root / name).read_bytes()
            except OSError as exc:
                yield name, ImageFailure(name, "unreadable", str(exc))

    return read


def source_side(images: Iterable[ImageItem], *, limit: int = 64) -> int | None:
    """Median shorter side (px) of the first `limit` readable images, from their headers; None if none is."""
    sides = []
    for item in images:
        size = image_size(item.data)
        if size is not None:
            sides.append(min(size))
        if len(sides) >= limit:
            break
    return int(np.median(sides)) if sides else None


def array_images(arr: np.ndarray, names: Sequence[str] | None = None) -> MemoryImageSet:
    """Wrap uint8 arrays (N, H, W) or (N, H, W, C) with C in {1, 3, 4} as PNG-encoded items (lossless).

    Names default to the zero-padded index (`00000`, `00001`, ...).
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ValueError(f"array_images needs uint8 pixels, got {a.dtype}: scale to 0..255 and cast first")
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"array_images needs shape (N, H, W) or (N, H, W, 3|4), got {a.shape}")
    if names is None:
        width = max(5, len(str(len(a))))
        names = [str(i).zfill(width) for i in range(len(a))]
    if len(names) != len(a):
        raise ValueError(f"{len(names)} names for {len(a)} images")
    items = []
    for name, px in zip(names, a, strict=True):
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG", compress_level=1)
        items.append(ImageItem(str(name), buf.getvalue()))
    return MemoryImageSet(items, source="array")


def decode_items(
    items: Iterable[ImageItem], *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000
) -> tuple[list[Image.Image], list[str], list[ImageFailure]]:
    """Decode items to RGB; returns (images, names of the decoded ones, failures by name)."""
    images: list[Image.Image] = []
    names: list[str] = []
    failures: list[ImageFailure] = []
    for item in items:
        try:
            images.append(decode_image(item.data, max_bytes=max_bytes, max_pixels=max_pixels))
            names.append(item.name)
        except ImageDecodeError as exc:
            failures.append(ImageFailure(item.name, exc.reason, exc.detail))
    return images, names, failures
