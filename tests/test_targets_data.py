"""ACDC, Dark Zurich, BDD100K, Mapillary Vistas and the Cityscapes test split, read in their official layouts."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
from common import IGNORE, DataError, SegmentationDataset, dataset_files
from conftest import run_check, make_cityscapes, make_gta5
from target_layouts import (ACDC_COUNTS, add_cityscapes_test, make_acdc, make_bdd100k, make_dark_zurich,
                            make_mapillary, write_grey, write_mapillary_label)


def count(split):
    return sum(ACDC_COUNTS[split].values())


def test_acdc_nested_layout_pairs_stems_conditions_and_ignores_side_files_and_refs(tmp_path):
    base = make_acdc(tmp_path)
    for split in ("train", "val", "test"):
        pairs, orphans = dataset_files("acdc", base, split)
        assert len(pairs) == count(split) and orphans == []     # side files (_gt_labelIds, _gt_inv*...) are no orphans
        assert all("_ref" not in str(img) and img.name.endswith("_rgb_anon.png") for img, _ in pairs)
        assert [common.condition_of(img) for img, _ in pairs] == [c for c, n in ACDC_COUNTS[split].items()
                                                                   for _ in range(n)]
    img, lab = dataset_files("acdc", base, "val")[0][0]
    assert lab == base / "gt" / "fog" / "val" / img.parent.name / f"{common.stem_of(img)}_gt_labelTrainIds.png"
    assert common.stem_of(img) == "GOPR0403_frame_000001"
    assert all(lab is None for _, lab in dataset_files("acdc", base, "test")[0])
    night_fog = dataset_files("acdc", base, "train", conditions=["night", "fog"])[0]
    assert [common.condition_of(i) for i, _ in night_fog] == ["fog"] * 2 + ["night"] * 3
    ds = SegmentationDataset("acdc", base, "val", conditions=("snow",))
    assert len(ds) == 1 and ds.stems() == ["GOPR0433_frame_000001"]
    assert common.condition_of(tmp_path / "cityscapes" / "leftImg8bit" / "val" / "fog" / "x.png") is None


def test_acdc_labels_are_train_ids_and_the_dataset_item_matches_them(tmp_path):
    base = make_acdc(tmp_path)
    img, lab = dataset_files("acdc", base, "val")[0][0]
    raw = np.array(Image.open(lab))
    raw[0, 0] = 19                                                          # not a train id -> ignore
    write_grey(lab, raw)
    label = common.read_label(lab, "acdc")
    assert label[0, 0] == IGNORE and np.array_equal(label.ravel()[1:], raw.ravel()[1:])
    item = SegmentationDataset("acdc", base, "val", label_res="full")[0]
    assert torch.equal(item["label"], torch.from_numpy(label).long())
    Image.fromarray(np.zeros((*raw.shape, 3), np.uint8)).save(lab)          # a colour PNG in place of the label
    with pytest.raises(DataError, match=r"_gt_labelTrainIds.png: unexpected label encoding .*8-bit grey PNG of train"):
        common.read_label(lab, "acdc")


def test_acdc_flattened_layout_and_nested_preferred_beside_it(tmp_path):
    flat = make_acdc(tmp_path / "flat", layout="flat")
    for split in ("train", "val", "test"):
        assert len(dataset_files("acdc", flat, split)[0]) == count(split)
    assert common.condition_of(dataset_files("acdc", flat, "val")[0][0][0]) is None
    with pytest.raises(DataError, match=r"flat/acdc/rgb_anon: no condition folders"):
        dataset_files("acdc", flat, "val", conditions=["fog"])
    both = make_acdc(tmp_path / "both")                              # DAFormer's rsync writes rgb_anon/train beside
    make_acdc(tmp_path / "both", layout="flat", seed=1)
    assert len(dataset_files("acdc", both, "train")[0]) == count("train")
    assert all(common.condition_of(i) for i, _ in dataset_files("acdc", both, "train")[0])


def test_dark_zurich_night_only_and_image_only_train_and_test(tmp_path):
    base = make_dark_zurich(tmp_path)
    train, val, test = (dataset_files("dark_zurich", base, s) for s in ("train", "val", "test"))
    assert len(train[0]) == 3 and all(lab is None and "/night/" in str(img) for img, lab in train[0])
    assert len(val[0]) == 2 and val[1] == [] and all(lab.name.endswith("_gt_labelTrainIds.png") for _, lab in val[0])
    label = val[0][0][1]
    assert np.array_equal(common.read_label(label, "dark_zurich"), np.asarray(Image.open(label)))   # stored train ids
    assert len(test[0]) == 2 and all(lab is None for _, lab in test[0])
    assert [common.stem_of(i) for i, _ in test[0]] == ["GOPR0364_frame_000001", "GOPR0364_frame_000002"]
    ds = SegmentationDataset("dark_zurich", base, "train", resize=(16, 9), crop=(8, 8), flip=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))   # image-only items collate as labeled ones
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].shape == (2, 8, 8)
    assert (batch["label"] == IGNORE).all()


@pytest.mark.parametrize("layout", ["10k", "legacy"])
def test_bdd100k_jpeg_images_and_train_id_masks(tmp_path, layout):
    base = make_bdd100k(tmp_path, layout=layout)
    pairs, orphans = dataset_files("bdd100k", base, "val")
    assert len(pairs) == 2 and orphans == [] and all(img.suffix == ".jpg" for img, _ in pairs)
    assert pairs[0][1].name == common.stem_of(pairs[0][0]) + ("_train_id.png" if layout == "legacy" else ".png")
    assert len(dataset_files("bdd100k", base, "test")[0]) == 2
    item = SegmentationDataset("bdd100k", base, "val", label_res="full")[0]
    assert item["image"].shape == (3, 18, 32)
    assert torch.equal(item["label"], torch.from_numpy(np.array(Image.open(pairs[0][1]))).long())
    assert common.image_size(pairs[0][0]) == (32, 18)


def test_mapillary_v12_table_split_names_and_converted_files(tmp_path):
    base = make_mapillary(tmp_path)
    assert [len(dataset_files("mapillary", base, s)[0]) for s in ("train", "val", "test")] == [3, 2, 2]
    pairs, orphans = dataset_files("mapillary", base, "val")
    assert orphans == [] and pairs[0][0].parent == base / "validation" / "images"   # _labelTrainIds.png: no orphan
    raw = np.array([[13, 24, 41, 2, 15, 17, 6, 3, 45, 47, 48, 50, 30, 29, 27],
                    [19, 20, 21, 22, 55, 61, 54, 58, 57, 52, 0, 1, 14, 63, 65]], dtype=np.uint8)
    write_mapillary_label(pairs[0][1], raw)
    assert common.read_label(pairs[0][1], "mapillary").tolist() == [
        [0, 0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10],
        [11, 12, 12, 12, 13, 14, 15, 16, 17, 18, 255, 255, 255, 255, 255]]
    write_mapillary_label(pairs[0][1], np.full((2, 2), 100))
    with pytest.raises(DataError, match=r"valKey000_x.png: class id 100 is not a Mapillary Vistas v1.2 id"):
        common.read_label(pairs[0][1], "mapillary")


def test_mapillary_v2_download_reads_its_v12_labels_and_v2_only_is_refused(tmp_path):
    base = make_mapillary(tmp_path)
    labels = base / "validation" / "labels"
    shutil.move(labels, base / "validation" / "v1.2" / "labels")
    (base / "validation" / "v2.0" / "labels").mkdir(parents=True)
    assert len(dataset_files("mapillary", base, "val")[0]) == 2
    shutil.rmtree(base / "validation" / "v1.2")
    with pytest.raises(DataError, match=r"validation/v2.0: Mapillary Vistas v2.0 labels \(124 classes\)"):
        dataset_files("mapillary", base, "val")


def test_cityscapes_test_split_is_image_only_with_ignore_labels(tmp_path):
    make_cityscapes(tmp_path, n_val=1)
    base = add_cityscapes_test(tmp_path)
    pairs, orphans = dataset_files("cityscapes", base, "test")
    assert len(pairs) == 3 and orphans == [] and all(lab is None for _, lab in pairs)   # gtFine/test not paired
    assert common.stem_of(pairs[0][0]) == "berlin_000000_000019"
    for label_res, shape in (("input", (8, 16)), ("full", (32, 64))):
        item = SegmentationDataset("cityscapes", base, "test", resize=(16, 8), label_res=label_res)[1]
        assert item["image"].shape == (3, 8, 16) and item["label"].shape == shape and (item["label"] == IGNORE).all()
    assert len(SegmentationDataset("cityscapes", base, "test", stems=["bonn_000001_000019"])) == 1


def test_stems_of_every_layout():
    assert common.stem_of("a/aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019"
    assert common.stem_of("GOPR0475_frame_000041_rgb_anon.png") == "GOPR0475_frame_000041"
    assert common.stem_of("x/7d2f7975-e0c1c5a7.jpg") == "7d2f7975-e0c1c5a7"
    assert common.stem_of("__3vbJ9I8b6yKhEJMiQq7A.JPEG") == "__3vbJ9I8b6yKhEJMiQq7A"
    assert common.stem_of("00001.png") == "00001"


def test_bad_layouts_are_one_line_errors_naming_the_path(tmp_path):
    base = make_acdc(tmp_path)
    shutil.rmtree(base / "gt" / "rain")
    with pytest.raises(DataError, match=r"acdc/gt/rain/train: folder not found \(expected ACDC gt/rain/train/"):
        dataset_files("acdc", base, "train")
    assert len(dataset_files("acdc", base, "test")[0]) == count("test")            # test needs no gt
    with pytest.raises(DataError, match="ACDC conditions dusk: expected some of fog,night,rain,snow"):
        dataset_files("acdc", base, "val", conditions=["dusk"])
    with pytest.raises(DataError, match=r"acdc: acdc has no split 'extra'"):
        dataset_files("acdc", base, "extra")
    dz = make_dark_zurich(tmp_path)
    next((dz / "rgb_anon" / "val" / "night").rglob("*_rgb_anon.png")).unlink()      # a label without its image
    with pytest.raises(DataError, match=r"_gt_labelTrainIds.png: has no matching image/label \(1 orphan"):
        dataset_files("dark_zurich", dz, "val")
    (tmp_path / "bdd100k").mkdir()
    with pytest.raises(DataError, match=r"bdd100k/images/val: folder not found \(expected BDD100K images/10k/val"):
        dataset_files("bdd100k", tmp_path / "bdd100k", "val")
    empty = tmp_path / "mapillary" / "testing" / "images"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match=r"testing/images: no images found"):
        dataset_files("mapillary", tmp_path / "mapillary", "test")


def test_prepared_root_refuses_the_new_kinds_in_one_line(tmp_path):
    make_gta5(tmp_path / "data")
    make_acdc(tmp_path / "data")
    common.prepare_data(tmp_path / "data", tmp_path / "prep", ["gta5:20x12:bilinear"])
    for call in (lambda: dataset_files("acdc", tmp_path / "prep" / "acdc", "val"),
                 lambda: SegmentationDataset("acdc", tmp_path / "prep" / "acdc", "val", resize=(16, 9))):
        with pytest.raises(DataError, match=r"prep/prepared.json: a prepared root holds gta5/synthia/cityscapes "
                                            r"frames only; expected the original data root for acdc"):
            call()


def test_check_data_reports_each_split_with_published_counts_as_warnings(tmp_path):
    make_acdc(tmp_path)
    make_dark_zurich(tmp_path)
    make_bdd100k(tmp_path, counts=(("val", 2),))
    make_mapillary(tmp_path)
    out = run_check(tmp_path, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) == {"acdc", "dark_zurich", "bdd100k", "mapillary"} and set(r["bdd100k"]) == {"val"}
    acdc_val = r["acdc"]["val"]
    assert acdc_val["pairs"] == 5 and acdc_val["orphans"] == [] and acdc_val["expected"] == 406
    assert acdc_val["conditions"] == {"fog": 1, "night": 2, "rain": 1, "snow": 1}
    assert "2 night images, the published ACDC val split has 106" in acdc_val["warnings"]
    assert sum(acdc_val["histogram"].values()) == 5 * 18 * 32
    dz_train = r["dark_zurich"]["train"]
    assert dz_train["labeled"] is False and dz_train["images"] == 3 and "histogram" not in dz_train
    assert dz_train["warnings"] == ["3 images, the published dark_zurich train split has 2416"]
    assert r["mapillary"]["train"]["pairs"] == 3 and r["mapillary"]["test"]["images"] == 2
    assert "dark_zurich/test: 2 images (no labels published), 0 orphans" in out.stdout
    assert "acdc/val: 5 pairs, fog 1, night 2, rain 1, snow 1, 0 orphans" in out.stdout
    assert "  warning: 5 images, the published acdc val split has 406" in out.stdout
    (tmp_path / "acdc" / "gt" / "snow" / "val" / "GOPR0433" / "stray_gt_labelTrainIds.png").write_bytes(b"x")
    next((tmp_path / "bdd100k" / "images" / "10k" / "val").glob("*.jpg")).write_bytes(b"not a jpeg")
    out = run_check(tmp_path, "--json", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert out.returncode == 2 and len(r["acdc"]["val"]["orphans"]) == 1 and len(r["bdd100k"]["val"]["unreadable"]) == 1


class ConvModel(nn.Module):
    """A fixed 1x1 convolution: predictions depend on the pixels, so conditions score differently."""
    num_classes = 19

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 19, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(19, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def direct_metrics(model, ds, indices):
    cm = torch.zeros(19, 19, dtype=torch.long)
    for i in indices:
        item = ds[i]
        logits = common.upsample(model(item["image"][None]), item["label"].shape)
        cm += common.confusion_matrix(logits.argmax(1)[0], item["label"], 19)
    return common.metrics_from_confusion(cm, tuple(range(19)))


def test_evaluate_adds_per_condition_metrics_for_acdc(tmp_path):
    base = make_acdc(tmp_path, counts={"val": ACDC_COUNTS["train"]})
    ds = SegmentationDataset("acdc", base, "val", resize=(16, 9), label_res="full")
    model = ConvModel()
    m = common.evaluate(model, ds, torch.device("cpu"))
    assert m["mIoU"] == pytest.approx(direct_metrics(model, ds, range(len(ds)))["mIoU"])
    assert list(m["per_condition"]) == ["fog", "night", "rain", "snow"]
    conditions = [common.condition_of(img) for img, _ in ds.pairs]
    for c, block in m["per_condition"].items():
        expected = direct_metrics(model, ds, [i for i, k in enumerate(conditions) if k == c])
        assert block["images"] == conditions.count(c) and block["mIoU"] == pytest.approx(expected["mIoU"])
        assert block["per_class"] == pytest.approx(expected["per_class"], nan_ok=True)
    assert len({round(b["mIoU"], 6) for b in m["per_condition"].values()}) > 1
    one = SegmentationDataset("acdc", base, "val", resize=(16, 9), conditions=["rain"])
    assert "per_condition" not in common.evaluate(model, one, torch.device("cpu"))
    make_cityscapes(tmp_path, n_val=2)
    city = SegmentationDataset("cityscapes", tmp_path / "cityscapes", "val", resize=(16, 8))
    assert "per_condition" not in common.evaluate(model, city, torch.device("cpu"))


def evaluate_rank(rank, base, init, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    ds = SegmentationDataset("acdc", base, "val", resize=(16, 9), label_res="full")
    m = common.evaluate(ConvModel(), ds, torch.device("cpu"), dist=common.Dist(rank, 2, rank, None))
    (out / f"rank{rank}.json").write_text(json.dumps(m))
    torch.distributed.destroy_process_group()


def test_per_condition_metrics_under_two_processes_equal_one_process(tmp_path):
    base = make_acdc(tmp_path, counts={"val": ACDC_COUNTS["train"]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.start_processes(evaluate_rank, (base, f"file://{tmp_path / 'store'}", tmp_path),
                                          nprocs=2, start_method="spawn")
    one = common.evaluate(ConvModel(), SegmentationDataset("acdc", base, "val", resize=(16, 9), label_res="full"),
                          torch.device("cpu"))
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert json.dumps(two["per_condition"]) == json.dumps(one["per_condition"]) and two["mIoU"] == one["mIoU"]
