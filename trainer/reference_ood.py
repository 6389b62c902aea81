"""The reference OOD set of the AUROC gate: `DLSR_TRAINER__REFERENCE_OOD` plus the operator-confirmed images.

`dlsr vet reject` keeps the original bytes of images people confirmed as OOD under
`<trainer workdir>/confirmed_ood/` (common/confirmed_ood.py). A job scores both sets with the candidate; the
configured set keeps working as before, the confirmed one is added to it (each up to `limit` images).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlsr_monitor.common.confirmed_ood import confirmed_files, confirmed_ood_dir


@dataclass
class ChainedImages:
    """An ImageSet over several ImageSets, one after the other (`errors` collects those of all parts)."""

    parts: list[Any]
    errors: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part
            for err in getattr(part, "errors", ()):
                if err not in self.errors:
                    self.errors.append(err)


def reference_ood_images(
    reference_ood: str | Path | None, workdir: str | Path | None, *, limit: int = 2000
) -> ChainedImages | None:
    """The gate's OOD images: the configured folder/zip (None: none) and the confirmed-OOD folder of `workdir`
    (None or empty: none), each up to `limit` images. None when both are empty (the AUROC gate is skipped).

    Raises:
        FileNotFoundError / ValueError: the configured `reference_ood` does not exist or holds no images.
    """
    from dlsr.readers import open_images

    parts = []
    if reference_ood is not None:
        parts.append(open_images(reference_ood, limit=limit))
    if workdir is not None and confirmed_files(workdir):
        parts.append(open_images(confirmed_ood_dir(workdir), limit=limit))
    return ChainedImages(parts) if parts else None
