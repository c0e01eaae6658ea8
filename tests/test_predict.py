"""common.py predict: outputs at the input size, the label ids of --eval-only --save-predictions, whole vs slide,
window coverage and the refusals (tiny DeepLabv2 and HRDA runs of dacs.py on generated data)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dacs
import camix
import asss
import classmix_ssl
import dldm
import iidm
from conftest import ROOT, make_blocky, make_synthia

H, W = 64, 128
DEEPLAB = ["--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none", "--source-size",
           str(W), str(H), "--target-size", "64", "32", "--crop-size", "32", "32", "--workers", "0", "--device", "cpu"]
HRDA = ["--iters", "1", "--stack", "hrda", "--mit", "tiny", "--init", "none", "--source-size", str(W), str(H),
        "--target-size", str(W), str(H), "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--warmup-iters", "0",
        "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_blocky(tmp_path_factory.mktemp("predict"), H, W)
    make_synthia(root)
    return root


@pytest.fixture(scope="module")
def deeplab_ckpt(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("deeplab")
    dacs.main([*DEEPLAB, "--data-root", str(root), "--out-dir", str(out)])
    return varied(out / "checkpoint.pth")


def varied(path):
    """The checkpoint with random conv/linear weights: a 1-iteration net predicts one class nearly everywhere,
    which would hide a wrong resize or upsampling; this one predicts many classes with boundaries everywhere."""
    ckpt = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for name, t in ckpt["model"].items():
        if name.endswith("weight") and t.dim() > 1:
            t.copy_(torch.randn(t.shape, generator=gen) * (2 / t[0].numel()) ** 0.5)
    torch.save(ckpt, path)
    return path


IIDM = ["--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none", "--source", "synthia",
        "--source-size", str(W), str(H), "--target-size", "64", "32", "--crop-size", "32", "32", "--n-labeled", "2",
        "--rcs-min-pixels", "40", "--resize", "bilinear", "--workers", "0", "--device", "cpu"]


CLASSMIX = ["--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none", "--target-size", "64",
            "32", "--n-labeled", "2", "--workers", "0", "--device", "cpu"]

CAMIX = ["--iters", "1", "--warmup-iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none",
         "--source-size", "64", "32", "--target-size", "64", "32", "--val-size", "48", "24", "--crop-size", "32", "32",
         "--workers", "0", "--device", "cpu"]

# two-level heads (main = layer6): AdaptSegNet's and AdvEnt's (four-branch ASPP), PIL bicubic resize
ASSS = ["--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none", "--source-size", str(W),
        str(H), "--target-size", "64", "32", "--n-labeled", "2", "--eval-every", "0", "--workers", "0", "--device",
        "cpu"]
DLDM = ["--stage", "rl", "--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none",
        "--source-size", str(W), str(H), "--target-size", "64", "32", "--n-labeled", "2", "--lab", "off",
        "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("script,flags", [(dacs, DEEPLAB), (dacs, HRDA), (iidm, IIDM), (classmix_ssl, CLASSMIX),
                                          (camix, CAMIX), (asss, ASSS), (dldm, DLDM)],
                         ids=["dacs-deeplabv2", "dacs-hrda-slide", "iidm-synthia-16-classes", "classmix-norm",
                              "camix-val-size", "asss-two-heads", "dldm-full-aspp"])
def test_label_ids_equal_eval_only_save_predictions(root, tmp_path, deeplab_ckpt, script, flags):
    ckpt = deeplab_ckpt
    if flags is not DEEPLAB:
        script.main([*flags, "--data-root", str(root), "--out-dir", str(tmp_path / "run")])
        ckpt = varied(tmp_path / "run" / ("round1/rl/checkpoint.pth" if script is dldm else "checkpoint.pth"))
        if script is dldm:
            flags = [f for f in flags if f not in ("--stage", "rl")]
    script.main([*flags, "--data-root", str(root), "--out-dir", str(tmp_path / "ev"), "--eval-only",
               "--checkpoint", str(ckpt), "--save-predictions"])
    val = root / "cityscapes" / "leftImg8bit" / "val"
    assert common.main(["predict", "--checkpoint", str(ckpt), "--input", str(val), "--out-dir",
                        str(tmp_path / "pred")]) == 0
    expected = sorted((tmp_path / "ev" / "predictions").iterdir())
    assert len(expected) == 2
    assert all(len(np.unique(np.asarray(Image.open(p)))) >= 3 for p in expected)   # boundaries to get wrong
    for path in expected:
        stem = path.name.removesuffix("_labelIds.png")
        mine = tmp_path / "pred" / "frankfurt" / f"{stem}_leftImg8bit_labelIds.png"
        assert np.array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(path)))


def test_outputs_at_input_size_for_odd_sizes_and_jpegs(deeplab_ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "in" / "sub" / "odd.png")
    Image.fromarray(rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)).save(tmp_path / "in" / "photo.JPG")
    (tmp_path / "in" / "notes.txt").write_text("not an image")          # a folder's other files are skipped
    assert common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--input", str(tmp_path / "in"),
                        "--out-dir", str(tmp_path / "out"), "--opacity", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "predict: 2/2 images" in out and "images/s" in out
    for stem, (h, w) in (("sub/odd", (37, 53)), ("photo", (29, 41))):
        rgb = np.asarray(Image.open(next((tmp_path / "in").rglob(stem.split("/")[-1] + ".*"))).convert("RGB"))
        outs = {k: np.asarray(Image.open(tmp_path / "out" / f"{stem}_{k}.png"))
                for k in ("color", "overlay", "labelIds", "trainIds")}
        assert all(a.shape[:2] == (h, w) for a in outs.values())
        assert np.array_equal(outs["labelIds"], common.TRAINID_TO_LABELID[outs["trainIds"]])
        assert np.array_equal(outs["color"], common.PALETTE[outs["trainIds"]])
        blend = (rgb * 0.75 + outs["color"] * 0.25).round().astype(np.uint8)
        assert np.array_equal(outs["overlay"], blend)
    assert not list((tmp_path / "out").rglob("notes*"))


def test_slide_equals_whole_when_one_window_covers_the_image():
    torch.manual_seed(0)
    model = common.daformer_segmentor(19, "tiny", stochastic=False).eval()
    rgb = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    for crop in ((64, 96), (45, 70)):
        net = common.PredictNetwork(model, "imagenet_rgb", (96, 64), "cv2", False, crop, (32, 48))
        whole = common.predict_logits(net, rgb, "whole", torch.device("cpu"))
        slide = common.predict_logits(net, rgb, "slide", torch.device("cpu"))
        assert torch.allclose(whole, slide, atol=1e-5) if crop == (64, 96) else not torch.allclose(whole, slide)


@pytest.mark.parametrize("size,crop,stride", [((37, 53), (16, 16), (8, 8)), ((37, 53), (16, 16), (16, 16)),
                                              ((10, 7), (16, 16), (8, 8))])
def test_windows_cover_every_pixel(size, crop, stride):
    count = np.zeros(size, dtype=int)
    for y0, y1, x0, x1 in common.slide_boxes(size, crop, stride):
        assert 0 <= y0 < y1 <= size[0] and 0 <= x0 < x1 <= size[1]
        assert (y1 - y0, x1 - x0) == (min(crop[0], size[0]), min(crop[1], size[1]))
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1


def run_cli(*args):
    return subprocess.run([sys.executable, "common.py", "predict", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def test_bad_inputs_one_line_error_exit_2_nothing_written(deeplab_ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    full = tmp_path / "full.jpg"
    Image.fromarray(np.full((40, 40, 3), 99, dtype=np.uint8)).save(full)
    (tmp_path / "z_broken.jpg").write_bytes(full.read_bytes()[:200])
    r = run_cli("--checkpoint", deeplab_ckpt, "--input", tmp_path / "ok.png", tmp_path / "notes.txt",
                "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: ") and "notes.txt" in r.stderr and ".png/.jpg/.jpeg" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("--checkpoint", deeplab_ckpt, "--input", tmp_path / "z_broken.jpg", "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "z_broken.jpg" in r.stderr and "expected a readable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.rglob("z_broken_*"))
    (tmp_path / "ok.jpg").write_bytes(full.read_bytes())
    r = run_cli("--checkpoint", deeplab_ckpt, "--input", tmp_path / "ok.png", tmp_path / "ok.jpg",
                "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and "ok.jpg" in r.stderr and "ok.png" in r.stderr and "overwrite" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("--checkpoint", tmp_path / "ok.png", "--input", tmp_path / "ok.png", "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and "ok.png" in r.stderr and "weights file" in r.stderr
    folder = tmp_path / "set"                          # a later file of a folder is no image: nothing written at all
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    with pytest.raises(common.DataError) as exc:
        common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--input", str(folder), "--out-dir",
                     str(tmp_path / "out")])
    assert str(exc.value) == f"{folder / 'b.png'}: unreadable image (expected a PNG or JPEG file)"
    assert not (tmp_path / "out").exists()
    with pytest.raises(common.DataError) as exc:
        common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--input", str(folder / "a.png"), "--crop", "4",
                     "4", "--out-dir", str(tmp_path / "out")])
    assert str(exc.value) == ("--crop/--stride set the windows of --mode slide (this checkpoint predicts with --mode "
                              "whole: add --mode slide, or drop them)")
    with pytest.raises(common.DataError) as exc:
        common.main(["prepare-data", "--data-root", str(tmp_path), "--out", str(tmp_path / "prep"), "--frames",
                     "gta5:8x8:bicubic", "--workers", "-2"])
    assert str(exc.value) == "--workers -2: expected 0 (in this process) or a positive count"


def test_authors_checkpoint_needs_the_stack(deeplab_ckpt, tmp_path):
    """An authors' mmcv file holds no `args`: predict asks for --stack rather than guess the network."""
    state = torch.load(deeplab_ckpt, weights_only=True)["model"]
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    torch.save({"meta": {"iter": 1}, "state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "a.pth")
    with pytest.raises(common.DataError, match="no `args`.*give --stack"):
        common.main(["predict", "--checkpoint", str(tmp_path / "a.pth"), "--input", str(tmp_path),
                     "--out-dir", str(tmp_path / "out")])
    with pytest.raises(common.DataError, match="not a DAFormer/HRDA checkpoint"):
        common.main(["predict", "--checkpoint", str(tmp_path / "a.pth"), "--stack", "hrda", "--input", str(tmp_path),
                     "--out-dir", str(tmp_path / "out")])


class InputSpy(torch.nn.Module):
    """A 19-class 'network' that records the input sizes it sees."""
    num_classes = 19

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return torch.zeros(x.shape[0], 19, *x.shape[2:])


def test_keep_ratio_fits_the_image_into_the_size_as_mmseg(tmp_path, deeplab_ckpt):
    """ACDC/Dark Zurich runs and the authors' checkpoints fit an image into the size keeping its ratio (their val
    sets; mmseg's test Resize); Cityscapes runs of this project stretch it to the size as their val set does."""
    spy = InputSpy()
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    for keep, seen in ((True, (54, 54)), (False, (54, 96))):
        net = common.PredictNetwork(spy, "imagenet_rgb", (96, 54), "cv2", False, (54, 96), (27, 48), keep)
        common.predict_logits(net, rgb, "whole", torch.device("cpu"))
        assert spy.seen[-1] == seen
    assert common.authors_predict_args("hrda", "acdc") == {
        "stack": "hrda", "mit": "b5", "drop_path_rate": 0.1, "target": "acdc", "target_size": (1920, 1080),
        "crop_size": (1024, 1024), "eval_mode": "slide", "keep_ratio": True}
    assert common.authors_predict_args("daformer", "dark_zurich")["target_size"] == (960, 540)
    assert common.authors_predict_args("daformer")["target_size"] == (1024, 512)
    ckpt = torch.load(deeplab_ckpt, weights_only=True)
    assert not common.load_predict_network(deeplab_ckpt)[0].keep_ratio
    ckpt["args"]["target"] = "acdc"
    torch.save(ckpt, tmp_path / "acdc.pth")
    assert common.load_predict_network(tmp_path / "acdc.pth")[0].keep_ratio
    Image.fromarray(rgb).save(tmp_path / "x.png")
    with pytest.raises(common.DataError, match=r"--stack hrda: only for an authors' .*\(--stack deeplabv2\)"):
        common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--stack", "hrda", "--input",
                     str(tmp_path / "x.png"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(common.DataError, match=r"--device tpu9: not a device"):
        common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--device", "tpu9", "--input",
                     str(tmp_path / "x.png"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(common.DataError, match=r"--target acdc: only for an authors' checkpoint; .*deeplab.*"
                                               r"\(target cityscapes\)"):
        common.main(["predict", "--checkpoint", str(deeplab_ckpt), "--target", "acdc", "--input",
                     str(tmp_path / "x.png"),
                     "--out-dir", str(tmp_path / "out")])
