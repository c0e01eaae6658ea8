"""Test-server export (Cityscapes, ACDC, Dark Zurich): names, sizes, values, zip layout, self-check, nothing
half-written."""
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
from common import DataError, SegmentationDataset
from conftest import make_cityscapes
from target_layouts import add_cityscapes_test, make_acdc, make_dark_zurich

CPU = torch.device("cpu")


class ConvModel(nn.Module):
    """A fixed 1x1 convolution with `num_classes` outputs: pixel-dependent predictions."""

    def __init__(self, num_classes=19):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


class ConstantModel(nn.Module):
    """Output `k` everywhere (training-mode DeepLabv2 style: an (aux, main) pair)."""

    def __init__(self, k, num_classes=19):
        super().__init__()
        self.k, self.num_classes = k, num_classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])
        logits[:, self.k] = 1
        return logits, logits


@torch.no_grad()
def direct_probs(model, ds, index, size):
    logits = common.upsample(model(ds[index]["image"][None]), size)
    return logits.softmax(1)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("targets")
    make_cityscapes(r, n_train=1, n_val=1)
    add_cityscapes_test(r)
    make_acdc(r, counts={"val": {c: 1 for c in common.ACDC_CONDITIONS},
                         "test": {"fog": 2, "night": 1, "rain": 1, "snow": 1}})
    make_dark_zurich(r, n_train=1, n_val=1, n_test=3)
    return r


def test_cityscapes_label_ids_at_the_original_size_flat_zip(root, tmp_path, capsys):
    ds = SegmentationDataset("cityscapes", root / "cityscapes", "test", resize=(16, 8))
    model = ConvModel()
    record = {"checkpoint": "run/checkpoint.pth", "model": "student", "iteration": 7}
    info = common.export_submission(model, ds, "cityscapes", tmp_path / "out", CPU, record=record)
    out = tmp_path / "out"
    names = [f"{s}_labelIds.png" for s in ds.stems()]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "predictions", "submission_cityscapes.zip"]
    assert sorted(zipfile.ZipFile(out / "submission_cityscapes.zip").namelist()) == sorted(names)
    for index, name in enumerate(names):
        im = Image.open(out / "predictions" / name)
        assert im.mode == "L" and im.size == (64, 32)              # Cityscapes test images' own size
        expected = common.TRAINID_TO_LABELID[direct_probs(model, ds, index, (32, 64)).argmax(0).numpy()]
        assert np.array_equal(np.asarray(im), expected)
    assert json.loads((out / "export.json").read_text()) == info
    assert info["checkpoint"] == "run/checkpoint.pth" and info["iteration"] == 7 and info["split"] == "test"
    assert info["server"] == "cityscapes" and info["images"] == 3 and info["counts"] == {"predictions": 3}
    assert info["files"] == sorted(names) and info["zip"] == "submission_cityscapes.zip"
    assert info["expected_images"] == 1525 and capsys.readouterr().err.strip() == (   # a partial test split
        f"warning: {root / 'cityscapes'}: 3 cityscapes test images, the published split has 1525; the cityscapes "
        f"server rejects a submission that misses any")


def test_sixteen_class_head_writes_the_label_ids_of_its_classes(root, tmp_path):
    ds = SegmentationDataset("cityscapes", root / "cityscapes", "test", resize=(16, 8))
    common.export_submission(ConstantModel(9, 16), ds, "cityscapes", tmp_path / "out", CPU)
    for p in (tmp_path / "out" / "predictions").iterdir():
        assert set(np.unique(np.asarray(Image.open(p)))) == {23}    # output 9 of 16 = train id 10, sky = label id 23


def test_acdc_train_ids_named_after_the_inputs_and_slide_equals_whole_for_one_window(root, tmp_path):
    ds = SegmentationDataset("acdc", root / "acdc", "test", resize=(16, 9))
    model = ConvModel()
    info = common.export_submission(model, ds, "acdc", tmp_path / "whole", CPU, align_corners=False)
    names = sorted(img.name for img, _ in ds.pairs)
    assert names[0] == "GOPR0404_frame_000001_rgb_anon.png" and len(names) == 5
    assert sorted(zipfile.ZipFile(tmp_path / "whole" / "submission_acdc.zip").namelist()) == names   # flat
    assert info["conditions"] == {"fog": 2, "night": 1, "rain": 1, "snow": 1} and info["counts"] == {"predictions": 5}
    for index, (img, _) in enumerate(ds.pairs):
        im = Image.open(tmp_path / "whole" / "predictions" / img.name)
        expected = common.upsample(model(ds[index]["image"][None]), (18, 32), align_corners=False).argmax(1)[0]
        assert im.mode == "L" and im.size == (32, 18) and np.array_equal(np.asarray(im), expected.numpy())
    assert info["inference"] == {"mode": "whole"}
    slide = common.export_submission(common.SlideInference(model, crop=(9, 16), stride=(4, 8)), ds, "acdc",
                                     tmp_path / "slide", CPU, align_corners=False)
    assert slide["inference"] == {"mode": "slide", "crop": [9, 16], "stride": [4, 8]}
    for name in names:
        assert (tmp_path / "slide" / "predictions" / name).read_bytes() == \
            (tmp_path / "whole" / "predictions" / name).read_bytes()


def test_dark_zurich_three_folders_invalid_copy_and_uint16_confidence(root, tmp_path):
    ds = SegmentationDataset("dark_zurich", root / "dark_zurich", "test", resize=(16, 9))
    model = ConvModel()
    info = common.export_submission(model, ds, "dark_zurich", tmp_path / "out", CPU)
    pred = tmp_path / "out" / "predictions"
    folders = ("labelTrainIds", "labelTrainIds_invalid", "confidence")
    names = [f"{s}_rgb_anon.png" for s in ds.stems()]
    members = zipfile.ZipFile(tmp_path / "out" / "submission_dark_zurich.zip").namelist()
    assert {m.split("/")[0] for m in members} == set(folders)
    assert sorted(m for m in members if not m.endswith("/")) == sorted(f"{d}/{n}" for d in folders for n in names)
    assert info["counts"] == {d: 3 for d in folders}
    for index, name in enumerate(names):
        prob = direct_probs(model, ds, index, (18, 32))
        train = Image.open(pred / "labelTrainIds" / name)
        assert train.size == (32, 18) and np.array_equal(np.asarray(train), prob.argmax(0).numpy())
        assert (pred / "labelTrainIds_invalid" / name).read_bytes() == (pred / "labelTrainIds" / name).read_bytes()
        conf = Image.open(pred / "confidence" / name)
        assert conf.mode == "I;16" and conf.size == (32, 18)
        expected = np.floor((prob.max(0).values.double() * 65535).numpy())   # truncated, as CIConv
        assert np.abs(np.asarray(conf).astype(np.int64) - expected).max() == 0


def exported(root, tmp_path):
    """A valid ACDC predictions folder (a copy to damage), its stems and the images' sizes."""
    ds = SegmentationDataset("acdc", root / "acdc", "test", resize=(16, 9))
    common.export_submission(ConvModel(), ds, "acdc", tmp_path / "ok", CPU)
    folder = shutil.copytree(tmp_path / "ok" / "predictions", tmp_path / "damaged")
    return folder, ds.stems(), [common.image_size(img) for img, _ in ds.pairs]


def test_self_check_refuses_wrong_count_channels_size_values_and_names(root, tmp_path):
    folder, stems, sizes = exported(root, tmp_path)
    common.check_submission(folder, "acdc", stems, sizes)
    first = folder / f"{stems[0]}_rgb_anon.png"
    saved = first.read_bytes()
    first.unlink()
    with pytest.raises(DataError, match=r"GOPR0404_frame_000001_rgb_anon.png: missing \(1 of 5 files"):
        common.check_submission(folder, "acdc", stems, sizes)
    damages = [(lambda p: Image.fromarray(np.zeros((18, 32, 2), np.uint8), mode="LA").save(p),
                r"bit depth 8, colour type 4; expected a one-channel 8-bit grey PNG"),
               (lambda p: Image.fromarray(np.full((18, 32), 255, np.uint8)).save(p),
                r"values \[255\] not allowed; expected train ids 0-18"),
               (lambda p: Image.fromarray(np.zeros((9, 16), np.uint8)).save(p),
                r"16x9; expected the test image's size 32x18")]
    for damage, words in damages:
        damage(first)
        with pytest.raises(DataError, match=rf"{first.name}: {words}"):
            common.check_submission(folder, "acdc", stems, sizes)
    first.write_bytes(saved)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: not the prediction of a test image \(1 unexpected"):
        common.check_submission(folder, "acdc", stems, sizes)
    (folder / "notes.txt").unlink()
    with pytest.raises(DataError, match=r"two test images share the stem"):
        common.check_submission(folder, "acdc", stems + stems[:1], sizes + sizes[:1])
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(odd / "frankfurt_labelIds.png")
    with pytest.raises(DataError, match=r"frankfurt_labelIds.png: name does not match the cityscapes server"):
        common.check_submission(odd, "cityscapes", ["frankfurt"], [(2, 2)])


def test_dark_zurich_self_check_wants_identical_invalid_folder(root, tmp_path):
    ds = SegmentationDataset("dark_zurich", root / "dark_zurich", "test", resize=(16, 9))
    common.export_submission(ConvModel(), ds, "dark_zurich", tmp_path / "out", CPU)
    folder = tmp_path / "out" / "predictions"
    name = f"{ds.stems()[0]}_rgb_anon.png"
    train = np.asarray(Image.open(folder / "labelTrainIds" / name))
    Image.fromarray((train + 1) % 19).save(folder / "labelTrainIds_invalid" / name)
    with pytest.raises(DataError, match=r"labelTrainIds_invalid/GOPR0364_frame_000001_rgb_anon.png: differs from"):
        common.check_submission(folder, "dark_zurich", ds.stems(), [common.image_size(i) for i, _ in ds.pairs])


def test_non_empty_export_dir_wrong_split_and_failed_check_leave_nothing(root, tmp_path):
    ds = SegmentationDataset("acdc", root / "acdc", "test", resize=(16, 9))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.png").write_bytes(b"x")
    with pytest.raises(DataError, match=rf"{busy}: not empty \(expected a new or empty folder for the export\)"):
        common.export_submission(ConvModel(), ds, "acdc", busy, CPU)
    assert [p.name for p in busy.iterdir()] == ["old.png"]
    val = SegmentationDataset("acdc", root / "acdc", "val", resize=(16, 9))
    with pytest.raises(DataError, match=r"acdc val split; the acdc server expects predictions of the acdc test split"):
        common.export_submission(ConvModel(), val, "acdc", tmp_path / "v", CPU)
    with pytest.raises(DataError, match=r"cityscapes server expects predictions of the cityscapes test split"):
        common.export_submission(ConvModel(), ds, "cityscapes", tmp_path / "v", CPU)
    with pytest.raises(DataError, match=r"values \[19\] not allowed"):      # a 20-way head: class 19 is no train id
        common.export_submission(ConstantModel(19, 20), ds, "acdc", tmp_path / "bad", CPU)
    empty = tmp_path / "empty"
    empty.mkdir()
    common.export_submission(ConvModel(), ds, "acdc", empty, CPU)
    assert (empty / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]   # no temporary sibling, no half export
