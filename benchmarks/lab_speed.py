"""CPU time per image of DLDM's online LAB source pipeline at GTA5's size (1914x1052), one thread.

Frames: a demo source scene (demo.py) drawn at 1914x1052 (bicubic) plus per-pixel Gaussian noise of each
--sigmas value (more noise = more distinct colours, the quantity the per-colour transfer scales with), and
uniform noise (every pixel its own colour: the worst case). For each frame: `dldm.lab_transfer` alone and a
whole `LabSourceDataset` item (PNG read, transfer, bicubic resize to 1280x720, label, normalisation: DLDM's
M_SL source stream), each --reps times; the median CPU seconds of this process (time.process_time, so
other jobs on a shared machine inflate it less than wall time) and images/s per core = 1 / that.
Run it in a checkout of the code to measure (the same file works on the code before the per-colour transfer).

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


def cpu_seconds(fn, reps):
    """Median CPU seconds of `fn()` over `reps` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 3, 10])
    p.add_argument("--size", type=int, nargs=2, default=[1914, 1052], metavar=("W", "H"), help="GTA5's frame size")
    p.add_argument("--resize", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"), help="DLDM's GTA5 resize")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ref_ids, ref_rgb = demo.draw_scene(np.random.default_rng(1), "target")
    stats = dldm.lab_stats(np.asarray(Image.fromarray(ref_rgb).resize((2048, 1024), Image.BICUBIC)))[None]
    print("| frame | distinct colours / pixels | transfer CPU ms | transfer img/s/core | item CPU ms | item img/s/core |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, rgb, ids in frames(args.sigmas, tuple(args.size)):
            root = Path(tmp) / name.replace(" ", "_")
            (root / "gta5" / "images").mkdir(parents=True)
            (root / "gta5" / "labels").mkdir(parents=True)
            Image.fromarray(rgb).save(root / "gta5" / "images" / "00001.png")
            demo.write_palette_png(root / "gta5" / "labels" / "00001.png", ids)
            data = dldm.LabSourceDataset("gta5", root / "gta5", resize=tuple(args.resize), interp="bicubic",
                                         norm="imagenet_bgr", ref_stats=stats, mode="online")
            transfer = cpu_seconds(lambda: dldm.lab_transfer(rgb, stats[0]), args.reps)
            item = cpu_seconds(lambda: data[(0, 0, -1)], args.reps)
            distinct = len(np.unique(rgb.reshape(-1, 3), axis=0))
            print(f"| {name} | {distinct / rgb[..., 0].size:.3f} | {transfer * 1e3:.0f} | {1 / transfer:.2f} "
                  f"| {item * 1e3:.0f} | {1 / item:.2f} |")


if __name__ == "__main__":
    main()
