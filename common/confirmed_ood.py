"""Images operators confirmed as out of distribution (`dlsr vet reject`): a folder the trainer reads.

Layout: `<trainer workdir>/confirmed_ood/<sha256>.<ext>`, the original bytes, one file per content hash (so
storing the same image twice adds nothing). The console writes it (`console/vet.py`); the trainer adds it to its
reference OOD set for the AUROC gate (`trainer/reference_ood.py`), next to `DLSR_TRAINER__REFERENCE_OOD`.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

CONFIRMED_OOD_DIR = "confirmed_ood"

# Pillow format name -> the file extension `dlsr.readers.open_images` picks up.
_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif", "PPM": "ppm"}


def confirmed_ood_dir(workdir: str | Path) -> Path:
    """The confirmed-OOD folder under a trainer workdir (`settings.trainer.workdir`)."""
    return Path(workdir) / CONFIRMED_OOD_DIR


def image_extension(data: bytes) -> str:
    """File extension for encoded image bytes (from the format Pillow reads in them), e.g. "jpg".

    Raises:
        ValueError: the bytes are not an image in a format the trainer's reader takes.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    ext = _EXT.get(fmt or "")
    if ext is None:
        raise ValueError(f"image format {fmt} is not one the trainer reads ({', '.join(sorted(_EXT.values()))})")
    return ext


def confirmed_path(workdir: str | Path, sha256: str, data: bytes) -> Path:
    """Where `data` (whose content hash is `sha256`) is kept."""
    return confirmed_ood_dir(workdir) / f"{sha256}.{image_extension(data)}"


def store_confirmed(workdir: str | Path, data: bytes) -> tuple[Path, bool]:
    """Keep `data` as a confirmed OOD image; returns (path, created). Atomic (temp file + rename); a file
    already there (same content hash) is left alone."""
    sha = hashlib.sha256(data).hexdigest()
    path = confirmed_path(workdir, sha, data)
    if path.is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{sha}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path, True


def confirmed_files(workdir: str | Path) -> list[Path]:
    """The stored confirmed OOD images, sorted by name (content hash)."""
    folder = confirmed_ood_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
