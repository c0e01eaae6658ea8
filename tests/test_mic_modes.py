"""MIC's mask modes (lhoyer/MIC masking_consistency_module.py): 'separatetrgaug' for Cityscapes targets and
'separate' (source 0 + target 0, no colour augmentation) for ACDC/Dark Zurich; the per-target default, tiny
Cityscapes -> ACDC runs of --stack daformer/hrda --mic, the demo's mask block and the refusals."""
import json
import subprocess
import sys

import pytest
import torch

import common
import dacs
import iidm
from conftest import ROOT, make_cityscapes
from target_layouts import make_acdc

TINY = ["--iters", "2", "--mit", "tiny", "--init", "none", "--source-size", "128", "64", "--target-size", "128",
        "72", "--crop-size", "64", "64", "--mask-block", "8", "--rcs-min-pixels", "10", "--tau", "0.01",
        "--warmup-iters", "0", "--workers", "0", "--log-every", "1", "--eval-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    make_cityscapes(r, h=64, w=128)
    make_acdc(r, h=72, w=128)
    return r


def separate_args():
    return dacs.parse_args(["--source", "cityscapes", "--target", "acdc", "--stack", "daformer", "--init", "none",
                            "--mic", "--mask-block", "8"])


def test_separate_batch_is_source_0_and_target_0_uncoloured(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x_s, x_t = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    y_s, y_t = torch.randint(0, 19, (2, 16, 16), generator=g), torch.randint(0, 19, (2, 16, 16), generator=g)
    w_t = torch.rand(2, 16, 16, generator=g)
    monkeypatch.setattr(common, "mic_block_mask", lambda n, h, w, *a: torch.ones(n, 1, h, w))   # nothing masked
    x_k, y_k, w_k = dacs.mic_batch(x_s, y_s, x_t, y_t, w_t, "imagenet_rgb", g, separate_args())
    assert torch.equal(x_k, torch.stack([x_s[0], x_t[0]]))          # unchanged pixels: no jitter, no blur
    assert torch.equal(y_k, torch.stack([y_s[0], y_t[0]]))
    assert torch.equal(w_k, torch.stack([torch.ones(16, 16), w_t[0]]))


def test_separate_masks_blocks_of_each_image_at_the_ratio():
    args = separate_args()
    x = torch.ones(2, 3, 64, 64)
    shares = []
    for seed in range(20):
        x_k = dacs.mic_batch(x, torch.zeros(2, 64, 64).long(), x, torch.zeros(2, 64, 64).long(), torch.ones(2, 64, 64),
                             "imagenet_rgb", torch.Generator().manual_seed(seed), args)[0]
        blocks = x_k[:, 0].reshape(2, 8, 8, 8, 8)                      # 8-px blocks: each all 0 or all 1
        assert torch.equal(blocks.amin((2, 4)), blocks.amax((2, 4)))
        shares += (x_k[:, 0] == 0).float().mean((1, 2)).tolist()       # masked fraction per image
    assert len(set(shares)) > 10 and 0.6 < sum(shares) / len(shares) < 0.8


def test_mask_mode_default_follows_the_target():
    def mode(*flags):
        return dacs.parse_args(["--stack", "daformer", "--init", "none", "--mic", *flags]).mask_mode
    assert mode() == "separatetrgaug"
    assert mode("--source", "cityscapes", "--target", "acdc") == "separate"
    assert mode("--source", "cityscapes", "--target", "dark_zurich") == "separate"
    assert mode("--source", "cityscapes", "--target", "acdc", "--mask-mode", "separatetrgaug") == "separatetrgaug"
    assert dacs.parse_args(["--demo", "--stack", "daformer", "--mic"]).mask_block == 4   # 16x16 blocks of 64 px
    assert iidm.parse_args(["--demo", "--stack", "hrda", "--mic"]).mask_block == 4


@pytest.mark.parametrize("stack", ["daformer", "hrda"])
def test_cityscapes_to_acdc_trains_on_the_separate_batch(root, tmp_path, monkeypatch, stack):
    seen = []
    separate = common.mic_separate_batch

    def spy(x_s, y_s, x_t, y_t, w_t):
        out = separate(x_s, y_s, x_t, y_t, w_t)
        seen.append((w_t, out))
        return out
    monkeypatch.setattr(common, "mic_separate_batch", spy)
    dacs.main([*TINY, "--stack", stack, "--source", "cityscapes", "--target", "acdc", "--mic",
               "--data-root", str(root), "--out-dir", str(tmp_path / "run")])
    assert len(seen) == 2
    for w_t, (x_k, y_k, w_k) in seen:
        assert x_k.shape == (2, 3, 64, 64) and torch.equal(w_k[0], torch.ones(64, 64)) and torch.equal(w_k[1], w_t[0])
    top = round(15 * 64 / 512)   # daformer keeps DAFormer's v1 crop on ACDC; HRDA drops it (experiments.py id 49)
    assert (seen[0][1][2][1][:top] == 0).all() == (stack == "daformer")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_mic"] > 0 for r in log)


def cli(script, tmp_path, *flags):
    out = subprocess.run([sys.executable, str(ROOT / script), *flags, "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()
    return out.stderr.strip()


def test_a_mask_block_larger_than_the_crop_is_refused_in_one_line(tmp_path):
    for script in ("dacs.py", "iidm.py"):   # the old code crashed in the loop (a 0x0 block grid upsampled)
        assert cli(script, tmp_path, "--demo", "--stack", "daformer", "--mic", "--mask-block", "128") == (
            "error: --mask-block 128 with --crop-size 64 64: a mask block larger than the masked image; expected "
            "--mask-block <= 64")


def test_mic_refusals():
    acdc = ["--source", "cityscapes", "--target", "acdc", "--stack", "daformer", "--init", "none"]
    with pytest.raises(common.DataError, match="--mask-mode separate masks source image 0 and target image 0 of "
                                               "batches of 2 .*--batch-size 4, expected 2"):
        dacs.parse_args([*acdc, "--mic", "--batch-size", "4"])
    assert dacs.parse_args([*acdc, "--mic", "--mask-mode", "separatetrgaug", "--batch-size", "4"]).batch_size == 4
    with pytest.raises(common.DataError, match="--mask-mode is a --mic flag"):
        dacs.parse_args([*acdc, "--mask-mode", "separate"])
    with pytest.raises(common.DataError, match="--mask-block 32 with --crop-size 16 16: a mask block larger"):
        dacs.parse_args([*acdc, "--mic", "--crop-size", "16", "16"])
    with pytest.raises(common.DataError, match="--mask-block 64 with --crop-size 48 48: a mask block larger"):
        iidm.parse_args(["--stack", "hrda", "--init", "none", "--mic", "--crop-size", "48", "48"])
    with pytest.raises(common.DataError, match="--mic --target acdc: IIDM\\+MIC"):
        iidm.parse_args(["--target", "acdc", "--stack", "hrda", "--init", "none", "--mic"])
