"""Confusion matrix, mIoU (19/16/13), evaluation protocols, --save-predictions encoding, check-data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import IGNORE, SegmentationDataset
from conftest import run_check, make_cityscapes, make_gta5, make_synthia


def naive_iou(pred, gt, n):
    ious = []
    for c in range(n):
        tp = fp = fn = 0
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g >= n:
                continue
            tp += p == c and g == c
            fp += p == c and g != c
            fn += p != c and g == c
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    return np.array(ious)


def test_confusion_and_iou_match_naive():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 19, size=(40, 50))
    gt[rng.random(gt.shape) < 0.2] = IGNORE
    gt[gt == 16] = 15  # class 16 absent from gt ...
    pred = rng.integers(0, 19, size=gt.shape)
    pred[pred == 16] = 14  # ... and from the prediction: empty union -> NaN
    cm = common.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 19)
    assert cm.sum() == (gt != IGNORE).sum()
    iou = common.per_class_iou(cm)
    ref = naive_iou(pred, gt, 19)
    assert np.isnan(iou[16]) and np.isnan(ref[16])
    assert np.allclose(np.nan_to_num(iou), np.nan_to_num(ref))
    m = common.metrics_from_confusion(cm, tuple(range(19)), iteration=7)
    assert m["mIoU"] == pytest.approx(100 * np.nanmean(ref))
    assert m["num_classes"] == 19 and list(m["per_class"]) == list(common.CLASS_NAMES)
    s = common.metrics_from_confusion(cm, tuple(range(19)), synthia=True)
    assert s["num_classes"] == 16 and "terrain" not in s["per_class"]
    synthia16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]   # no terrain, truck, train
    synthia13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]            # ... nor wall, fence, pole
    assert s["mIoU"] == pytest.approx(100 * np.nanmean(ref[synthia16]))
    assert s["mIoU13"] == pytest.approx(100 * np.nanmean(ref[synthia13]))


def test_synthia_counts_cityscapes_only_classes_as_false_positives():
    gt = torch.tensor([9, 9, 0, 0])  # terrain pixels in the Cityscapes gt ...
    pred = torch.tensor([0, 0, 0, 0])  # ... predicted as road: road IoU = 2/4, not 2/2
    m = common.metrics_from_confusion(common.confusion_matrix(pred, gt, 19), tuple(range(19)), synthia=True)
    assert m["per_class"]["road"] == pytest.approx(50.0)


def test_sixteen_class_head_metrics():
    gt16 = torch.tensor([0, 8, 9, 13])  # 16-class indices: road, vegetation, sky, bus
    m = common.metrics_from_confusion(common.confusion_matrix(gt16, gt16, 16), common.TRAIN_IDS_16, synthia=True)
    assert m["per_class"]["sky"] == 100 and m["per_class"]["bus"] == 100 and m["per_class"]["wall"] is None
    assert m["mIoU"] == 100 and m["mIoU13"] == 100


class ConstantModel(torch.nn.Module):
    """Predicts per pixel the class given by a fixed stride-8 map (tests the evaluation plumbing)."""

    def __init__(self, num_classes=19):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h, w = (x.shape[2] + 7) // 8 + 1, (x.shape[3] + 7) // 8 + 1
        logits = torch.zeros(x.shape[0], self.num_classes, h, w)
        logits[:, 13, :, : w // 2] = 5  # car on the left, road on the right
        logits[:, 0, :, w // 2:] = 5
        return logits


@pytest.mark.parametrize("label_res", ["input", "full"])
def test_evaluate_protocols_and_saved_predictions(tmp_path, label_res):
    base = make_cityscapes(tmp_path, n_val=2, h=32, w=64)
    ds = SegmentationDataset("cityscapes", base, split="val", resize=(32, 16), label_res=label_res)
    model = ConstantModel().train()
    m = common.evaluate(model, ds, torch.device("cpu"), out_dir=tmp_path / "run", save_predictions=True,
                        iteration=3)
    assert model.training  # restored after evaluation
    assert m["iteration"] == 3 and m["model"] == "student"
    pred_files = sorted((tmp_path / "run" / "predictions").glob("*.png"))
    assert [p.name for p in pred_files] == ["frankfurt_000000_000019_labelIds.png",
                                            "frankfurt_000001_000019_labelIds.png"]
    pred = np.asarray(Image.open(pred_files[0]))
    assert Image.open(pred_files[0]).mode == "L" and pred.shape == (32, 64)  # full label resolution
    assert set(np.unique(pred)) == {7, 26}  # label ids of road and car
    assert (pred[:, :20] == 26).all() and (pred[:, -20:] == 7).all()
    assert len(list((tmp_path / "run" / "vis").glob("*.png"))) == 2
    # the score equals a direct computation on the protocol's labels
    cm = torch.zeros(19, 19, dtype=torch.long)
    for i in range(2):
        y = ds[i]["label"]
        logits = common.upsample(model(ds[i]["image"][None]), y.shape)
        cm += common.confusion_matrix(logits.argmax(1)[0], y, 19)
    assert m["mIoU"] == pytest.approx(common.metrics_from_confusion(cm, tuple(range(19)))["mIoU"])
    assert ds[0]["label"].shape == ((16, 32) if label_res == "input" else (32, 64))


def test_evaluate_model_in_eval_mode(tmp_path):
    base = make_cityscapes(tmp_path, n_val=1)
    ds = SegmentationDataset("cityscapes", base, split="val", resize=(32, 16))
    model = common.DeepLabV2(layers=(1, 1, 1, 1))
    seen = []
    model.layer1.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    common.evaluate(model, ds, torch.device("cpu"))
    assert seen == [False] and model.training


def test_check_data_clean_tree(tmp_path):
    make_gta5(tmp_path)
    make_synthia(tmp_path)
    make_cityscapes(tmp_path)
    out = run_check(tmp_path, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) == {"gta5", "synthia", "cityscapes"} and set(r["cityscapes"]) == {"train", "val"}
    assert r["gta5"]["train"]["pairs"] == 4 and len(r["gta5"]["train"]["size_mismatch"]) == 1
    assert r["cityscapes"]["train"]["orphans"] == [] and r["cityscapes"]["val"]["pairs"] == 2
    hist = r["synthia"]["train"]["histogram"]
    assert list(hist) == list(common.CLASS_NAMES) + ["ignore"]
    assert sum(hist.values()) == 3 * 38 * 64 and hist["road"] > 0 and hist["terrain"] == 0
    assert "gta5/train: 4 pairs" in out.stdout


def test_check_data_orphan_and_unreadable(tmp_path):
    make_gta5(tmp_path)
    make_cityscapes(tmp_path)
    (tmp_path / "gta5" / "images" / "00002.png").unlink()  # label without image
    (tmp_path / "gta5" / "labels" / "00003.png").write_bytes(b"not a png")
    out = run_check(tmp_path, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 2
    r = json.loads((tmp_path / "r.json").read_text())["gta5"]["train"]
    assert r["orphans"] == [str(tmp_path / "gta5" / "labels" / "00002.png")]
    assert r["unreadable"] == [str(tmp_path / "gta5" / "labels" / "00003.png")]
    assert r["pairs"] == 3


def test_check_data_missing_root(tmp_path):
    out = run_check(tmp_path / "nope")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "nope" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
