"""Training-step speed and peak GPU memory of each method at paper settings, with and without --amp.

Demo scenes are upscaled to the real resolutions (GTA5 1914x1052, Cityscapes 2048x1024) and written in
the real layouts under <data-root>/bench; each script then runs at its paper defaults (512x512 crops or
ClassMix's 1024x512 images, batch 2 per stream, full DeepLabv2-ResNet-101, random init: no download)
for --iters iterations. it/s is measured over the second half (after cudnn's warm-up), peak memory is
torch.cuda.max_memory_allocated.

    python benchmarks/gpu_step.py [--data-root ./data] [--iters 100] [--out benchmarks/gpu_step.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402

RUNS = {  # script: extra arguments (paper settings otherwise)
    "dacs.py": ["--source", "gta5"],
    "classmix_ssl.py": ["--dataset", "cityscapes", "--n-labeled", "4"],
    "iidm.py": ["--source", "gta5", "--n-labeled", "4"],
}


def write_bench_data(data_root):
    """8 GTA5 pairs at 1914x1052, 8 train + 2 val Cityscapes pairs at 2048x1024 (upscaled demo scenes)."""
    src = demo.ensure_demo(data_root)
    out = Path(data_root) / "bench"
    if (out / ".complete").is_file():
        return out
    for i, (img, lab) in enumerate(zip(sorted((src / "gta5" / "images").glob("*.png"))[:8],
                                       sorted((src / "gta5" / "labels").glob("*.png"))[:8])):
        for path, kind, dst in ((img, Image.BILINEAR, "images"), (lab, Image.NEAREST, "labels")):
            (out / "gta5" / dst).mkdir(parents=True, exist_ok=True)
            Image.open(path).resize((1914, 1052), kind).save(out / "gta5" / dst / path.name)
    for split, n in (("train", 8), ("val", 2)):
        images = sorted((src / "cityscapes" / "leftImg8bit" / split).rglob("*.png"))[:n]
        for img in images:
            city, stem = img.parent.name, img.name.replace("_leftImg8bit.png", "")
            lab = src / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            for path, kind, sub in ((img, Image.BILINEAR, "leftImg8bit"), (lab, Image.NEAREST, "gtFine")):
                d = out / "cityscapes" / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(Image.open(path).resize((2048, 1024), kind))).save(d / path.name)
    (out / ".complete").write_text("benchmark data\n")
    return out


def run(script, extra, bench, iters, amp, device, layers, workers):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / script), *extra, "--gta5-root", str(bench / "gta5"),
               "--cityscapes-root", str(bench / "cityscapes"), "--init", "none", "--iters", str(iters),
               "--log-every", str(max(iters // 2, 1)), "--eval-every", "0", "--device", device,
               "--workers", str(workers), "--out-dir", tmp, "--amp" if amp else "--no-amp", "--layers", *layers]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        last = json.loads((Path(tmp) / "log.jsonl").read_text().splitlines()[-1])
    return {"it_per_s": last["it_per_s"], "max_mem_gb": last.get("max_mem_gb")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="./data")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", nargs=4, default=["3", "4", "23", "3"], help="3 4 23 3 = ResNet-101")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--scripts", nargs="+", default=list(RUNS))
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args()
    bench = write_bench_data(args.data_root)
    results = {}
    for script in args.scripts:
        for amp in (False, True):
            r = run(script, RUNS[script], bench, args.iters, amp, args.device, args.layers, args.workers)
            results[f"{script} {'amp' if amp else 'fp32'}"] = r
            print(f"{script:16s} {'amp ' if amp else 'fp32'}  {r['it_per_s']:.2f} it/s  peak {r['max_mem_gb']} GiB",
                  flush=True)
        results[f"{script} speed-up"] = results[f"{script} amp"]["it_per_s"] / results[f"{script} fp32"]["it_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
