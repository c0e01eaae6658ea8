"""Domain gap of the demo dataset: plain supervised training on the source vs on the target, scored on
the target val split (the demos' light DeepLabv2: `--layers 1 1 1 1 --width 32`; random init, Adam 1e-3,
batch 4, 150 iterations, CPU).

    python benchmarks/demo_gap.py [--data-root ./data] [--iters 150] [--width 32] [--threads 2]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import demo  # noqa: E402


def train_and_score(train, val, iters, width, seed=0):
    common.seed_everything(seed)
    model = common.DeepLabV2(layers=(1, 1, 1, 1), width=width)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.time()
    for items in common.IterationSampler(len(train), 4, seed, 0, 0, iters):
        batch = torch.utils.data.default_collate([train[it] for it in items])
        y = batch["label"]
        loss = common.ce_loss(common.upsample(model(batch["image"]), y.shape[1:]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"s_per_it": (time.time() - t0) / iters,
            "target_val_mIoU": common.evaluate(model, val, torch.device("cpu"))["mIoU"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="./data")
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = demo.ensure_demo(args.data_root)
    val = common.SegmentationDataset("cityscapes", root / "cityscapes", split="val")
    result = {name: train_and_score(common.SegmentationDataset(kind, root / kind), val, args.iters, args.width)
              for name, kind in (("source_only", "gta5"), ("target_supervised", "cityscapes"))}
    print(json.dumps(result, indent=1))
