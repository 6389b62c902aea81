"""Vetted-data intake: a content-addressed store of vetted image bytes, fed from `dlsr.vetted` or folders/zips.

Each vetted image is kept once (file named by the sha256 of its bytes) and listed in an append-only index in
arrival order. Features are not stored here: `dlsr.cache.FeatureCache` keys them by the same content hash, so a
refit re-encodes only images it has not seen. The store is append-only, so "the first N held-out images" is a
fixed sample forever (the reference sample of the shift gate).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VettedEntry:
    """One stored vetted image."""

    sha: str
    arrived: float
    source: str
    index: int  # arrival position (0-based)

    def bucket(self) -> float:
        """A uniform number in [0, 1) fixed by the content hash: the split key (fit / calibration / held-out)."""
        return int(self.sha[:12], 16) / float(1 << 48)


@dataclass(frozen=True)
class _Item:
    # Same shape as dlsr.readers.ImageItem (name, data); local so the store does not need dlsr at import time.
    name: str
    data: bytes


class VettedImages:
    """An ImageSet (len + iter of items with `name` and `data`) over some stored entries, read lazily."""

    def __init__(self, store: VettedStore, entries: list[VettedEntry]) -> None:
        self.store = store
        self.entries = entries
        self.errors: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Any]:
        try:
            from dlsr.readers import ImageItem as item_cls
        except ImportError:
            item_cls = _Item
        for e in self.entries:
            yield item_cls(name=e.sha, data=self.store.read(e.sha))


class VettedStore:
    """Append-only store of vetted image bytes under `root` (shared by every trainer process)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.index_path = self.root / "index.jsonl"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._cache: list[VettedEntry] = []
        self._cache_pos = 0  # bytes of the index already parsed
        self._known: set[str] = set()

    def path(self, sha: str) -> Path:
        return self.images_dir / sha[:2] / sha

    def read(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()

    def add_many(self, items: Iterable[tuple[bytes, str]]) -> tuple[int, int]:
        """Store (bytes, source) pairs not stored yet; returns (added, duplicates). Safe across processes."""
        now = time.time()
        pending: list[tuple[str, bytes, str]] = []
        for data, source in items:
            pending.append((hashlib.sha256(data).hexdigest(), data, source))
        if not pending:
            return 0, 0
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.index_path, "a+", encoding="utf-8") as idx:
            fcntl.flock(idx, fcntl.LOCK_EX)  # one writer at a time; readers see whole lines only
            try:
                self._refresh_locked(idx)
                added = 0
                lines = []
                batch: set[str] = set()
                for sha, data, source in pending:
                    if sha in self._known or sha in batch:
                        continue
                    p = self.path(sha)
                    p.parent.mkdir(exist_ok=True)
                    tmp = p.with_name(f".{sha}.{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, p)
                    batch.add(sha)
                    lines.append(json.dumps({"sha": sha, "t": now, "src": source}) + "\n")
                    added += 1
                if lines:
                    idx.seek(0, os.SEEK_END)
                    idx.write("".join(lines))
                    idx.flush()
                    os.fsync(idx.fileno())
                    self._refresh_locked(idx)
            finally:
                fcntl.flock(idx, fcntl.LOCK_UN)
        return added, len(pending) - added

    def add(self, data: bytes, source: str = "") -> bool:
        """Store one image; True when it was new."""
        return self.add_many([(data, source)])[0] == 1

    def _refresh_locked(self, fh: Any) -> None:
        fh.seek(self._cache_pos)
        chunk = fh.read()
        if not chunk:
            return
        complete = chunk[
            : chunk.rfind("\n") + 1
        ]  # a line being written by another process waits for next time
        self._cache_pos += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec["sha"] in self._known:
                continue
            self._known.add(rec["sha"])
            self._cache.append(VettedEntry(rec["sha"], float(rec["t"]), rec.get("src", ""), len(self._cache)))

    def entries(self) -> list[VettedEntry]:
        """Every stored image, in arrival order."""
        if self.index_path.exists():
            with open(self.index_path, encoding="utf-8") as fh:
                self._refresh_locked(fh)
        return list(self._cache)

    def __len__(self) -> int:
        return len(self.entries())

    def images(self, entries: list[VettedEntry]) -> VettedImages:
        """An ImageSet over `entries` (for FeatureCache.features / Encoder)."""
        return VettedImages(self, entries)


@dataclass(frozen=True)
class Split:
    """Fit / calibration / held-out partition of the vetted store, fixed by content hash."""

    fit: list[VettedEntry]
    calibration: list[VettedEntry]
    holdout: list[VettedEntry]
    reference: list[VettedEntry]  # the first `reference_size` held-out entries by arrival: fixed across jobs
    fresh: list[VettedEntry]  # held-out entries that arrived after `since_index`

    def sizes(self) -> dict[str, int]:
        return {
            "total": len(self.fit) + len(self.calibration) + len(self.holdout),
            "fit": len(self.fit),
            "calibration": len(self.calibration),
            "holdout": len(self.holdout),
            "reference": len(self.reference),
            "fresh_holdout": len(self.fresh),
        }


def split_entries(
    entries: list[VettedEntry],
    *,
    holdout_fraction: float = 0.1,
    calibration_fraction: float = 0.2,
    reference_size: int = 500,
    since_index: int = 0,
) -> Split:
    """Partition by content hash: held-out images are never fitted or calibrated on, in any job."""
    fit, cal, hold = [], [], []
    for e in entries:
        u = e.bucket()
        if u < holdout_fraction:
            hold.append(e)
        elif u < holdout_fraction + calibration_fraction:
            cal.append(e)
        else:
            fit.append(e)
    return Split(fit, cal, hold, hold[:reference_size], [e for e in hold if e.index >= since_index])


def ingest_path(
    store: VettedStore, path: str | Path, *, limit: int | None = None, source: str = ""
) -> dict[str, Any]:
    """Copy the images of a folder or zip into the store (decode-checked); returns counts and bad names."""
    from dlsr.images import ImageDecodeError, decode_image
    from dlsr.readers import open_images

    images = open_images(path, limit=limit)
    good: list[tuple[bytes, str]] = []
    bad: list[str] = []
    src = source or Path(path).name
    for item in images:
        try:
            decode_image(item.data)
        except ImageDecodeError as exc:
            bad.append(f"{item.name}: {exc.reason}")
            continue
        good.append((item.data, src))
    added, dup = store.add_many(good)
    # The reader reports unreadable entries itself (filled while iterating).
    bad += [f"{getattr(e, 'name', e)}: {getattr(e, 'reason', '')}" for e in getattr(images, "errors", [])]
    return {"read": len(good) + len(bad), "added": added, "duplicates": dup, "bad": bad}


class VettedIntake:
    """Moves `dlsr.vetted` messages (image bytes + optional headers, the input topic's contract) into the store.

    `source` is any common.streams Source (poll / commit / close): KafkaSource in production, a list in tests.
    Offsets are committed only after the images are stored, so a crash re-reads (and dedups), never loses.
    Undecodable messages are logged and skipped (counted in `rejected`).
    """

    def __init__(self, source: Any, store: VettedStore) -> None:
        self.source = source
        self.store = store
        self.rejected = 0

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[bytes]:
        """One poll; returns the bytes of images that were new to the store (for baseline scoring)."""
        from dlsr.images import ImageDecodeError, decode_image

        msgs = self.source.poll(max_records, timeout_s)
        if not msgs:
            return []
        good: list[tuple[bytes, str]] = []
        commit: dict[tuple[str, int], int] = {}
        for m in msgs:
            tp = (m.topic, m.partition)
            commit[tp] = max(commit.get(tp, 0), m.offset + 1)
            data = m.value or b""
            source = ""
            for k, v in m.headers or []:
                if k == "source" and v:
                    source = v.decode("utf-8", "replace")
            try:
                decode_image(data)
            except ImageDecodeError as exc:
                self.rejected += 1
                log.warning("vetted %s:%d:%d refused: %s", m.topic, m.partition, m.offset, exc.reason)
                continue
            good.append((data, source))
        known = {e.sha for e in self.store.entries()}
        self.store.add_many(good)
        self.source.commit(commit)
        fresh: list[bytes] = []
        for data, _ in good:
            sha = hashlib.sha256(data).hexdigest()
            if sha not in known:
                known.add(sha)
                fresh.append(data)
        return fresh

    def close(self) -> None:
        self.source.close()
