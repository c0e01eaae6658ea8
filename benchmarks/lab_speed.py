"""CPU time per image of DLDM's online LAB source pipeline at GTA5's size (1914x1052), one thread, before and after.

Frames: a demo source scene (demo.py) drawn at 1914x1052 (bicubic) plus per-pixel Gaussian noise of each
--sigmas value (more noise = more distinct colours, the quantity the per-colour transfer scales with),
uniform noise (every pixel its own colour: the worst case), and any real frames given with --frame (their
item column uses an all-zero label of the frame's size). For each frame, in the same process, alternating
rep by rep: `per_pixel_transfer` (dldm.py's transfer before the per-colour change, commit 90919aa: every
step on every pixel) and `dldm.lab_transfer` (per distinct colour, reusing one ColourTables as a data
worker does), each alone and inside a whole `LabSourceDataset` item (PNG read, transfer, bicubic resize to
1280x720, label, normalisation: DLDM's M_SL source stream). Reports the median CPU seconds of this process
(time.process_time, so other jobs on a shared machine inflate it less than wall time), the speed-up in
images/s per core, and whether the two transfers gave the same uint8 image.

    OMP_NUM_THREADS=1 python benchmarks/lab_speed.py --reps 5
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import demo  # noqa: E402
import dldm  # noqa: E402


def per_pixel_transfer(rgb, stats):
    """The LAB transfer before the per-colour change (dldm.py at 90919aa): conversions, NumPy's mean(0)/std(0) and DDM's
    affine step on every pixel (rgb_to_lab and lab_to_rgb have not changed since)."""
    lab = dldm.rgb_to_lab(rgb[..., :3])
    flat = lab.reshape(-1, 3)
    lab = (lab - flat.mean(0)) / np.maximum(flat.std(0), 1e-8) * stats[3:] + stats[:3]
    return np.clip(dldm.lab_to_rgb(lab) * 255.0, 0, 255).astype(np.uint8)


def frames(sigmas, size, seed=0):
    """(name, uint8 image, label ids) of each benchmark frame, `size` = (W, H)."""
    rng = np.random.default_rng(seed)
    ids, rgb = demo.draw_scene(rng, "source")
    base = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC), np.float64)
    ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
    out = [(f"demo scene + noise sigma {s:g}",
            np.clip(base + rng.normal(0, s, base.shape), 0, 255).astype(np.uint8) if s else base.astype(np.uint8),
            ids) for s in sigmas]
    return out + [("uniform noise", rng.integers(0, 256, base.shape).astype(np.uint8), ids)]


def real_frames(paths):
    """(name, uint8 image, all-zero label ids) of each real frame file."""
    out = []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        out.append((f"real frame {Path(path).name} ({rgb.shape[1]}x{rgb.shape[0]})", rgb,
                    np.zeros(rgb.shape[:2], np.uint8)))
    return out


def cpu_seconds(fns, reps):
    """Median CPU seconds of each of `fns` over `reps` calls, alternating between them, after one untimed call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, spent in zip(fns, times):
            start = time.process_time()
            fn()
            spent.append(time.process_time() - start)
    return [statistics.median(spent) for spent in times]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 3, 10])
    p.add_argument("--size", type=int, nargs=2, default=[1914, 1052], metavar=("W", "H"), help="GTA5's frame size")
    p.add_argument("--frame", nargs="+", default=[], metavar="PNG",
                   help="real source frames to measure as well (e.g. a GTA5 image; none ships with this repository)")
    p.add_argument("--resize", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"), help="DLDM's GTA5 resize")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ref_ids, ref_rgb = demo.draw_scene(np.random.default_rng(1), "target")
    stats = dldm.lab_stats(np.asarray(Image.fromarray(ref_rgb).resize((2048, 1024), Image.BICUBIC)))[None]
    print("| frame | distinct colours / pixels | transfer CPU ms before | after | speed-up (img/s/core) "
          "| item CPU ms before | after | speed-up | uint8-equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    tables = dldm.ColourTables()
    with tempfile.TemporaryDirectory() as tmp:
        for name, rgb, ids in frames(args.sigmas, tuple(args.size)) + real_frames(args.frame):
            root = Path(tmp) / "".join(c if c.isalnum() else "_" for c in name)
            (root / "gta5" / "images").mkdir(parents=True)
            (root / "gta5" / "labels").mkdir(parents=True)
            Image.fromarray(rgb).save(root / "gta5" / "images" / "00001.png")
            demo.write_palette_png(root / "gta5" / "labels" / "00001.png", ids)
            new, old = [dldm.LabSourceDataset("gta5", root / "gta5", resize=tuple(args.resize), interp="bicubic",
                                              norm="imagenet_bgr", ref_stats=stats, mode="online") for _ in "ab"]
            old.transfer = lambda rgb, reference: per_pixel_transfer(rgb, stats[reference])
            before, after = cpu_seconds([lambda: per_pixel_transfer(rgb, stats[0]),
                                         lambda: dldm.lab_transfer(rgb, stats[0], tables)], args.reps)
            item_before, item_after = cpu_seconds([lambda: old[(0, 0, -1)], lambda: new[(0, 0, -1)]], args.reps)
            equal = np.array_equal(per_pixel_transfer(rgb, stats[0]), dldm.lab_transfer(rgb, stats[0], tables))
            distinct = len(np.unique(rgb.reshape(-1, 3), axis=0))
            print(f"| {name} | {distinct / rgb[..., 0].size:.3f} | {before * 1e3:.0f} | {after * 1e3:.0f} "
                  f"| {before / after:.1f}x | {item_before * 1e3:.0f} | {item_after * 1e3:.0f} "
                  f"| {item_before / item_after:.1f}x | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
