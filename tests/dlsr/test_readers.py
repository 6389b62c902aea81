"""Readers: zip (the shared-data layout), ImageFolder tree, flat folder, arrays; corrupt files reported by name."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from dlsr.readers import array_images, decode_items, open_images


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


FILES = {
    "cat/001.png": _png(10),
    "cat/002.png": _png(20),
    "dog/001.png": _png(30),
    "dog/broken.jpg": b"\xff\xd8\xff not really a jpeg",
}


def _check(image_set, prefix: str = "") -> None:
    items = list(image_set)
    assert len(image_set) == 4
    assert [it.name for it in items] == sorted(
        prefix + k.split("/")[-1] if prefix == "flat" else k for k in FILES
    )
    images, names, failures = decode_items(items)
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)
    assert [f.name.endswith("broken.jpg") for f in failures] == [True]
    assert failures[0].reason in {"truncated", "not_an_image", "decode_failed"}
    assert all(not n.endswith("broken.jpg") for n in names)


def test_zip_layout(tmp_path):
    path = tmp_path / "test.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
        zf.writestr("README.txt", "not an image, ignored")
    _check(open_images(path))


def test_image_folder_tree(tmp_path):
    for name, data in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("ignored")
    _check(open_images(tmp_path))


def test_flat_folder(tmp_path):
    for name, data in FILES.items():
        (tmp_path / name.replace("/", "_")).write_bytes(data)
    s = open_images(tmp_path)
    assert sorted(it.name for it in s) == sorted(k.replace("/", "_") for k in FILES)
    _, names, failures = decode_items(s)
    assert len(names) == 3 and [f.name for f in failures] == ["dog_broken.jpg"]


def test_subset_is_deterministic(tmp_path):
    for i in range(50):
        (tmp_path / f"{i:03d}.png").write_bytes(_png(i))
    a = [it.name for it in open_images(tmp_path, limit=10, seed=1)]
    b = [it.name for it in open_images(tmp_path, limit=10, seed=1)]
    c = [it.name for it in open_images(tmp_path, limit=10, seed=2)]
    assert a == b and a != c and len(a) == 10 and a == sorted(a)


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "b.png").write_bytes(_png(2))
    s = open_images(tmp_path)
    (tmp_path / "b.png").unlink()
    assert [it.name for it in s] == ["a.png"]
    assert [(e.name, e.reason) for e in s.errors] == [("b.png", "unreadable")]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image files"):
        open_images(tmp_path)


def test_array_images_roundtrip_lossless():
    arr = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    s = array_images(arr)
    images, names, failures = decode_items(s)
    assert names == ["00000", "00001", "00002", "00003", "00004"] and not failures
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), arr)
    grey = array_images(arr[..., 0], names=list("abcde"))
    assert [it.name for it in grey] == list("abcde")
    with pytest.raises(ValueError, match="uint8"):
        array_images(arr.astype(np.float32))


def test_source_side_is_the_median_shorter_side_from_headers():
    from dlsr.readers import ImageItem, MemoryImageSet, source_side

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        return buf.getvalue()

    sizes = [(32, 32), (32, 48), (64, 30), (500, 400), (32, 32)]
    images = MemoryImageSet([ImageItem(f"{i}.png", png(w, h)) for i, (w, h) in enumerate(sizes)])
    assert source_side(images) == 32  # shorter sides 32, 32, 30, 400, 32
    assert source_side(images, limit=1) == 32
    broken = MemoryImageSet([ImageItem("x.jpg", b"not an image"), ImageItem("y.png", png(200, 100))])
    assert source_side(broken) == 100  # unreadable headers are skipped
    assert source_side(MemoryImageSet([ImageItem("x.jpg", b"nope")])) is None
