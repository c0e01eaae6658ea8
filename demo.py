"""The built-in demo dataset: procedural street scenes with a domain gap, in the real on-disk layouts.

`ensure_demo(data_root)` writes, once and deterministically, under `<data_root>/demo/`:
- `gta5/images/*.png`, `gta5/labels/*.png` (palette PNG of Cityscapes label ids): the *source* domain —
  flat, saturated colours, bright daylight, many buses and trucks, few pedestrians;
- `cityscapes/leftImg8bit/{train,val}/<city>/...`, `cityscapes/gtFine/{train,val}/<city>/..._labelIds.png`:
  the *target* domain — the same class colours faded (less saturated, darker), bluer light, textured
  surfaces, sensor noise, more cars, riders and pedestrians, fewer buses.
Both share the scene structure the methods exploit: sky above a horizon, buildings and vegetation along
it, a road below with sidewalks at its sides, cars and buses on the road, riders on bicycles and
motorcycles, pedestrians on the sidewalks, poles carrying traffic signs and lights.
The same dataset classes read it as read the real data (`python common.py check-data --data-root
<data_root>/demo` works on it). `python demo.py --data-root DIR` writes it without training anything.

`ensure_demo_init(...)` plays the part of the papers' ImageNet/COCO pretraining for `--init demo`: the
demo network trained once, supervised, on the demo *source*, saved without its classifier (as the
papers' init files, whose classifiers never fit), cached under `<data_root>/demo/` by a digest of this
file, the network's code and the recipe, so that a change to either rebuilds it.
"""
import argparse
import hashlib
import inspect
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = "2"
INIT_RECIPE = {"iters": 150, "batch_size": 4, "lr": 1e-3, "seed": 0}  # Adam, whole 128x64 source images
SIZE = (64, 128)  # H, W of every demo image
COUNTS = {"source": 160, "train": 120, "val": 40}
CITIES = {"train": ("demoville", "synthburg"), "val": ("testtown",)}

# label ids (Cityscapes encoding)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = 7, 8, 11, 12, 13, 17, 19, 20, \
    21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = 24, 25, 26, 27, 28, 31, 32, 33

# class colours (RGB) of the source domain
SOURCE_COLOURS = {ROAD: (90, 90, 100), SIDEWALK: (200, 170, 190), BUILDING: (150, 110, 80), WALL: (180, 180, 140),
                  FENCE: (160, 140, 120), POLE: (230, 230, 230), LIGHT: (250, 200, 0), SIGN: (250, 250, 40),
                  VEGETATION: (40, 170, 40), TERRAIN: (150, 210, 90), SKY: (90, 170, 250), PERSON: (240, 30, 60),
                  RIDER: (250, 110, 0), CAR: (30, 40, 220), TRUCK: (20, 90, 140), BUS: (20, 140, 160),
                  TRAIN: (60, 120, 120), MOTORCYCLE: (120, 30, 250), BICYCLE: (160, 30, 80)}


def faded_palette(palette, saturation=0.45, gain=0.85):
    """The target's class colours: the source's, with their saturation and brightness reduced. Each class
    keeps its hue, as a real car still looks like a car in another city; the source's colour boundaries
    no longer fit, which is the gap adaptation closes."""
    faded = {}
    for cls, rgb in palette.items():
        grey = sum(rgb) / 3
        faded[cls] = tuple(int(gain * (grey + saturation * (c - grey))) for c in rgb)
    return faded


# per-domain class colours and scene statistics
DOMAINS = {
    "source": {
        "colour": SOURCE_COLOURS,
        "light": (1.1, 1.05, 1.0), "noise": 4.0, "texture": 0.0,
        "n_cars": (0, 3), "n_buses": (0, 2), "n_trucks": (0, 2), "n_people": (0, 2), "n_riders": (0, 1),
        "n_poles": (1, 3), "vegetation": 0.3,
    },
    "target": {
        "colour": faded_palette(SOURCE_COLOURS),
        "light": (0.85, 0.9, 1.05), "noise": 10.0, "texture": 18.0,
        "n_cars": (1, 5), "n_buses": (0, 1), "n_trucks": (0, 1), "n_people": (1, 4), "n_riders": (0, 3),
        "n_poles": (1, 4), "vegetation": 0.6,
    },
}


def draw_scene(rng, domain):
    """One (label-id map, RGB image) pair of the given domain."""
    h, w = SIZE
    cfg = DOMAINS[domain]
    lab = np.full((h, w), SKY, np.uint8)
    horizon = int(h * rng.uniform(0.38, 0.5))
    # buildings / vegetation along the horizon
    x = 0
    while x < w:
        bw = int(rng.integers(8, 24))
        top = int(horizon - rng.integers(4, horizon - 2))
        lab[top:horizon, x:x + bw] = VEGETATION if rng.random() < cfg["vegetation"] else BUILDING
        x += bw
    lab[horizon - 3:horizon, :] = np.where(rng.random(w) < 0.3, FENCE, lab[horizon - 3:horizon, :])
    # road trapezoid and sidewalks below the horizon
    ys, xs = np.mgrid[0:h, 0:w]
    centre = w / 2 + rng.uniform(-10, 10)
    half = 4 + (ys - horizon) * rng.uniform(0.9, 1.3)
    below = ys >= horizon
    lab[below] = SIDEWALK
    lab[below & (np.abs(xs - centre) < half)] = ROAD
    lab[below & (np.abs(xs - centre) > half + (ys - horizon) * 0.8)] = TERRAIN
    # poles with signs / lights on the sidewalks
    for _ in range(int(rng.integers(*cfg["n_poles"]) + 1)):
        px = int(rng.choice([rng.integers(2, max(int(centre - 20), 3)), rng.integers(min(int(centre + 20), w - 3),
                                                                                      w - 2)]))
        bottom = int(rng.integers(horizon + 4, h))
        top = max(int(bottom - rng.integers(18, 30)), 1)
        lab[top:bottom, px:px + 1] = POLE
        lab[top:top + 3, px - 1:px + 2] = LIGHT if rng.random() < 0.5 else SIGN
    # vehicles on the road (larger when nearer), riders on two-wheelers, pedestrians on the sidewalks

    def put(cls, cx, base, vw, vh):
        x0, x1 = int(max(cx - vw / 2, 0)), int(min(cx + vw / 2, w))
        y0 = int(max(base - vh, 0))
        lab[y0:base, x0:x1] = cls

    for cls, key, aspect, size in ((BUS, "n_buses", 1.1, 0.55), (TRUCK, "n_trucks", 1.0, 0.45),
                                   (CAR, "n_cars", 0.55, 0.45)):
        for _ in range(int(rng.integers(*cfg[key]) + 1)):
            base = int(rng.integers(horizon + 4, h))
            depth = (base - horizon) / (h - horizon)
            vw = 6 + 40 * depth * size
            put(cls, centre + rng.uniform(-1, 1) * half[base - 1, 0] * 0.7, base, vw, vw * aspect)
    for _ in range(int(rng.integers(*cfg["n_riders"]) + 1)):
        base = int(rng.integers(horizon + 6, h))
        depth = (base - horizon) / (h - horizon)
        cx = centre + rng.uniform(-1, 1) * half[base - 1, 0] * 0.8
        vw = 4 + 10 * depth
        put(MOTORCYCLE if rng.random() < 0.5 else BICYCLE, cx, base, vw, vw * 0.6)
        put(RIDER, cx, int(base - vw * 0.6), vw * 0.5, vw * 0.9)
    for _ in range(int(rng.integers(*cfg["n_people"]) + 1)):
        base = int(rng.integers(horizon + 3, h))
        depth = (base - horizon) / (h - horizon)
        side = rng.choice([-1, 1])
        cx = centre + side * (half[base - 1, 0] + 3 + rng.uniform(0, 10))
        put(PERSON, cx, base, 2 + 4 * depth, 6 + 14 * depth)
    return lab, render(rng, lab, cfg)


def render(rng, lab, cfg):
    """Colour a label map with the domain's palette, lighting, texture and noise."""
    h, w = lab.shape
    lut = np.zeros((256, 3), np.float32)
    for cls, col in cfg["colour"].items():
        lut[cls] = col
    img = lut[lab] + rng.normal(0, 12, size=(256, 3)).astype(np.float32)[lab]  # per-class shade of this scene
    if cfg["texture"]:
        ys, xs = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 2 * np.pi, 256)[lab]
        img += cfg["texture"] * np.sin(xs * 0.9 + ys * 0.4 + phase)[..., None]
    img *= np.asarray(cfg["light"], np.float32) * rng.uniform(0.85, 1.15)
    img += rng.normal(0, cfg["noise"], size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_palette_png(path, ids):
    """Label ids as an 8-bit palette PNG (the GTA5 encoding), coloured like GTA5's files."""
    im = Image.fromarray(ids, mode="P")
    palette = np.zeros((256, 3), np.uint8)
    for cls, col in SOURCE_COLOURS.items():
        palette[cls] = col
    im.putpalette(palette.ravel().tolist())
    im.save(path)


def generate(root, seed=0):
    """Write the whole demo tree under root (a folder that must not exist yet)."""
    for i in range(COUNTS["source"]):
        lab, img = draw_scene(np.random.default_rng([seed, 0, i]), "source")
        for sub in ("images", "labels"):
            (root / "gta5" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "gta5" / "images" / f"{i + 1:05d}.png")
        write_palette_png(root / "gta5" / "labels" / f"{i + 1:05d}.png", lab)
    for s, split in enumerate(("train", "val")):
        for i in range(COUNTS[split]):
            lab, img = draw_scene(np.random.default_rng([seed, 1 + s, i]), "target")
            city = CITIES[split][i % len(CITIES[split])]
            stem = f"{city}_{i:06d}_000019"
            img_dir = root / "cityscapes" / "leftImg8bit" / split / city
            lab_dir = root / "cityscapes" / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(lab, mode="L").save(lab_dir / f"{stem}_gtFine_labelIds.png")


def ensure_demo(data_root, seed=0):
    """The demo root (`<data_root>/demo`), generated once; a partial earlier attempt is replaced."""
    root = Path(data_root) / "demo"
    if (root / f".complete-v{VERSION}").is_file():
        return root
    tmp = Path(data_root) / f".demo.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, seed)
    (tmp / f".complete-v{VERSION}").write_text("demo dataset, generated by demo.py\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def ensure_demo_init(data_root, layers, style, norm, width=64):
    """Path of the demo init for this network (Bottlenecks per stage, stride style, input normalisation,
    first-stage width), trained on the demo source on first use and cached by digest."""
    import torch
    import common
    recipe = {**INIT_RECIPE, "layers": list(layers), "style": style, "norm": norm, "width": width}
    iters = recipe["iters"]
    code = inspect.getsource(common.Bottleneck) + inspect.getsource(common.ClassifierModule) + \
        inspect.getsource(common.DeepLabV2) + Path(__file__).read_text()
    digest = hashlib.sha256((json.dumps(recipe, sort_keys=True) + code).encode()).hexdigest()[:12]
    path = ensure_demo(data_root) / f"init_{digest}.pth"
    if path.is_file():
        return path
    t0 = time.time()
    print(f"building the demo init (once): {iters} iterations on the demo source -> {path}", flush=True)
    torch.manual_seed(recipe["seed"])
    model = common.DeepLabV2(19, style=style, layers=layers, width=width)
    source = common.SegmentationDataset("gta5", path.parent / "gta5", norm=norm)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe["lr"])
    for items in common.IterationSampler(len(source), recipe["batch_size"], recipe["seed"], 0, 0, iters):
        batch = torch.utils.data.default_collate([source[it] for it in items])
        x, y = batch["image"], batch["label"]
        loss = common.ce_loss(common.upsample(model(x), y.shape[1:]), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("layer5.")}
    with common.atomic_path(path) as tmp:
        torch.save(backbone, tmp)
    print(f"demo init built in {time.time() - t0:.0f} s", flush=True)
    return path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the demo dataset under <data-root>/demo.")
    parser.add_argument("--data-root", default="./data", help="parent folder (default ./data)")
    print(ensure_demo(parser.parse_args().data_root))
