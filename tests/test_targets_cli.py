"""--source cityscapes / --target acdc|dark_zurich in dacs.py and camix.py, --target in the semi-supervised scripts,
--eval-set, --split test --export, and their refusals: tiny runs on generated trees in the official layouts."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

import asss
import camix
import classmix_ssl
import common
import dacs
import dldm
import iidm
import training
from conftest import make_cityscapes, make_gta5
from target_layouts import add_cityscapes_test, make_acdc, make_bdd100k, make_dark_zurich, make_mapillary

TINY = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32",
        "--target-size", "64", "36", "--crop-size", "32", "32", "--workers", "0", "--log-every", "1",
        "--device", "cpu"]
CAMIX_TINY = [*TINY, "--warmup-iters", "1", "--val-size", "64", "36", "--eval-every", "0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Cityscapes (train/val/test), GTA5, ACDC, Dark Zurich, BDD100K and Mapillary trees."""
    r = tmp_path_factory.mktemp("data")
    make_gta5(r)
    make_cityscapes(r)
    add_cityscapes_test(r, h=32, w=64)
    make_acdc(r, h=36, w=64)
    make_dark_zurich(r, h=36, w=64)
    make_bdd100k(r)
    make_mapillary(r)
    return r


@pytest.fixture(scope="module")
def acdc_run(root, tmp_path_factory):
    """A 2-iteration dacs.py Cityscapes -> ACDC run: (its folder, its metrics)."""
    out = tmp_path_factory.mktemp("acdc_run") / "run"
    metrics = dacs.main([*TINY, "--source", "cityscapes", "--target", "acdc", "--data-root", str(root),
                         "--out-dir", str(out)])
    return out, metrics


def eval_only(root, run_dir, out, *flags):
    return dacs.main([*TINY, "--source", "cityscapes", "--target", "acdc", "--data-root", str(root), "--out-dir",
                      str(out), "--eval-only", "--checkpoint", str(run_dir / "checkpoint.pth"), *flags])


# ------------------------------------------------------------------ training runs on the new targets

def test_dacs_cityscapes_to_acdc_scores_acdc_val_per_condition(acdc_run):
    out, metrics = acdc_run
    saved = json.loads((out / "metrics.json").read_text())
    assert json.dumps(saved) == json.dumps(metrics) and saved["target"] == "acdc" and saved["iteration"] == 2
    assert saved["labels"] == "full"
    assert {c: v["images"] for c, v in saved["per_condition"].items()} == {"fog": 1, "night": 2, "rain": 1, "snow": 1}
    config = json.loads((out / "config.json").read_text())
    assert (config["source"], config["target"], config["eval_res"]) == ("cityscapes", "acdc", "full")


def test_dacs_val_of_acdc_is_scored_at_full_label_resolution(root, monkeypatch):
    """The 36x64 val images are fit into --target-size 32 18 (keep ratio) and scored against 36x64 labels."""
    args = dacs.parse_args([*TINY, "--source", "cityscapes", "--target", "acdc", "--target-size", "32", "18",
                            "--data-root", str(root)])
    _, _, kind, target_root = training.data_roots(args, args.source, args.target)
    val = training.target_val(kind, target_root, args.target_size, args.eval_res, "imagenet_bgr")
    item = val[0]
    assert tuple(item["image"].shape[1:]) == (18, 32) and tuple(item["label"].shape) == (36, 64)
    assert len(val) == 5 and val.keep_ratio


@pytest.mark.parametrize("script, flags", [(dacs, TINY), (camix, [*CAMIX_TINY, "--build-prior"])])
def test_cityscapes_to_dark_zurich_trains_on_night_images_and_scores_dz_val(root, tmp_path, script, flags):
    metrics = script.main([*flags, "--source", "cityscapes", "--target", "dark_zurich", "--data-root", str(root),
                           "--out-dir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["target"] == "dark_zurich" and saved["mIoU"] == metrics["mIoU"] and "per_condition" not in saved
    assert json.loads((tmp_path / "run" / "config.json").read_text())["target"] == "dark_zurich"


def test_camix_cityscapes_to_acdc_builds_its_prior_on_the_acdc_frame(root, tmp_path):
    metrics = camix.main([*CAMIX_TINY, "--build-prior", "--source", "cityscapes", "--target", "acdc",
                          "--data-root", str(root), "--out-dir", str(tmp_path / "run")])
    assert metrics["target"] == "acdc" and set(metrics["per_condition"]) == {"fog", "night", "rain", "snow"}
    prior = np.load(tmp_path / "run" / "spatial_prior.npy")
    assert prior.shape == (19, 36, 64)                          # the ACDC frame, not Cityscapes' 32x64
    assert json.loads((tmp_path / "run" / "spatial_prior.json").read_text()) == {
        "source": "cityscapes", "target": "acdc", "frame": [36, 64]}
    with pytest.raises(common.DataError, match="built for --source cityscapes --target acdc"):   # DZ: same frame
        camix.main([*CAMIX_TINY, "--prior", str(tmp_path / "run" / "spatial_prior.npy"), "--source", "cityscapes",
                    "--target", "dark_zurich", "--data-root", str(root), "--out-dir", str(tmp_path / "dz")])
    (tmp_path / "run" / "spatial_prior.json").unlink()               # a file without its record: by its shape
    with pytest.raises(common.DataError, match=r"shape \(19, 36, 64\), expected \(19, 32, 64\)"):   # Cityscapes
        camix.main([*CAMIX_TINY, "--prior", str(tmp_path / "run" / "spatial_prior.npy"), "--source", "gta5",
                    "--data-root", str(root), "--out-dir", str(tmp_path / "cs")])


def test_acdc_conditions_subset_trains_and_scores_those_conditions(root, tmp_path):
    metrics = dacs.main([*TINY, "--source", "cityscapes", "--target", "acdc", "--acdc-conditions", "fog", "night",
                         "--data-root", str(root), "--out-dir", str(tmp_path / "run"), "--iters", "1"])
    assert {c: v["images"] for c, v in metrics["per_condition"].items()} == {"fog": 1, "night": 2}


# ------------------------------------------------------------------ per-target defaults (parse only)

def test_target_defaults_follow_daformer_hrda_and_keep_cityscapes_as_it_was():
    cs = dacs.parse_args([])
    assert (cs.target, cs.target_size, cs.eval_res) == ("cityscapes", (1024, 512), "half")
    a = dacs.parse_args(["--source", "cityscapes", "--target", "acdc"])
    assert (a.source_size, a.target_size, a.crop_size, a.eval_res) == ((1024, 512), [960, 540], (512, 512), "full")
    d = dacs.parse_args(["--source", "cityscapes", "--target", "dark_zurich", "--stack", "daformer", "--init", "none"])
    assert (d.source_size, d.target_size, d.pl_crop, d.target_cat_max_ratio) == ((1024, 512), [960, 540], "v1", 1.0)
    assert dacs.parse_args(["--stack", "daformer", "--init", "none"]).target_cat_max_ratio == 0.75
    h = dacs.parse_args(["--source", "cityscapes", "--target", "acdc", "--stack", "hrda", "--init", "none"])
    assert (h.source_size, h.target_size, h.crop_size, h.pl_crop, h.eval_mode) == (
        (2048, 1024), [1920, 1080], (1024, 1024), "none", "slide")
    assert dacs.parse_args(["--stack", "hrda", "--init", "none"]).pl_crop == "v2"
    assert dacs.parse_args(["--source", "cityscapes", "--target", "acdc", "--target-size", "800", "450"]
                           ).target_size == [800, 450]                                 # an explicit flag wins
    c = camix.parse_args(["--source", "cityscapes", "--target", "acdc", "--build-prior"])
    assert (c.source_size, c.target_size, c.val_size, c.eval_res) == ((1024, 512), [1920, 1080], [960, 540], "full")
    i = iidm.parse_args(["--target", "acdc", "--stack", "hrda", "--init", "none"])
    assert (i.target_size, i.pl_crop) == ([1920, 1080], "none")


# ------------------------------------------------------------------ --eval-set

@pytest.mark.parametrize("eval_set", ["cityscapes", "dark_zurich", "bdd100k", "mapillary"])
def test_eval_set_scores_another_dataset_with_the_runs_resize(root, acdc_run, tmp_path, eval_set):
    metrics = eval_only(root, acdc_run[0], tmp_path / "ev", "--eval-set", eval_set)
    saved = json.loads((tmp_path / "ev" / f"metrics_{eval_set}.json").read_text())
    assert json.dumps(saved) == json.dumps(metrics) and saved["target"] == eval_set and saved["iteration"] == 2
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_eval_set_of_the_target_is_the_runs_own_val(root, acdc_run, tmp_path):
    metrics = eval_only(root, acdc_run[0], tmp_path / "ev", "--eval-set", "acdc")
    assert json.dumps(metrics) == json.dumps(acdc_run[1]) and (tmp_path / "ev" / "metrics.json").is_file()


def test_eval_dataset_fits_other_sets_into_the_val_size_at_full_label_resolution(root):
    args = dacs.parse_args([*TINY, "--target-size", "64", "32", "--data-root", str(root), "--eval-only",
                            "--checkpoint", "c.pth", "--eval-set", "bdd100k"])
    val = training.target_val("cityscapes", root / "cityscapes", args.target_size, args.eval_res, "imagenet_bgr")
    data, name = training.eval_dataset(args, val)
    item = data[0]
    assert name == "metrics_bdd100k.json" and data.kind == "bdd100k" and data.keep_ratio
    assert tuple(item["image"].shape[1:]) == (32, 57) and tuple(item["label"].shape) == (18, 32)  # 32x18 in 64x32


# ------------------------------------------------------------------ --split test --export

@pytest.mark.parametrize("server, n, folder", [("cityscapes", 3, ""), ("acdc", 5, ""),
                                               ("dark_zurich", 2, "labelTrainIds/")])
def test_export_writes_the_servers_submission(root, acdc_run, tmp_path, server, n, folder):
    out = tmp_path / "sub"
    record = eval_only(root, acdc_run[0], tmp_path / "ev", "--eval-set", server, "--split", "test", "--export", str(out))
    saved = json.loads((out / "export.json").read_text())
    assert json.dumps(saved) == json.dumps(record)
    assert (saved["checkpoint"], saved["model"], saved["iteration"]) == (
        str(acdc_run[0] / "checkpoint.pth"), "student", 2)
    zips = list(out.glob("*.zip"))
    assert len(zips) == 1
    names = [x for x in zipfile.ZipFile(zips[0]).namelist() if x.startswith(folder) and x.endswith(".png")]
    assert len(names) == n
    with zipfile.ZipFile(zips[0]).open(names[0]) as f:
        png = Image.open(f)
        assert png.mode in ("L", "P") and png.size == ((64, 32) if server == "cityscapes" else (64, 36))
    assert not (tmp_path / "ev").exists()                           # no metrics: the test split has no labels
    assert saved["inference"] == {"mode": "whole"}


def test_hrda_cityscapes_to_acdc_trains_without_plcrop_and_exports_with_slide_inference(root, tmp_path,
                                                                                         monkeypatch):
    hrda = ["--iters", "2", "--stack", "hrda", "--mit", "tiny", "--init", "none", "--source-size", "128", "64",
            "--target-size", "128", "72", "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--workers", "0",
            "--device", "cpu", "--source", "cityscapes", "--target", "acdc", "--data-root", str(root)]
    metrics = dacs.main([*hrda, "--out-dir", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["pl_crop"], config["eval_mode"], metrics["target"]) == ("none", "slide", "acdc")
    windows = []
    slide = common.SlideInference.forward
    monkeypatch.setattr(common.SlideInference, "forward", lambda self, x: windows.append(x.shape) or slide(self, x))
    record = dacs.main([*hrda, "--eval-only", "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--split",
                        "test", "--export", str(tmp_path / "sub"), "--out-dir", str(tmp_path / "ev")])
    assert record["iteration"] == 2 and windows == [(1, 3, 72, 128)] * 5    # the 5 test images, resized, in windows
    assert record["inference"] == {"mode": "slide", "crop": [64, 64], "stride": [32, 32]}   # --crop-size, HRDA's rule


class Built(Exception):
    """Raised at a script's first batch request: its training datasets exist by then."""


class FirstBatch:
    """The iterator handed to a script instead of a DataLoader."""

    def __next__(self):
        raise Built


def training_streams(script, argv):
    """The training datasets a script builds (unwrapped) and its val set, without training."""
    built, target_val = [], training.target_val

    def first_loader(dataset, sampler, workers):
        built.append(getattr(dataset, "dataset", dataset))
        return FirstBatch()

    def val(*args, **kwargs):
        built.append(target_val(*args, **kwargs))
        return built[-1]
    with mock.patch.object(training, "infinite_loader", first_loader), mock.patch.object(training, "target_val", val), \
            pytest.raises(Built):
        script.main(argv)
    return built


@pytest.mark.parametrize("stack, target, size, fitted", [
    ("daformer", "acdc", ["64", "64"], (64, 36)), ("deeplabv2", "acdc", ["64", "64"], (64, 36)),
    ("deeplabv2", "cityscapes", ["64", "64"], (64, 64)), ("daformer", "cityscapes", ["64", "64"], (64, 32))])
def test_target_training_resize_keeps_the_ratio_as_mmseg_for_the_mit_stacks_and_acdc(root, tmp_path, stack, target,
                                                                                      size, fitted):
    """An explicit --target-size off the frame's ratio: the frame is fit into it (mmseg's Resize, keep_ratio) with
    --stack daformer/hrda or an ACDC/Dark Zurich target, as the val set; DeepLabv2 on Cityscapes stretches (DACS)."""
    net = (["--stack", stack, "--mit", "tiny", "--rcs-min-pixels", "40"] if stack != "deeplabv2"
           else ["--layers", "1", "1", "1", "1"])
    source = ["--source", "cityscapes"] if target != "cityscapes" else ["--source", "gta5"]
    argv = [*net, "--iters", "1", "--init", "none", "--source-size", "64", "32", "--target-size", *size,
            "--crop-size", "32", "32", "--workers", "0", "--device", "cpu", *source, "--target", target,
            "--data-root", str(root), "--out-dir", str(tmp_path / "run")]
    streams = [d for d in training_streams(dacs, argv) if d.kind == target]
    assert {d.split for d in streams} == {"train", "val"}                # training streams and val: one rule
    assert all(d.target_size(*common.image_size(d.pairs[0][0])) == fitted for d in streams)


def test_iidm_mit_stack_target_streams_keep_the_ratio(root, tmp_path):
    argv = ["--stack", "daformer", "--mit", "tiny", "--iters", "1", "--init", "none", "--source-size", "64", "32",
            "--target-size", "64", "64", "--crop-size", "32", "32", "--rcs-min-pixels", "40", "--n-labeled", "3",
            "--workers", "0", "--device", "cpu", "--data-root", str(root), "--out-dir", str(tmp_path / "run")]
    streams = [d for d in training_streams(iidm, argv) if d.kind == "cityscapes"]
    assert len(streams) == 3 and all(d.target_size(64, 32) == (64, 32) for d in streams)   # labeled, unlabeled, val


# ------------------------------------------------------------------ semi-supervised scripts

def test_semi_supervised_acdc_target_draws_the_labeled_split_from_acdc_train(root, tmp_path):
    metrics = iidm.main(["--iters", "1", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64",
                         "32", "--target-size", "64", "36", "--crop-size", "32", "32", "--workers", "0", "--device",
                         "cpu", "--rcs-min-pixels", "40", "--target", "acdc", "--n-labeled", "3", "--split-seed", "4",
                         "--data-root", str(root),
                         "--out-dir", str(tmp_path / "run")])
    stems = sorted(common.SegmentationDataset("acdc", root / "acdc").stems())
    assert (tmp_path / "run" / "split.txt").read_text().split() == common.labeled_split(stems, 3, 4)[0]
    assert metrics["target"] == "acdc" and "per_condition" in metrics
    assert asss.parse_args(["--target", "acdc"]).target_size == [960, 540]
    assert classmix_ssl.parse_args(["--dataset", "acdc"]).target_size == [960, 540]
    assert dldm.parse_args(["--target", "acdc"]).target_size == [960, 540]


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written

def cli(script, tmp_path, *flags):
    out = subprocess.run([sys.executable, str(ROOT / script), *map(str, flags), "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()
    return out.stderr.strip()


def test_dark_zurich_is_refused_by_the_semi_supervised_scripts(tmp_path):
    assert cli("iidm.py", tmp_path, "--target", "dark_zurich") == (
        "error: --target dark_zurich: Dark Zurich train has no labels, and this script trains on labeled target "
        "images (use --target acdc or cityscapes)")
    for parse, flag in ((asss.parse_args, "--target"), (dldm.parse_args, "--target"),
                        (classmix_ssl.parse_args, "--dataset")):
        with pytest.raises(common.DataError, match=f"{flag} dark_zurich: Dark Zurich train has no labels"):
            parse([flag, "dark_zurich"])


def test_test_split_needs_export_and_export_needs_the_test_split_and_a_server(tmp_path):
    assert cli("dacs.py", tmp_path, "--eval-only", "--checkpoint", "c.pth", "--split", "test").startswith(
        "error: --split test: the test splits have no public labels to score; add --export DIR")
    with pytest.raises(common.DataError, match="a submission is made from the test split; add --split test"):
        dacs.parse_args(["--eval-only", "--checkpoint", "c.pth", "--export", str(tmp_path / "x")])
    with pytest.raises(common.DataError, match="--export with --eval-set bdd100k: no test server"):
        dacs.parse_args(["--eval-only", "--checkpoint", "c.pth", "--eval-set", "bdd100k", "--split", "test",
                         "--export", str(tmp_path / "x")])
    with pytest.raises(common.DataError, match="--eval-set is used by --eval-only only"):
        dacs.parse_args(["--eval-set", "acdc"])


def test_export_into_a_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.png").write_bytes(b"")
    assert cli("dacs.py", tmp_path, "--eval-only", "--checkpoint", "c.pth", "--split", "test", "--export",
               tmp_path / "sub") == f"error: --export {tmp_path / 'sub'}: not an empty folder (expected a new or " \
                                    f"empty folder for the submission)"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["old.png"]


def test_source_equal_to_target_is_refused(tmp_path):
    assert cli("dacs.py", tmp_path, "--source", "cityscapes") == (
        "error: --source cityscapes --target cityscapes: the source is labeled and the target adapted to; expected "
        "another target (acdc, dark_zurich)")
    with pytest.raises(common.DataError, match="--source cityscapes --target cityscapes"):
        camix.parse_args(["--source", "cityscapes", "--build-prior"])
    with pytest.raises(common.DataError, match="--target acdc: the demo adapts to its generated"):
        dacs.parse_args(["--demo", "--target", "acdc"])


def test_dark_zurich_refuses_what_needs_its_missing_train_labels():
    with pytest.raises(common.DataError, match="--mix intra-aligned --target dark_zurich: the alignment reads"):
        dacs.parse_args(["--source", "cityscapes", "--target", "dark_zurich", "--mix", "intra-aligned"])
    with pytest.raises(common.DataError, match="--acdc-conditions fog: ACDC is neither --target nor --eval-set"):
        dacs.parse_args(["--acdc-conditions", "fog"])


def test_unequal_frames_without_a_crop_are_refused():
    with pytest.raises(common.DataError, match="--crop-size 0 0: InterMix pastes source pixels onto the target "
                                               "image, so both need one size; source 1024 512, --target-size 960 540"):
        dacs.parse_args(["--source", "cityscapes", "--target", "acdc", "--crop-size", "0", "0"])


def test_a_target_root_in_another_layout_is_refused(root, tmp_path):
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    err = cli("dacs.py", tmp_path, *TINY, "--source", "cityscapes", "--target", "acdc", "--data-root", root,
              "--acdc-root", tmp_path / "wrong")
    assert err.startswith("error: ") and str(tmp_path / "wrong") in err and "rgb_anon" in err


def test_unusable_out_dir_seeds_and_sizes_are_one_line_errors(root, tmp_path):
    """An --out-dir that is a file (or under one), a seed numpy cannot take, a zero width or block count: exit 2."""
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "dacs.py"), *TINY, "--data-root", str(root), "--out-dir",
                        str(tmp_path / "afile")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --out-dir {tmp_path / 'afile'}: cannot be made a "
                                                      f"folder (File exists; expected a new or existing writable "
                                                      f"folder)")
    with pytest.raises(common.DataError, match=r"--out-dir .*afile/sub: cannot be made a folder \(Not a directory"):
        dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "afile" / "sub")])
    for parse, flags, message in (
            (dacs.parse_args, ["--seed", "-1"], "--seed -1: expected an integer in [0, 2^32)"),
            (classmix_ssl.parse_args, ["--split-seed", str(2 ** 40)],
             f"--split-seed {2 ** 40}: expected an integer in [0, 2^32)"),
            (iidm.parse_args, ["--width", "0"], "--width 0: expected a positive number of channels"),
            (asss.parse_args, ["--layers", "0", "1", "1", "1"], "--layers 0 1 1 1: expected four block counts >= 1")):
        with pytest.raises(common.DataError) as exc:
            parse(flags)
        assert str(exc.value) == message
    r = subprocess.run([sys.executable, str(ROOT / "common.py"), "predict", "--input", "x"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: the following arguments are required: --checkpoint, --out-dir")
