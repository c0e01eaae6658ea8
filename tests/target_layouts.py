"""Generated tiny ACDC, Dark Zurich, BDD100K, Mapillary Vistas and Cityscapes-test trees in their official on-disk
layouts, with the side files and distractor folders the real downloads hold (never downloaded)."""
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import LABEL_IDS, random_ids, write_rgb

TRAIN_IDS = [0, 1, 2, 8, 10, 11, 13, 255]            # road, sidewalk, building, vegetation, sky, person, car, void
MAPILLARY_IDS = [13, 24, 2, 15, 17, 47, 19, 21, 55, 58, 0, 65, 63]   # mapped ones, then unmapped (bird, unlabeled, ...)


def write_grey(path, array):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)


def write_jpeg(path, rng, h, w):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, quality=95)


def write_gt_side_files(folder, stem, train_ids):
    """The other files ACDC/Dark Zurich gt/ folders hold per image (label ids, colours, invalid masks)."""
    label_ids = np.zeros(256, dtype=np.uint8)
    label_ids[:19] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    write_grey(folder / f"{stem}_gt_labelIds.png", label_ids[train_ids])
    Image.fromarray(np.zeros((*train_ids.shape, 3), np.uint8)).save(folder / f"{stem}_gt_labelColor.png")
    write_grey(folder / f"{stem}_gt_invGray.png", (train_ids == 255) * 255)
    write_grey(folder / f"{stem}_gt_invIds.png", train_ids == 255)


ACDC_COUNTS = {"train": {"fog": 2, "night": 3, "rain": 2, "snow": 2},
               "val": {"fog": 1, "night": 2, "rain": 1, "snow": 1},
               "test": {"fog": 2, "night": 1, "rain": 1, "snow": 1}}


def make_acdc(root, h=18, w=32, layout="nested", counts=None, seed=5):
    """<root>/acdc: rgb_anon/<condition>/<split>/<seq>/<seq>_frame_<n>_rgb_anon.png, gt/<condition>/<split>/<seq>/
    <stem>_gt_labelTrainIds.png and side files, <split>_ref distractors; layout 'flat' = DAFormer's rsync result
    rgb_anon/<split>/*.png + gt/<split>/*_gt_labelTrainIds.png (and the test images likewise)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "acdc"
    for split, by_condition in (counts or ACDC_COUNTS).items():
        for ci, (condition, n) in enumerate(by_condition.items()):
            seq = f"GOPR04{ci}{len(split)}"
            nested = layout == "nested"
            for i in range(n):
                stem = f"{seq}_frame_{i * 7 + 1:06d}"
                img_dir = base / "rgb_anon" / condition / split / seq if nested else base / "rgb_anon" / split
                write_rgb(img_dir / f"{stem}_rgb_anon.png", rng, h, w)
                if nested:
                    ref = base / "rgb_anon" / condition / f"{split}_ref" / seq
                    write_rgb(ref / f"{stem}_rgb_ref_anon.png", rng, h, w)
                if split != "test":
                    ids = random_ids(rng, h, w, TRAIN_IDS)
                    gt_dir = base / "gt" / condition / split / seq if nested else base / "gt" / split
                    write_grey(gt_dir / f"{stem}_gt_labelTrainIds.png", ids)
                    if nested:
                        write_gt_side_files(gt_dir, stem, ids)
    return base


def make_dark_zurich(root, h=18, w=32, n_train=3, n_val=2, n_test=2, seed=6):
    """<root>/dark_zurich: rgb_anon/train/{night,twilight,day}/<seq>/, rgb_anon/val/night/GOPR0356/ with
    gt/val/night/GOPR0356/<stem>_gt_labelTrainIds.png and side files, rgb_anon/test/night/<seq>/, *_ref folders."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "dark_zurich"
    for split, n, seq in (("train", n_train, "GOPR0351"), ("val", n_val, "GOPR0356"), ("test", n_test, "GOPR0364")):
        for i in range(n):
            stem = f"{seq}_frame_{i + 1:06d}"
            write_rgb(base / "rgb_anon" / split / "night" / seq / f"{stem}_rgb_anon.png", rng, h, w)
            if split == "train":
                for other, other_seq in (("twilight", "GOPR0352"), ("day", "GOPR0345")):
                    folder = base / "rgb_anon" / "train" / other / other_seq
                    write_rgb(folder / f"{other_seq}_frame_{i:06d}_rgb_anon.png", rng, h, w)
            else:
                ref = base / "rgb_anon" / f"{split}_ref" / "day" / f"{seq}_ref"
                write_rgb(ref / f"{seq}_frame_{i:06d}_ref_rgb_anon.png", rng, h, w)
            if split == "val":
                ids = random_ids(rng, h, w, TRAIN_IDS)
                gt_dir = base / "gt" / "val" / "night" / seq
                write_grey(gt_dir / f"{stem}_gt_labelTrainIds.png", ids)
                write_gt_side_files(gt_dir, stem, ids)
    return base


def make_bdd100k(root, h=18, w=32, layout="10k", counts=(("train", 3), ("val", 2), ("test", 2)), seed=7):
    """<root>/bdd100k: images/10k/<split>/<stem>.jpg + labels/sem_seg/masks/<split>/<stem>.png (with the colormaps/
    beside), or layout 'legacy': images/<split>/<stem>.jpg + labels/<split>/<stem>_train_id.png."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "bdd100k"
    for split, n in counts:
        for i in range(n):
            stem = f"{7 * i + 1:08x}-{split[:2]}{i:06x}"
            img = base / "images" / ("10k" if layout == "10k" else "") / split / f"{stem}.jpg"
            write_jpeg(img, rng, h, w)
            if split == "test":
                continue
            ids = random_ids(rng, h, w, TRAIN_IDS)
            if layout == "10k":
                write_grey(base / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", ids)
                write_grey(base / "labels" / "sem_seg" / "colormaps" / split / f"{stem}.png", ids)
            else:
                write_grey(base / "labels" / split / f"{stem}_train_id.png", ids)
    return base


def write_mapillary_label(path, ids):
    im = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_mapillary(root, h=18, w=32, counts=(("training", 3), ("validation", 2), ("testing", 2)), seed=8):
    """<root>/mapillary: {training,validation,testing}/images/<key>.jpg, {training,validation}/labels/<key>.png
    (v1.2 palette PNGs of the 66 class ids) with a converted <key>_labelTrainIds.png beside each."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "mapillary"
    for folder, n in counts:
        for i in range(n):
            key = f"{folder[:3]}Key{i:03d}_x"
            write_jpeg(base / folder / "images" / f"{key}.jpg", rng, h, w)
            if folder != "testing":
                ids = random_ids(rng, h, w, MAPILLARY_IDS)
                write_mapillary_label(base / folder / "labels" / f"{key}.png", ids)
                write_grey(base / folder / "labels" / f"{key}_labelTrainIds.png", np.zeros((h, w)))
    (base / "config.json").write_text("{}")
    return base


def add_cityscapes_test(root, n=3, h=32, w=64, seed=9):
    """leftImg8bit/test/<city>/*_leftImg8bit.png beside make_cityscapes's train/val, and the gtFine/test files
    the download holds (ego-vehicle/border annotations only), which must not pair."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cityscapes"
    for i in range(n):
        city = ("berlin", "bonn")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        write_rgb(base / "leftImg8bit" / "test" / city / f"{stem}_leftImg8bit.png", rng, h, w)
        write_grey(base / "gtFine" / "test" / city / f"{stem}_gtFine_labelIds.png", random_ids(rng, h, w, LABEL_IDS))
    return base
