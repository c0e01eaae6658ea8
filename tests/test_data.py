"""Datasets in the official layouts, label maps, pipelines, splits, samplers, RCS."""
import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import IGNORE, DataError, SegmentationDataset, labeled_split
from conftest import make_cityscapes, make_gta5, make_synthia

TRAIN_OF_LABEL = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 0: IGNORE, 4: IGNORE}
TRAIN_OF_SYNTHIA = {3: 0, 4: 1, 2: 2, 6: 8, 1: 10, 10: 11, 8: 13, 0: IGNORE, 13: IGNORE}


def naive_map(ids, table):
    out = np.empty(ids.shape, dtype=np.uint8)
    for y in range(ids.shape[0]):
        for x in range(ids.shape[1]):
            out[y, x] = table[int(ids[y, x])]
    return out


def test_label_tables_cover_cityscapes_definition():
    assert common.LABELID_TO_TRAINID[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
                                     ].tolist() == list(range(19))
    others = [i for i in range(256) if i not in (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                                   31, 32, 33)]
    assert (common.LABELID_TO_TRAINID[others] == IGNORE).all()
    assert (common.LABELID_TO_TRAINID[common.TRAINID_TO_LABELID] == np.arange(19)).all()
    syn = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14,
           19: 15, 20: 16, 12: 17, 11: 18}
    assert all(common.SYNTHIA_TO_TRAINID[k] == v for k, v in syn.items())
    assert (common.SYNTHIA_TO_TRAINID[[0, 13, 14, 22]] == IGNORE).all()
    assert common.TRAINID_TO_16[[9, 14, 16]].tolist() == [IGNORE] * 3
    assert common.TRAINID_TO_16[[0, 8, 10, 15, 17, 18]].tolist() == [0, 8, 9, 13, 14, 15]
    assert common.TRAIN_IDS_13 == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def test_gta5_palette_label_map(tmp_path):
    root = make_gta5(tmp_path, mismatch=False)
    raw = np.asarray(Image.open(root / "labels" / "00001.png"))
    assert Image.open(root / "labels" / "00001.png").mode == "P"
    assert (common.read_label(root / "labels" / "00001.png", "gta5") == naive_map(raw, TRAIN_OF_LABEL)).all()


def test_gta5_size_mismatched_pair_follows_the_resize(tmp_path):
    root = make_gta5(tmp_path, n=2)  # the last pair has a label 4 px wider and 2 px taller
    ds = SegmentationDataset("gta5", root, resize=(20, 12), interp="bicubic")
    item = ds[1]
    assert item["image"].shape == (3, 12, 20) and item["label"].shape == (12, 20)
    raw = common.read_label(root / "labels" / "00002.png", "gta5")
    expect = np.asarray(Image.fromarray(raw).resize((20, 12), Image.NEAREST))
    assert (item["label"].numpy() == expect).all()
    # without a resize the label is brought to the image size
    assert SegmentationDataset("gta5", root)[1]["label"].shape == (24, 40)


def test_synthia_16bit_labels(tmp_path):
    root = make_synthia(tmp_path, n=1)
    path = root / "GT" / "LABELS" / "0000000.png"
    with Image.open(path) as im:  # what goes wrong with PIL: the 16-bit channels are truncated
        pil = np.asarray(im.convert("RGB"))
    got = common.read_label(path, "synthia")
    raw = common.read_png_unchanged(path)
    assert raw.dtype == np.uint16 and raw[1].max() > 255  # instance ids really are 16-bit
    expect = naive_map(raw[0], TRAIN_OF_SYNTHIA)
    assert (got == expect).all()
    assert not (common.SYNTHIA_TO_TRAINID[pil[..., 0]] == expect).all()
    ds16 = SegmentationDataset("synthia", root, num_classes=16)
    assert (ds16[0]["label"].numpy() == common.TRAINID_TO_16[expect]).all()


def test_synthia_wrong_encoding_is_a_clear_error(tmp_path):
    root = make_synthia(tmp_path, n=1)
    bad = root / "GT" / "LABELS" / "0000000.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(bad)  # 8-bit RGB: not a SYNTHIA label
    with pytest.raises(DataError, match="0000000.png: unexpected label encoding"):
        common.read_label(bad, "synthia")


@pytest.mark.parametrize("nested", [False, True])
def test_cityscapes_layouts_and_label_map(tmp_path, nested):
    base = make_cityscapes(tmp_path, nested=nested)
    ds = SegmentationDataset("cityscapes", base, split="train")
    assert len(ds) == 6  # the other gtFine files beside the labelIds are not orphans
    assert ds.stems() == sorted(ds.stems()) and ds.stems()[0] == "aachen_000000_000019"
    lab = ds.pairs[0][1]
    assert lab.name == "aachen_000000_000019_gtFine_labelIds.png"
    raw = np.asarray(Image.open(lab))
    assert (ds[0]["label"].numpy() == naive_map(raw, TRAIN_OF_LABEL)).all()
    assert len(SegmentationDataset("cityscapes", base, split="val")) == 2


def test_missing_and_orphan_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        SegmentationDataset("gta5", tmp_path / "nothing")
    root = make_gta5(tmp_path, n=2)
    (root / "labels" / "00002.png").unlink()
    with pytest.raises(DataError, match="00002.png: has no matching"):
        SegmentationDataset("gta5", root)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DataError, match="no image/label pairs"):
        SegmentationDataset("gta5", empty)


@pytest.mark.parametrize("norm,order,mean,std", [
    ("imagenet_bgr", [2, 1, 0], (104.00698793, 116.66876762, 122.67891434), (1, 1, 1)),
    ("cityscapes_bgr", [2, 1, 0], (73.15835921, 82.90891754, 72.39239876), (1, 1, 1)),
    ("imagenet_rgb", [0, 1, 2], (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
])
def test_pipeline_normalisation(tmp_path, norm, order, mean, std):
    base = make_cityscapes(tmp_path)
    ds = SegmentationDataset("cityscapes", base, resize=(32, 16), norm=norm)
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 32)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (16, 32)
    rgb = np.asarray(Image.open(ds.pairs[0][0]).convert("RGB").resize((32, 16), Image.BILINEAR)).astype(np.float32)
    for c in range(3):
        expect = (rgb[..., order[c]] - mean[c]) / std[c]
        assert np.allclose(item["image"][c].numpy(), expect, atol=1e-4)
    back = common.denormalise(item["image"][None], norm)[0].permute(1, 2, 0).numpy() * 255
    assert np.allclose(back, rgb, atol=1e-3)


def test_resize_interpolation_is_pil_antialiased(tmp_path):
    root = make_gta5(tmp_path, mismatch=False)
    ds = SegmentationDataset("gta5", root, resize=(10, 6), interp="bicubic", norm="imagenet_bgr")
    rgb = np.asarray(Image.open(ds.pairs[0][0]).convert("RGB").resize((10, 6), Image.BICUBIC)).astype(np.float32)
    assert np.allclose(ds[0]["image"][0].numpy(), rgb[..., 2] - 104.00698793, atol=1e-4)



def test_cv2_resize_is_mmcv_bilinear_without_antialiasing_and_floor_nearest():
    row = np.array([0, 100, 200, 250], dtype=np.uint8)
    rgb = np.repeat(np.repeat(row[None, :, None], 3, 2), 2, 0)                      # 2x4x3
    assert common.resize_image(rgb, (2, 2), "cv2")[0, :, 0].tolist() == [50, 225]   # half-pixel bilinear
    assert common.resize_image(rgb, (2, 2), "bilinear")[0, 0, 0] > 60               # PIL's antialiased filter
    label = np.arange(6, dtype=np.uint8)[None].repeat(2, 0)                          # 2x6
    assert common.resize_label(label, (4, 2), "cv2")[0].tolist() == [0, 1, 3, 4]     # floor(i * 1.5)
    assert common.resize_label(label, (4, 2), "bilinear")[0].tolist() == [0, 2, 3, 5]  # pixel centres

def test_keep_ratio_resize_matches_mmseg_rule():
    ds = SegmentationDataset.__new__(SegmentationDataset)
    ds.resize, ds.keep_ratio = (1280, 720), True
    assert ds.target_size(1914, 1052) == (1280, 704)
    assert ds.target_size(1280, 760) == (1280, 760) or ds.target_size(1280, 760) == (1213, 720)
    ds.resize = (1280, 760)
    assert ds.target_size(1280, 760) == (1280, 760) and ds.target_size(1914, 1052) == (1280, 704)
    assert ds.target_size(2048, 1024) == (1280, 640)


def test_random_crop_is_deterministic_in_the_seed_and_covers_offsets(tmp_path):
    base = make_cityscapes(tmp_path)
    ds = SegmentationDataset("cityscapes", base, resize=(32, 16), crop=(16, 16))
    a, b = ds[(0, 123, -1)], ds[(0, 123, -1)]
    assert torch.equal(a["image"], b["image"]) and a["label"].shape == (16, 16)
    full = SegmentationDataset("cityscapes", base, resize=(32, 16))[0]["image"]
    offsets = set()
    for s in range(200):
        img = ds[(0, s, -1)]["image"]
        offsets |= {x0 for x0 in range(17) if torch.equal(full[:, :, x0:x0 + 16], img)}
    assert offsets == set(range(17))  # x0 uniform over {0..W-w}, y0 = 0 (height already equals the crop)


def test_crop_larger_than_image_pads_with_ignore(tmp_path):
    base = make_cityscapes(tmp_path)
    item = SegmentationDataset("cityscapes", base, resize=(32, 16), crop=(20, 40))[(0, 1, -1)]
    assert item["image"].shape == (3, 20, 40)
    assert (item["label"][16:] == IGNORE).all() and (item["label"][:, 32:] == IGNORE).all()


def test_cat_max_ratio_rejects_single_class_crops(tmp_path):
    root = make_gta5(tmp_path, n=1, mismatch=False)
    lab = np.full((24, 40), 7, np.uint8)  # road on the left half ...
    lab[:, 20:] = 26  # ... car on the right half
    from conftest import write_palette
    write_palette(root / "labels" / "00001.png", lab)

    def accepted(y):  # mmseg's criterion: > 1 class and the largest under 75 %
        counts = np.bincount(y.ravel())
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    ds = SegmentationDataset("gta5", root, crop=(8, 16), cat_max_ratio=0.75)
    plain = SegmentationDataset("gta5", root, crop=(8, 16))
    n_ratio = sum(accepted(ds[(0, s, -1)]["label"].numpy()) for s in range(40))
    n_plain = sum(accepted(plain[(0, s, -1)]["label"].numpy()) for s in range(40))
    # one box passes with p = 7/25 (x0 in 9..15); up to 11 boxes: 1 - (18/25)^11 = 97 %
    assert n_ratio >= 35 and n_plain <= 20


def test_flip(tmp_path):
    base = make_cityscapes(tmp_path)
    plain = SegmentationDataset("cityscapes", base, resize=(32, 16))[0]
    ds = SegmentationDataset("cityscapes", base, resize=(32, 16), flip=True)
    flips = [torch.equal(ds[(0, s, -1)]["image"], plain["image"].flip(-1)) for s in range(40)]
    assert 5 < sum(flips) < 35
    assert all(f or torch.equal(ds[(0, s, -1)]["image"], plain["image"]) for s, f in enumerate(flips))


def test_split_deterministic_nested_and_reusable(tmp_path):
    stems = [f"city_{i:06d}_000019" for i in range(50)]
    a100, rest = labeled_split(stems[::-1], 10, seed=3)
    assert (a100, rest) == labeled_split(stems, 10, seed=3)
    assert set(a100) | set(rest) == set(stems) and not set(a100) & set(rest)
    assert set(labeled_split(stems, 5, seed=3)[0]) < set(a100) < set(labeled_split(stems, 20, seed=3)[0])
    assert labeled_split(stems, 10, seed=4)[0] != a100
    order = np.random.RandomState(3).permutation(50)
    assert a100 == sorted(stems[i] for i in order[:10])
    f = tmp_path / "split.txt"
    f.write_text("\n".join(a100) + "\n")
    assert labeled_split(stems, 0, split_file=f) == (a100, rest)
    with pytest.raises(DataError, match="--n-labeled 51"):
        labeled_split(stems, 51)
    f.write_text("nosuch_000000_000000\n")
    with pytest.raises(DataError, match="nosuch"):
        labeled_split(stems, 0, split_file=f)
    f.write_text(f"{a100[0]}\n{a100[1]}\n{a100[0]}\n")
    with pytest.raises(DataError, match=f"stem '{a100[0]}' is listed twice"):
        labeled_split(stems, 0, split_file=f)


def test_iteration_sampler_depends_on_seed_and_iteration_only():
    s = common.IterationSampler(7, 2, seed=5, stream=1, num_iters=20)
    batches = list(s)
    resumed = list(common.IterationSampler(7, 2, seed=5, stream=1, start_iter=13, num_iters=20))
    assert batches[13:] == resumed
    # each epoch of 7 positions is a permutation
    idx = [i for b in batches for i, _, _ in b]
    assert sorted(idx[:7]) == list(range(7)) and sorted(idx[7:14]) == list(range(7))
    assert list(common.IterationSampler(7, 2, seed=6, stream=1, num_iters=20)) != batches
    assert list(common.IterationSampler(7, 2, seed=5, stream=2, num_iters=20)) != batches


def test_rcs_probabilities_and_sampler():
    counts = [{0: 9000, 1: 100}, {0: 8000, 5: 4000}, {0: 7000, 5: 3500, 17: 3001}]
    classes, prob, images_with = common.rcs_probabilities(counts, 19)
    total = np.array([24000, 100, 7500, 3001], float)
    f = total / total.sum()
    expect = np.exp((1 - f) / 0.01)
    expect = expect[[0, 2, 3]] / expect[[0, 2, 3]].sum()  # class 1 has no image above 3000 px: dropped
    assert classes == [0, 5, 17]
    assert np.allclose(prob, expect)
    assert images_with == {0: [0, 1, 2], 5: [1, 2], 17: [2]}
    sampler = common.RareClassSampler(counts, 19, batch_size=2, seed=0, stream=0, num_iters=400)
    draws = [(i, c) for b in sampler for i, _, c in b]
    assert all(i in images_with[c] for i, c in draws)
    freq17 = np.mean([c == 17 for _, c in draws])
    assert abs(freq17 - prob[2]) < 0.05
    assert list(common.RareClassSampler(counts, 19, 2, 0, 0, start_iter=5, num_iters=9)) == \
        [sampler.batch(i) for i in range(5, 9)]


def test_rcs_statistics_and_retry(tmp_path):
    root = make_gta5(tmp_path, n=2, mismatch=False)
    ds = SegmentationDataset("gta5", root, crop=(8, 8), rcs_min_crop_pixels=20)
    counts = common.rcs_statistics(ds, cache=tmp_path / "rcs.json")
    lab = common.read_label(ds.pairs[0][1], "gta5")
    assert counts[0] == {c: int((lab == c).sum()) for c in np.unique(lab) if c != IGNORE}
    assert common.rcs_statistics(ds, cache=tmp_path / "rcs.json") == counts
    assert common.rcs_statistics(ds, workers=2) == counts          # the same counts from worker processes
    from conftest import write_palette
    lab = np.full((24, 40), 7, np.uint8)
    lab[:, 32:] = 26  # car in the right 8 columns: a plain 8x8 crop holds > 20 car pixels w.p. 6/33
    write_palette(root / "labels" / "00001.png", lab)
    hits = sum((ds[(0, s, 13)]["label"] == 13).sum().item() > 20 for s in range(40))
    plain = sum((ds[(0, s, -1)]["label"] == 13).sum().item() > 20 for s in range(40))
    assert hits >= 28 and plain <= 16  # up to 10 crops on the same image: 1 - (27/33)^10 = 87 %


def test_damaged_or_misplaced_files_stop_a_run_before_it_writes(tmp_path):
    """A val label in the wrong encoding (found only at the final evaluation before) or a train image that is
    not an image: the datasets refuse them when built, from the files' headers, before any output exists."""
    import dacs
    root = tmp_path / "data"
    make_gta5(root)
    make_cityscapes(root)
    argv = ["--iters", "1", "--layers", "1", "1", "1", "1", "--width", "16", "--init", "none", "--source-size", "64",
            "32", "--target-size", "64", "32", "--crop-size", "32", "32", "--workers", "0", "--device", "cpu",
            "--data-root", str(root), "--out-dir", str(tmp_path / "run")]
    val_label = sorted((root / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    Image.fromarray(np.asarray(Image.open(val_label))).convert("P").save(val_label)      # palette, not grey
    with pytest.raises(DataError, match=rf"{val_label.name}: unexpected label encoding \(bit depth 8, colour type 3\)"):
        dacs.main(argv)
    assert not (tmp_path / "run").exists()
    make_cityscapes(root)                                                                  # repaired
    train_label = sorted((root / "cityscapes" / "gtFine" / "train").rglob("*_labelIds.png"))[2]
    Image.open(train_label).resize((32, 16), Image.NEAREST).save(train_label)             # not its image's 64x32
    with pytest.raises(DataError, match=rf"{train_label.name}: a 32x16 label for the 64x32 image .*same size"):
        dacs.main(argv)
    make_cityscapes(root)
    image = sorted((root / "gta5" / "images").glob("*.png"))[1]
    image.write_text("not an image")
    with pytest.raises(DataError, match=rf"{image.name}: unreadable image \(expected a PNG or JPEG file\)"):
        dacs.main(argv)
    assert not (tmp_path / "run").exists()
