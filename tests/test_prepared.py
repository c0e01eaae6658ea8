"""Prepared data (common.py prepare-data): runs on a prepared root are bit-identical to runs on the original
for each pipeline kind (PIL bicubic/bilinear, OpenCV-style with kept aspect ratio and RCS, no-crop
Cityscapes); settings the root was not made for are refused with one line; check-data reports it; the
uint8 transport normalises on the device exactly as the workers did."""
import json
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import camix
import classmix_ssl
import common
import dacs
import dldm
import iidm
import asss
import training
from conftest import ROOT, make_cityscapes, make_gta5, make_synthia, weights_digest, write_rgb

NET = ["--layers", "1", "1", "1", "1", "--init", "none", "--log-every", "1", "--device", "cpu"]
TINY_FRAMES = ["gta5:64x32:bicubic", "cityscapes:64x32:bilinear", "gta5:64x32:cv2:keep", "cityscapes:64x32:cv2",
               "synthia:64x32:cv2:keep"]


@pytest.fixture(scope="module")
def prepared(root):
    """The module's tiny data root prepared for the tiny runs' settings."""
    common.prepare_data(root, root / "prepared", TINY_FRAMES, workers=0)
    return root / "prepared"


def digests(module, data_root, out, flags):
    """(metrics, digest of each network in the checkpoint) of a short run."""
    metrics = module.main([*NET, *flags, "--data-root", str(data_root), "--out-dir", str(out)])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    return metrics, {k: weights_digest(ckpt[k]) for k in ("model", "ema_model") if k in ckpt}


PIPELINES = {  # script, flags: a few iterations of each pipeline kind
    "dacs (PIL bicubic source, PIL bilinear target, crops)": (dacs, [
        "--iters", "3", "--source-size", "64", "32", "--target-size", "64", "32", "--crop-size", "32", "32"]),
    "iidm (OpenCV-style, kept aspect ratio, flips, cat_max_ratio, RCS)": (iidm, [
        "--iters", "3", "--source-size", "64", "32", "--target-size", "64", "32", "--crop-size", "16", "16",
        "--n-labeled", "2", "--rcs-min-pixels", "40"]),
    "iidm SYNTHIA (16-class labels)": (iidm, [
        "--iters", "2", "--source", "synthia", "--source-size", "64", "32", "--target-size", "64", "32",
        "--crop-size", "16", "16", "--n-labeled", "2", "--rcs-min-pixels", "40"]),
    "camix (target crops with their prior window, then the plain DACS target)": (camix, [
        "--iters", "3", "--warmup-iters", "1", "--build-prior", "--source-size", "64", "32", "--target-size", "64",
        "32", "--val-size", "64", "32", "--crop-size", "16", "16", "--eval-every", "0"]),
    "classmix_ssl (whole frames, no crop)": (classmix_ssl, [
        "--iters", "3", "--target-size", "64", "32", "--n-labeled", "2"]),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_run_on_prepared_root_is_bit_identical(root, prepared, tmp_path, name):
    module, flags = PIPELINES[name]
    original = digests(module, root, tmp_path / "original", [*flags, "--workers", "0"])
    again = digests(module, prepared, tmp_path / "prepared", [*flags, "--workers", "1"])   # via a worker process
    assert again[1] == original[1] and len(original[1]) == 2
    assert json.dumps(again[0]) == json.dumps(original[0])


def test_prepared_dataset_reads_frames_not_pngs(root, prepared):
    """The prepared dataset memory-maps the frame set and never decodes an image PNG, yet gives the same items."""
    kw = dict(resize=(64, 32), keep_ratio=True, interp="cv2", crop=(16, 16), flip=True, cat_max_ratio=0.75)
    a = common.SegmentationDataset("gta5", root / "gta5", **kw)
    b = common.SegmentationDataset("gta5", prepared / "gta5", **kw)
    assert b.frames == prepared.resolve() / "gta5" / "64x32_cv2_keep" and b.stems() == a.stems()
    with mock.patch.object(common, "read_rgb", side_effect=AssertionError("decoded a PNG")):
        items = [b.uint8_items()[(i, 7 + i, -1)] for i in range(len(b))]
    for i, item in enumerate(items):
        want = a.uint8_items()[(i, 7 + i, -1)]
        assert item["image"].dtype == torch.uint8 and torch.equal(item["image"], want["image"])
        assert torch.equal(item["label"], want["label"])


def test_hrda_margin_items_on_a_prepared_root_equal_the_original(tmp_path):
    """PseudoMarginDataset (HRDA's target stream) reads the original size from the label file on a prepared root
    (no full-size label loaded): every item, RCS retries included, equals the original's; the margins cut."""
    base = make_cityscapes(tmp_path, n_train=3, n_val=1, h=48, w=96)
    write_rgb(base / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png",
              np.random.default_rng(0), 48, 96)   # an image-only split: prepare-data writes train and val only
    common.prepare_data(tmp_path, tmp_path / "p", ["cityscapes:40x20:cv2"])
    kw = dict(resize=(40, 20), interp="cv2", crop=(12, 12), cat_max_ratio=0.75, flip=True, rcs_min_crop_pixels=20)
    margins = (5, 12, 7, 3)   # at 96x48: not the resized 40x20 frame's margins
    a = common.PseudoMarginDataset(common.SegmentationDataset("cityscapes", base, **kw), margins)
    b = common.PseudoMarginDataset(common.SegmentationDataset("cityscapes", tmp_path / "p" / "cityscapes", **kw),
                                   margins)
    assert b.dataset.frames is not None and a.dataset.frames is None
    valid = []
    for item in [(i, seed, c) for i in range(3) for seed in (0, 3) for c in (-1, 0, 13)]:
        want, got = a[item], b[item]
        assert sorted(got) == sorted(want) == ["image", "index", "label", "valid"]
        assert got["index"] == want["index"] == item[0]
        for key in ("image", "label", "valid"):
            assert torch.equal(got[key], want[key]), (item, key)
        valid.append(got["valid"])
    valid = torch.stack(valid)
    assert 0 < valid.mean() < 1 and set(valid.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(common.DataError, match="holds no test frames"):
        common.SegmentationDataset("cityscapes", tmp_path / "p" / "cityscapes", "test", **kw)


@pytest.mark.parametrize("norm", sorted(common.NORMALISATIONS))
def test_uint8_items_normalised_on_the_device_equal_the_worker_normalisation(root, norm):
    data = common.SegmentationDataset("cityscapes", root / "cityscapes", resize=(64, 32), crop=(16, 24), flip=True,
                                      norm=norm)
    items = [(i, 3 + i, -1) for i in range(4)]
    batch = next(training.infinite_loader(data, [items], 0))
    assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint8
    x, y = training.next_batch(iter([batch]), torch.device("cpu"))
    want = torch.utils.data.default_collate([data[it] for it in items])
    assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, want["image"])
    assert y.dtype == torch.long and torch.equal(y, want["label"])


def test_margin_items_travel_as_uint8_and_equal_the_worker_normalisation(root):
    """HRDA's target stream (PseudoMarginDataset) also ships uint8 images: same images, labels and masks."""
    data = common.PseudoMarginDataset(common.SegmentationDataset("cityscapes", root / "cityscapes", resize=(64, 32),
                                                                 crop=(16, 24), flip=True), margins=(3, 5, 4, 2))
    items = [(i, 3 + i, -1) for i in range(4)]
    batch = next(training.infinite_loader(data, [items], 0))
    assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint8
    x, valid = training.next_target_batch(iter([batch]), torch.device("cpu"))
    want = torch.utils.data.default_collate([data[it] for it in items])
    assert want["image"].dtype == torch.float32 and torch.equal(x, want["image"])
    assert torch.equal(batch["label"].long(), want["label"]) and torch.equal(valid, want["valid"])
    assert 0 < float(valid.mean()) < 1


def run_cli(*args, script="common.py"):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_other_settings_are_refused_with_one_line(root, prepared, tmp_path):
    out = tmp_path / "run"
    res = run_cli(*NET, "--iters", "1", "--source-size", "48", "24", "--target-size", "64", "32", "--crop-size",
                  "16", "16", "--data-root", prepared, "--out-dir", out, "--workers", "0", script="dacs.py")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"error: {prepared / 'prepared.json'}: prepared for gta5:64x32:bicubic, "
                                 "gta5:64x32:cv2:keep; this run needs gta5:48x24:bicubic")
    assert "--frames gta5:48x24:bicubic" in res.stderr and not out.exists()
    with pytest.raises(common.DataError, match="this run needs cityscapes:64x32:bicubic"):
        common.SegmentationDataset("cityscapes", prepared / "cityscapes", resize=(64, 32), interp="bicubic")
    with pytest.raises(common.DataError, match="needs gta5:64x32:bicubic:keep"):
        common.SegmentationDataset("gta5", prepared / "gta5", resize=(64, 32), keep_ratio=True, interp="bicubic")
    assert common.SegmentationDataset("cityscapes", prepared / "cityscapes").frames is None   # no resize: originals


def test_stale_and_damaged_prepared_roots_are_refused(tmp_path):
    make_gta5(tmp_path)
    common.prepare_data(tmp_path, tmp_path / "p", ["gta5:32x16:bilinear"])
    data = common.SegmentationDataset("gta5", tmp_path / "p" / "gta5", resize=(32, 16))
    (data.frames / "images" / "00002.rgb.npy").write_bytes(b"not a frame")
    with pytest.raises(common.DataError, match=r"00002\.rgb\.npy: unreadable prepared frame"):
        data[1]
    write_rgb(tmp_path / "gta5" / "images" / "00009.png", np.random.default_rng(0), 24, 40)
    shutil.copy(tmp_path / "gta5" / "labels" / "00001.png", tmp_path / "gta5" / "labels" / "00009.png")
    with pytest.raises(common.DataError, match=r"prepared from 4 train images, but .* now holds 5"):
        common.SegmentationDataset("gta5", tmp_path / "p" / "gta5", resize=(32, 16))
    (tmp_path / "p" / "prepared.json").write_text("{}")
    with pytest.raises(common.DataError, match="not a prepare-data manifest"):
        common.SegmentationDataset("gta5", tmp_path / "p" / "gta5", resize=(32, 16))


def test_prepare_data_cli_check_data_and_extending(tmp_path):
    make_gta5(tmp_path / "data")
    make_cityscapes(tmp_path / "data")
    prep = tmp_path / "prep"
    res = run_cli("prepare-data", "--data-root", tmp_path / "data", "--out", prep, "--pipeline", "classmix_ssl",
                  "--workers", "2")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((prep / "prepared.json").read_text())
    assert manifest["frames"] == {"cityscapes:1024x512:bilinear": {"train": 6, "val": 2}}
    assert manifest["pipelines"] == ["classmix_ssl.py"]
    frame = np.load(prep / "cityscapes" / "1024x512_bilinear" / "leftImg8bit" / "train" / "aachen" /
                    "aachen_000000_000019_leftImg8bit.rgb.npy")
    assert frame.shape == (512, 1024, 3) and frame.dtype == np.uint8
    res = run_cli("prepare-data", "--data-root", tmp_path / "data", "--out", prep, "--frames", "gta5:64x32:cv2:keep",
                  "cityscapes:1024x512:bilinear", "--workers", "0")
    assert res.returncode == 0 and "cityscapes:1024x512:bilinear: already prepared" in res.stdout
    res = run_cli("check-data", "--data-root", prep, "--json", tmp_path / "r.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"prepared root (prepare-data) for classmix_ssl.py, from {(tmp_path / 'data').resolve()}" in res.stdout
    assert "gta5:64x32:cv2:keep (OpenCV-style bilinear (mmcv), OpenCV nearest labels, aspect ratio kept): " \
           "train 4 frames, 0 files missing" in res.stdout
    (prep / "gta5" / "64x32_cv2_keep" / "images" / "00003.label.npy").unlink()
    res = run_cli("check-data", "--data-root", prep)
    assert res.returncode == 2 and "missing: " in res.stdout and "00003.label.npy" in res.stdout
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "data", other)
    for bad, expected in ((["--frames", "gta5:64x32:nearest"], "error: --frames gta5:64x32:nearest: expected "),
                          (["--frames", "gta5:64x32:cv2"], f"prepared from {(tmp_path / 'data').resolve()}, not "),
                          ([], "required")):
        res = run_cli("prepare-data", "--data-root", other, "--out", prep, *bad)
        assert res.returncode == 2 and expected in res.stderr, res.stderr


class Built(Exception):
    """Raised at a script's first batch request: every dataset of its run has been built by then."""


class FirstBatch:
    """The iterator handed to a script instead of a DataLoader."""

    def __next__(self):
        raise Built


SCRIPT_FLAGS = [(dacs, []), (camix, ["--mix", "dacs"]), (iidm, ["--n-labeled", "2", "--rcs-min-pixels", "40"]),
                (asss, ["--preset", "ga-csa", "--n-labeled", "2"])]


@pytest.mark.parametrize("script, flags, source", [(s, f, src) for s, f in SCRIPT_FLAGS for src in ("gta5", "synthia")]
                         + [(classmix_ssl, ["--n-labeled", "2"], None)])
def test_pipeline_presets_serve_each_scripts_defaults(script, flags, source, tmp_path_factory):
    """A root prepared with --pipeline SCRIPT --source S holds every frame set the script's default run reads."""
    name = script.__name__
    data = tmp_path_factory.mktemp("full")
    make_gta5(data, n=2)
    make_synthia(data, n=2)
    make_cityscapes(data, n_train=3, n_val=1)
    prep = data / "prepared"
    source_flag = ["--source", source] if source else []
    assert common.main(["prepare-data", "--data-root", str(data), "--out", str(prep), "--pipeline", name,
                        *source_flag, "--workers", "0"]) == 0
    built = []

    def first_loader(dataset, sampler, workers):
        built.append(dataset)
        return FirstBatch()
    argv = [*NET, *flags, "--data-root", str(prep), "--out-dir", str(data / "run"), "--workers", "0"]
    with mock.patch.object(training, "infinite_loader", first_loader), pytest.raises(Built):
        script.main(argv + source_flag)
    assert built and all(d.frames is not None for d in built if d.resize is not None)


@pytest.mark.parametrize("stage", ["rl", "sl", "student"])
def test_dldm_reads_prepared_cityscapes_beside_the_original_source(stage, tmp_path):
    """dldm.py's LAB-translated source stays on the original; its Cityscapes frame sets are the README's."""
    make_gta5(tmp_path, n=2)
    make_cityscapes(tmp_path, n_train=3, n_val=1)
    prep = tmp_path / "prepared"
    common.prepare_data(tmp_path, prep, ["cityscapes:1024x512:bicubic", "cityscapes:1024x512:bilinear"])
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": common.DeepLabV2(19, multi_level=True, aspp_full=True, layers=(1, 1, 1, 1)).state_dict()},
               teacher)
    built = []

    def first_loader(dataset, sampler, workers):
        built.append(dataset)
        return FirstBatch()
    argv = [*NET, "--n-labeled", "2", "--stage", stage, "--data-root", str(tmp_path), "--cityscapes-root",
            str(prep / "cityscapes"), "--out-dir", str(tmp_path / "run"), "--workers", "0"]
    argv += ["--teachers", str(teacher), str(teacher)] if stage == "student" else []
    with mock.patch.object(training, "infinite_loader", first_loader), pytest.raises(Built):
        dldm.main(argv)
    assert {d.kind for d in built if d.frames is not None} == {"cityscapes"}


def test_loader_benchmark_reads_each_pipeline_from_a_prepared_root(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import loader
    (tmp_path / "RESULTS.md").write_text("# Measured results\n")
    result = loader.main(["--small", "--data-root", str(tmp_path / "data"), "--workers", "0", "--seconds", "0.2",
                          "--prepared", "--scripts", "iidm.py", "--json", str(tmp_path / "l.json"),
                          "--results", str(tmp_path / "RESULTS.md")])
    manifest = json.loads((tmp_path / "data" / "bench_small_prepared" / "prepared.json").read_text())
    assert sorted(manifest["frames"]) == ["cityscapes:128x64:cv2", "cityscapes:128x64:cv2:keep",  # MiT: keep ratio
                                          "cityscapes:256x128:cv2:keep",                          # --stack hrda's
                                          "gta5:160x90:cv2:keep", "gta5:320x180:cv2:keep",
                                          "synthia:160x90:cv2:keep", "synthia:320x180:cv2:keep"]
    for p in result["pipelines"]:
        assert p["prepared_images_per_s"]["0"] > 0 and p["prepared_images_per_cpu_s"] > 0 and p["images_per_cpu_s"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| prepared, 0 workers img/s | prepared, img per CPU-s | speed-up per core |" in text
