"""Feature cache: each image is encoded once per encoder configuration, then reused by refits and sweeps.

Layout (append-only, safe to share between processes):

    <root>/<encoder name>-<identity hash[:16]>/identity.json      the encoder's identity() (the key)
    <root>/<encoder name>-<identity hash[:16]>/<shard id>.npy     float32 rows (n, D)
    <root>/<encoder name>-<identity hash[:16]>/<shard id>.keys    n sha256 digests (32 raw bytes each) of the
                                                                  image bytes, in row order

A shard's `.keys` file is written after its `.npy` (both renamed into place), so a shard is complete exactly when
its keys exist; an interrupted extraction keeps every finished shard and resumes from there.

Alignment: images that cannot be read or decoded get no row. `extract` returns the rows together with the names
they belong to (input order, failures left out) and the failures by name; `features` returns the rows only, so
it equals `extract(...).features`; use `extract` whenever an input may be corrupt and rows must be matched to names.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlsr.encoder import Encoder
from dlsr.readers import ImageFailure, ImageItem, decode_items

_DIGEST = 32


def identity_hash(identity: dict) -> str:
    """Stable sha256 of an encoder identity dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class FeatureResult:
    """Features of the decodable images of one request, in input order."""

    features: np.ndarray  # (M, D) float32
    names: list[str]  # name of each row
    keys: list[str]  # sha256 hex of each row's image bytes
    failures: list[ImageFailure] = field(default_factory=list)  # unreadable / undecodable items, by name
    n_encoded: int = 0  # images encoded by this call (the rest came from the cache)


class FeatureCache:
    """Features keyed by sha256(image bytes) x encoder identity, stored as append-only float32 shards."""

    def __init__(
        self,
        root: str | Path,
        *,
        shard_size: int = 2048,
        max_bytes: int = 20_000_000,
        max_pixels: int = 40_000_000,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.shard_size = shard_size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def directory(self, encoder: Encoder) -> Path:
        """The folder holding this encoder configuration's shards."""
        return self.root / f"{encoder.name}-{identity_hash(encoder.identity())[:16]}"

    def features(
        self, encoder: Encoder, images: Iterable[ImageItem], *, batch_size: int = 64, progress: bool = True
    ) -> np.ndarray:
        """(M, D) float32 features of the decodable images, in input order (see `extract` for names)."""
        return self.extract(encoder, images, batch_size=batch_size, progress=progress).features

    def extract(
        self, encoder: Encoder, images: Iterable[ImageItem], *, batch_size: int = 64, progress: bool = True
    ) -> FeatureResult:
        """Features for `images`, encoding only those not cached yet.

        Args:
            encoder: the encoder; its `identity()` selects the cache folder.
            images: an ImageSet (or any iterable of ImageItem).
            batch_size: encoder batch size.
            progress: show a progress bar while encoding.
        """
        folder = self.directory(encoder)
        folder.mkdir(parents=True, exist_ok=True)
        ident = folder / "identity.json"
        if not ident.exists():
            tmp = folder / f".identity-{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(encoder.identity(), indent=2, sort_keys=True))
            os.replace(tmp, ident)

        names: list[str] = []
        digests: list[bytes] = []
        todo: dict[bytes, ImageItem] = {}
        index = _load_index(folder)
        for item in images:
            d = hashlib.sha256(item.data).digest()
            names.append(item.name)
            digests.append(d)
            if d not in index and d not in todo:
                todo[d] = item
        failures: list[ImageFailure] = list(getattr(images, "errors", []) or [])

        failed: dict[bytes, ImageFailure] = {}
        n_encoded = 0
        if todo:
            pending = list(todo.items())
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), desc=f"features {encoder.name}", unit="img")
            try:
                for start in range(0, len(pending), self.shard_size):
                    chunk = pending[start : start + self.shard_size]
                    imgs, ok_names, bad = decode_items(
                        (ImageItem(d.hex(), it.data) for d, it in chunk),
                        max_bytes=self.max_bytes,
                        max_pixels=self.max_pixels,
                    )
                    failed.update((bytes.fromhex(f.name), f) for f in bad)
                    if imgs:
                        feats = np.empty((len(imgs), encoder.dim), dtype=np.float32)
                        for b in range(0, len(imgs), batch_size):
                            part = imgs[b : b + batch_size]
                            feats[b : b + len(part)] = encoder.encode(part, batch_size=batch_size)
                            if bar is not None:
                                bar.update(len(part))
                        keys = [bytes.fromhex(n) for n in ok_names]
                        _write_shard(folder, feats, keys)
                        n_encoded += len(imgs)
                    if bar is not None and bad:
                        bar.update(len(bad))
            finally:
                if bar is not None:
                    bar.close()
            index = _load_index(folder)

        kept = [i for i, d in enumerate(digests) if d in index]
        reported = {f.name for f in failures}
        for i, d in enumerate(digests):
            if d not in index and names[i] not in reported:
                why = failed.get(d, ImageFailure(names[i], "missing", "no features were stored for it"))
                failures.append(ImageFailure(names[i], why.reason, why.detail))
                reported.add(names[i])
        feats = _gather(folder, index, [digests[i] for i in kept], encoder.dim)
        return FeatureResult(
            features=feats,
            names=[names[i] for i in kept],
            keys=[digests[i].hex() for i in kept],
            failures=failures,
            n_encoded=n_encoded,
        )


def _write_shard(folder: Path, feats: np.ndarray, keys: list[bytes]) -> None:
    sid = uuid.uuid4().hex
    tmp_npy = folder / f".{sid}.npy.tmp"
    with open(tmp_npy, "wb") as f:
        np.save(f, np.ascontiguousarray(feats, dtype=np.float32))
    os.replace(tmp_npy, folder / f"{sid}.npy")
    tmp_keys = folder / f".{sid}.keys.tmp"
    tmp_keys.write_bytes(b"".join(keys))
    os.replace(tmp_keys, folder / f"{sid}.keys")  # last: marks the shard complete


def _load_index(folder: Path) -> dict[bytes, tuple[str, int]]:
    index: dict[bytes, tuple[str, int]] = {}
    if not folder.exists():
        return index
    for keys_file in sorted(folder.glob("*.keys")):
        raw = keys_file.read_bytes()
        sid = keys_file.stem
        for row in range(len(raw) // _DIGEST):
            index.setdefault(raw[row * _DIGEST : (row + 1) * _DIGEST], (sid, row))
    return index


def _gather(folder: Path, index: dict[bytes, tuple[str, int]], digests: list[bytes], dim: int) -> np.ndarray:
    out = np.empty((len(digests), dim), dtype=np.float32)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for pos, d in enumerate(digests):
        sid, row = index[d]
        by_shard.setdefault(sid, []).append((pos, row))
    for sid, pairs in by_shard.items():
        arr = np.load(folder / f"{sid}.npy", mmap_mode="r")
        if arr.shape[1] != dim:
            raise ValueError(
                f"cache shard {folder / sid}.npy has width {arr.shape[1]}, expected {dim}: delete it"
            )
        pos = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
        rows = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
        out[pos] = arr[rows]
    return out
