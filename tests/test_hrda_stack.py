"""--stack hrda and --mic in dacs.py and iidm.py (tiny MiT, 64x64 crops with 32x32 detail windows, generated data):
runs and exact resume, one test per new flag, the authors' HRDA checkpoint format, and the refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dacs
from conftest import ROOT, script_runner, weights_digest, write_palette, write_rgb

H, W = 64, 128   # every generated image; 64x64 crops, 32x32 detail windows, 32x32 context views
THING, STUFF = (24, 26), (7, 11, 21, 23)   # Cityscapes label ids: person, car / road, building, vegetation, sky
TINY = ["--iters", "2", "--stack", "hrda", "--mit", "tiny", "--init", "none", "--source-size", str(W), str(H),
        "--target-size", str(W), str(H), "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--tau", "0.01",
        "--warmup-iters", "0", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--device", "cpu"]
run_dacs = script_runner(dacs, TINY)


def blocky_labels(rng):
    """Left half one thing class, right half two stuff classes (top, bottom)."""
    ids = np.zeros((H, W), dtype=np.uint8)
    ids[:H // 2], ids[H // 2:] = rng.choice(STUFF, 2, replace=False)
    ids[:, :W // 2] = rng.choice(THING)
    return ids


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA5 and Cityscapes trees of 64x128 images."""
    r = tmp_path_factory.mktemp("hrda")
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        write_rgb(r / "gta5" / "images" / f"{i:05d}.png", rng, H, W)
        write_palette(r / "gta5" / "labels" / f"{i:05d}.png", blocky_labels(rng))
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            write_rgb(r / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng, H, W)
            d = r / "cityscapes" / "gtFine" / split / city
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(blocky_labels(rng), mode="L").save(d / f"{stem}_gtFine_labelIds.png")
    return r


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and list(a) == list(b)


@pytest.mark.parametrize("mic", [[], ["--mic"]])
def test_dacs_two_iterations_and_exact_resume(root, tmp_path, mic):
    metrics, full = run_dacs(root, tmp_path / "a", "--save-every", "1", "--keep-checkpoints", *mic)
    names = list(common.hrda_segmentor(19, "tiny").state_dict())            # the authors' HRDA student names
    assert list(full["model"]) == names and list(full["ema_model"]) == names and full["iteration"] == 2
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(("loss_mic" in r) == bool(mic) for r in log)
    _, resumed = run_dacs(root, tmp_path / "c", "--resume", tmp_path / "a" / "checkpoint_1.pth", *mic)
    assert same(full["model"], resumed["model"]) and same(full["ema_model"], resumed["ema_model"])
