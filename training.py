"""Run machinery shared by the six method scripts: device and AMP, multi-GPU (torchrun + DDP),
logging with divergence guards, stop signals, RNG states and checkpoints, the shared command line, the
run folder (lock, config, resume), evaluation during training, the data loaders' loop, and the one-line
`error:` exit. The science (model, data, mixing, losses, schedules, EMA, evaluation) is in common.py.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import common
from common import DataError


# ======================================================================================
# Device and multi-GPU
# ======================================================================================

def select_device(name):
    """--device auto|cuda|cpu -> torch.device (DataError when cuda is asked for but absent); on CUDA,
    cudnn picks the fastest kernels as in the authors' scripts (cudnn.benchmark)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


# Multi-GPU: torchrun + DistributedDataParallel (README 'Multi-GPU'). Every script keeps the raw model
# for EMA, state_dict, checkpoints and evaluation and uses the DDP wrapper for its training forwards only.

SYNC_BN_DEVICES = ("cuda",)  # torch.nn.SyncBatchNorm has no CPU kernels (batch_norm_stats)


def distributed(device_name):
    """(Dist, device). Without torchrun's RANK/WORLD_SIZE/LOCAL_RANK: no process group, select_device as
    always. Under torchrun: cuda:LOCAL_RANK (or the CPU), one process group (NCCL on CUDA, gloo on the
    CPU) destroyed at exit, and a gloo group for CPU-side agreements."""
    if "RANK" not in os.environ:
        return common.Dist(), select_device(device_name)
    import atexit
    import torch.distributed as td
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(td.destroy_process_group)
    group = td.new_group(backend="gloo") if device.type == "cuda" else td.group.WORLD
    return common.Dist(rank, world, local, group), device


def apply_world(args, dist, device, pairs_within_batch=False):
    """Resolve the batch, learning rate and length of a K-process run (--global-batch, --scale-lr,
    --scale-iters, --sync-bn) into `args` and say them on rank 0; nothing changes in one process.
    `pairs_within_batch`: the method pairs image k with k+1 of a batch (ClassMix), so a rank needs two."""
    if dist.world == 1:
        return
    k = dist.world
    if args.demo:
        raise DataError("--demo runs in one process (its baselines reuse the process): launch it without torchrun")
    if args.sync_bn and device.type not in SYNC_BN_DEVICES:
        raise DataError(f"--sync-bn: torch.nn.SyncBatchNorm runs on CUDA devices only (this run is on {device.type})")
    if args.global_batch == "paper":
        if args.scale_lr or args.scale_iters:
            raise DataError("--scale-lr/--scale-iters scale with a K times larger global batch; with "
                            "--global-batch paper the global batch is the paper's")
        if args.batch_size % k or args.batch_size // k < (2 if pairs_within_batch else 1):
            need = "an even share of at least 2 per process (ClassMix pairs image k with k+1)" if pairs_within_batch \
                else "a multiple of the process count"
            raise DataError(f"--global-batch paper: --batch-size {args.batch_size} over {k} processes; expected {need}")
        args.batch_size //= k
    if args.scale_lr:
        for name in ("lr", "lr_d"):
            if getattr(args, name, None):
                setattr(args, name, getattr(args, name) * k)
    if args.scale_iters:
        for name in ("iters", "poly_iters", "warmup_iters", "rampup_iters"):   # lengths in iterations
            if getattr(args, name, None):
                setattr(args, name, math.ceil(getattr(args, name) / k))
    if dist.main:
        print(f"torchrun: {k} processes, batch {args.batch_size} per process per stream (global "
              f"{args.batch_size * k}), lr {args.lr:g}, iters {args.iters}, "
              f"{'SyncBatchNorm' if args.sync_bn else 'BatchNorm statistics per process'}", flush=True)


def ddp(model, dist, device, sync_bn=False, find_unused=False):
    """The training forward of `model`: DistributedDataParallel under torchrun (BN -> SyncBatchNorm with
    `sync_bn`, in place), the model itself in one process. `find_unused`: the script's passes leave some
    parameters without gradient (DLDM's student reads the main head only); the two-branch ASPP
    (docs/quirks.md Q1) is detected here. Otherwise DDP skips its per-backward search for unused parameters."""
    if dist.world == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused or has_unused_aspp(model),
                                               gradient_as_bucket_view=True)


def has_unused_aspp(model):
    """True when `model` holds the official two-branch ASPP, whose dilation-18/24 convs never get a gradient."""
    return any(isinstance(m, common.ClassifierModule) and not m.full for m in model.modules())


def barrier(dist):
    """Wait for every process (no-op in one process)."""
    if dist.world > 1:
        torch.distributed.barrier(group=dist.group)


@contextlib.contextmanager
def main_first(dist):
    """Run the block on rank 0 first (it writes a cache), then on the other ranks (they read the cache)."""
    if not dist.main:
        barrier(dist)
    yield
    if dist.main:
        barrier(dist)


def agree(dist, value, op="max"):
    """An integer agreed by all processes (max or sum over ranks) through the CPU group."""
    if dist.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op.upper()), group=dist.group)
    return int(t)


# ======================================================================================
# AMP, logging with divergence guards, stop signals, RNG states, checkpoints
# ======================================================================================

class Amp:
    """autocast behind one switch (`dtype` auto: bf16 where supported, else fp16 with a GradScaler); off = fp32.

    On the CPU auto is bf16 (what lets the tests run the AMP code path without a GPU); `--amp-dtype fp16` runs
    the GradScaler path on any device.
    """

    def __init__(self, device, enabled, dtype="auto"):
        self.enabled, self.device_type = enabled, device.type
        if dtype == "auto":
            dtype = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss, retain_graph=False):
        self.scaler.scale(loss).backward(retain_graph=retain_graph)

    def step(self, *optimizers):
        """Step each optimiser (under fp16: unscaled, skipped on inf/NaN gradients), then update the scale once."""
        if not self.scaler.is_enabled():
            for optimizer in optimizers:
                optimizer.step()
            return
        views = [OncePerTensor(o) for o in optimizers]  # kept alive until update(): the scaler keys them by id
        for view in views:
            self.scaler.step(view)
        self.scaler.update()


class OncePerTensor:
    """An optimiser as GradScaler sees it: each tensor once. GradScaler.unscale_ divides the gradient once per
    param-group entry, so the authors' duplicated 1x group (docs/quirks.md Q4) would be unscaled up to 4 times
    and the backbone would barely move; `step` is the optimiser's own, duplicates included."""

    def __init__(self, optimizer):
        self.step = optimizer.step
        self.param_groups = [{"params": list(dict.fromkeys(p for g in optimizer.param_groups for p in g["params"]))}]


def initialise(model, init, norm="imagenet_bgr", data_root="./data"):
    """common.initialise, with `--init demo` = the demo's stand-in pretraining for this network and `norm`
    (demo.ensure_demo_init: trained once on the demo source, cached under <data-root>/demo)."""
    if init == "demo":
        import demo
        layers = [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
        init = str(demo.ensure_demo_init(data_root, layers, model.style, norm, model.conv1.out_channels))
    return common.initialise(model, init)


def prepare_model(model, device, amp):
    """Move to device; channels_last with AMP."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if amp.enabled else model


NEVER = 2 ** 62  # "no non-finite loss yet" in the ranks' agreement on the divergence guard


class Diverged(Exception):
    """A non-finite loss or weight: the run stops with exit 3 and keeps its last good checkpoint."""


class Logger:
    """Console line every `every` iterations, log.jsonl, TensorBoard if installed; losses stay on device.

    it/s is measured over the last log window; on CUDA the record also holds the peak GPU memory. The
    divergence guard notes, on the device, the first iteration at which each loss is not finite and raises
    `Diverged` at the next log step (no host sync in between). Under torchrun only rank 0 writes (its own
    losses); the ranks agree on the guard at each log step (a NaN loss on one rank reaches the others only
    through the averaged gradients), so all stop together with exit 3.
    """

    def __init__(self, out_dir, every, max_iter, start_iter=0, dist=common.Dist()):
        import time
        self.path, self.every, self.max_iter = Path(out_dir) / "log.jsonl", every, max_iter
        self.dist, self.main = dist, dist.main
        self.sums, self.count, self.clock = {}, 0, time.time
        self.first_bad = {}  # loss name -> (iteration, value) of its first non-finite value, on the device
        self.t0, self.i0 = self.clock(), start_iter
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir)) if self.main else None
        except Exception:  # TensorBoard is optional
            pass

    def log(self, i, losses, lr):
        """Accumulate this iteration's losses (one stacked vector); at a log step, write the means (one sync)."""
        names = tuple(losses)
        v = torch.stack([t.detach().float().mean() for t in losses.values()])
        self.sums[names] = self.sums.get(names, 0) + v
        it, val = self.first_bad.get(names, (torch.full_like(v, -1), v))
        new = ~torch.isfinite(v) & (it < 0)
        self.first_bad[names] = torch.where(new, i + 1, it), torch.where(new, v, val)
        self.count += 1
        if not is_due(i, self.every, self.max_iter):
            return
        self.check_finite()
        if not self.main:
            self.sums, self.count = {}, 0
            return
        values = {}
        for k, total in zip([k for names in self.sums for k in names], torch.cat(list(self.sums.values())).tolist()):
            values[k] = values.get(k, 0) + total / self.count
        now = self.clock()
        rate = (i + 1 - self.i0) / max(now - self.t0, 1e-9)
        rec = {"iteration": i + 1, **values, "lr": lr, "it_per_s": rate, "eta_s": (self.max_iter - i - 1) / rate}
        if torch.cuda.is_available():
            rec["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"it {i + 1}/{self.max_iter} " + " ".join(f"{k} {rec[k]:.4f}" for k in values)
              + f" lr {lr:.3g} {rate:.2f} it/s eta {rec['eta_s'] / 60:.1f} min", flush=True)
        if self.tb is not None:
            for k in values:
                self.tb.add_scalar(k, rec[k], i + 1)
        self.sums, self.count, self.t0, self.i0 = {}, 0, now, i + 1

    def check_finite(self):
        """Raise Diverged naming the first non-finite loss seen so far on any rank (one host sync)."""
        bad = []
        if self.first_bad:
            its, vals = torch.cat([torch.stack(pair) for pair in self.first_bad.values()], 1).tolist()
            names = [k for names in self.first_bad for k in names]
            bad = [(int(it), k, val) for k, it, val in zip(names, its, vals) if it >= 0]
        first = agree(self.dist, min(bad)[0] if bad else NEVER, "min")
        if first == NEVER:
            return
        mine = min(bad) if bad else None
        what = f"{mine[1]} is {mine[2]}" if mine and mine[0] == first else "a loss is not finite on another process"
        raise Diverged(f"iteration {first}: {what}; training stopped, the last checkpoint "
                       f"written before it is kept (continue from it with --resume auto)")


class StopSignals:
    """SIGTERM / SIGINT (a cluster's preemption, Ctrl-C) set a flag instead of killing the run: the loop
    finishes its iteration, writes a checkpoint and exits with 128 + the signal. A second one stops at once.
    Under torchrun the ranks agree on the flag every iteration (a signal may reach them in different
    iterations): all checkpoint in the same iteration (rank 0 writes) and all exit."""

    def __init__(self, dist=common.Dist()):
        import signal
        self.signum, self.previous, self.dist = None, {}, dist
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None and self.dist.world == 1:  # under torchrun a repeat is torchrun forwarding
            raise KeyboardInterrupt                           # the signal; it kills the workers 30 s later
        self.signum = self.signum or signum

    @property
    def requested(self):
        if self.dist.world > 1:
            self.signum = agree(self.dist, self.signum or 0) or None
        return self.signum is not None

    def exit_if_requested(self, iteration, out_dir):
        """After the checkpoint: say how to resume and exit 128 + signal, if a signal came (on every rank)."""
        import signal
        if not self.requested:
            return
        if self.dist.main:
            print(f"stopped by {signal.Signals(self.signum).name} after iteration {iteration}; checkpoint written "
                  f"to {Path(out_dir) / 'checkpoint.pth'}: continue with --resume auto", flush=True)
        sys.exit(128 + self.signum)

    def restore(self):
        """Put back the handlers that were there before."""
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_states():
    """Python, numpy and torch RNG states in a weights_only-loadable form."""
    import random
    ver, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [ver, list(state), gauss], "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                           *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    """Inverse of rng_states."""
    import random
    ver, state, gauss = states["python"]
    random.setstate((ver, tuple(state), gauss))
    np.random.set_state((states["numpy"][0], states["numpy"][1].numpy(), *states["numpy"][2:]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    with common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, num_classes=None, stack="deeplabv2"):
    """A checkpoint dict loaded with weights_only=True; DataError if missing, unsafe, of another --stack or
    for other classes. --stack daformer also reads the authors' mmcv `latest.pth` (daformer_checkpoint)."""
    ckpt = common.load_state_file(path)
    check_same_stack(ckpt, stack, path)
    if stack != "deeplabv2":
        return daformer_checkpoint(ckpt, path, num_classes, stack)
    state = ckpt.get("model", ckpt)
    heads = [k for k in ("layer6.conv2d_list.0.weight", "layer5.conv2d_list.0.weight") if k in state]
    if not heads:
        raise DataError(f"{path}: no DeepLabv2 classifier weights found (expected key 'model' with "
                        f"'layer5.conv2d_list.0.weight')")
    found = state[heads[0]].shape[0]
    if num_classes is not None and found != num_classes:
        raise DataError(f"{path}: checkpoint has {found} classes, expected {num_classes}")
    return ckpt


# ======================================================================================
# The shared command line (README 'The shared command line and outputs') and run set-up
# ======================================================================================

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default (once: a help text that
    states its default itself, e.g. one per source, is left as it is)."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


TARGETS = ("cityscapes", "acdc", "dark_zurich")   # the adaptation targets (--target)
EVAL_SETS = TARGETS + ("bdd100k", "mapillary")     # --eval-set: the targets and two evaluation-only sets
SERVERS = TARGETS                                  # --export: the sets with a test server
TARGET_FRAMES = {"cityscapes": (2048, 1024), "acdc": (1920, 1080), "dark_zurich": (1920, 1080)}   # W, H


def shared_parser(defaults):
    """The flags every method script shares; `defaults` maps a flag's dest to (value, source)."""
    p = argparse.ArgumentParser(add_help=False)
    d = {k: v[0] for k, v in defaults.items()}
    src = {k: v[1] for k, v in defaults.items()}

    def add(flag, help, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        if dest in d:
            kw["default"] = d[dest]
            help += f" (default: %(default)s; {src[dest]})"
        p.add_argument(flag, help=help, **kw)

    add("--data-root", "folder holding gta5/, synthia/, cityscapes/, acdc/, dark_zurich/, bdd100k/, mapillary/",
        default="./data")
    add("--gta5-root", "override <data-root>/gta5", default=None)
    add("--synthia-root", "override <data-root>/synthia", default=None)
    add("--cityscapes-root", "override <data-root>/cityscapes", default=None)
    add("--acdc-root", "override <data-root>/acdc", default=None)
    add("--dark-zurich-root", "override <data-root>/dark_zurich", default=None)
    add("--bdd100k-root", "override <data-root>/bdd100k", default=None)
    add("--mapillary-root", "override <data-root>/mapillary", default=None)
    add("--acdc-conditions", "ACDC: train and evaluate on these conditions only (default: all four)", nargs="+",
        choices=common.ACDC_CONDITIONS, default=None)
    add("--iters", "training iterations", type=int)
    add("--batch-size", "images per stream per iteration", type=int)
    add("--lr", "base learning rate of the backbone (head x10)", type=float)
    add("--seed", "seeds python/numpy/torch and every data and augmentation draw", type=int, default=0)
    add("--source-size", "resize of source images before cropping, W H", type=int, nargs=2, metavar=("W", "H"))
    add("--target-size", "resize of target images before cropping, W H (the default follows --target: the "
        "Cityscapes value at the scale of ACDC/Dark Zurich's 1920x1080 frame, 1024 512 -> 960 540, 2048 1024 -> "
        "1920 1080; a value given is used as it is). Training: dacs.py and iidm.py fit the frame into it keeping its "
        "ratio with --stack daformer/hrda or an ACDC/Dark Zurich target (mmseg's Resize), else resize to it exactly; "
        "ACDC/Dark Zurich val always keeps the ratio", type=int, nargs=2, metavar=("W", "H"))
    add("--crop-size", "random crop H W after the resize (0 0 = no crop)", type=int, nargs=2, metavar=("H", "W"))
    add("--eval-res", "evaluate against labels at the network input size (half) or at full resolution",
        choices=["half", "full"])
    add("--init", "backbone initialisation: coco, imagenet, demo (the demo's stand-in pretraining), none or a "
        "weights file")
    add("--layers", "Bottleneck blocks per ResNet stage (3 4 23 3 = ResNet-101; the demo uses 1 1 1 1)",
        type=int, nargs=4, default=[3, 4, 23, 3])
    add("--width", "channels of the ResNet stem and first stage, doubling per stage (64 = ResNet-101; the demo "
        "uses a narrower network)", type=int, default=64)
    add("--out-dir", "output folder (default runs/<script>_<source>_<n>_s<seed>)", default=None)
    add("--resume", "continue from <out-dir>/checkpoint.pth (auto; a fresh start if none) or a PATH",
        nargs="?", const="auto", default=None)
    add("--eval-only", "evaluate --checkpoint and exit", action="store_true")
    add("--checkpoint", "checkpoint to evaluate with --eval-only", default=None)
    add("--eval-model", "with --eval-only: the checkpoint's student (`model`, what the papers report) or its "
        "EMA teacher (`ema_model`)", choices=["student", "teacher"], default="student")
    add("--save-predictions", "with --eval-only: write predictions/<stem>_labelIds.png", action="store_true")
    add("--eval-set", "with --eval-only: the dataset to evaluate on (default: the run's target); another than the "
        "target is fit into the run's val size keeping the ratio, labels at full resolution (HRDA's DG "
        "evaluation); metrics_<set>.json", choices=EVAL_SETS, default=None)
    add("--split", "with --eval-only: val, or test (image-only: needs --export)", choices=["val", "test"],
        default="val")
    add("--export", "with --eval-only --split test: write the test server's submission (PNGs, zip, export.json) "
        "to this new or empty folder (--eval-set cityscapes, acdc or dark_zurich)", default=None, metavar="DIR")
    add("--eval-every", "evaluate every N iterations (0 = only at the end)", type=int, default=0)
    add("--save-every", "write checkpoint.pth every N iterations (and checkpoint_<iter>.pth with "
        "--keep-checkpoints)", type=int, default=1000)
    add("--keep-checkpoints", "also keep checkpoint_<iter>.pth at every save", action="store_true")
    add("--log-every", "console/log.jsonl line every N iterations", type=int, default=50)
    add("--device", "where to train", choices=["auto", "cuda", "cpu"], default="auto")
    add("--amp", "autocast (bf16 where supported, else fp16 with a GradScaler) and channels_last on GPU",
        action=argparse.BooleanOptionalAction, default=False)
    add("--amp-dtype", "with --amp: the autocast type (auto = bf16 where the device has it, else fp16)",
        choices=["auto", "bf16", "fp16"], default="auto")
    add("--compile", "torch.compile the networks every training step runs (student, EMA teacher, discriminators, "
        "frozen encoders; evaluation stays eager); the first iterations pay the compile (README 'Compiled step')",
        action=argparse.BooleanOptionalAction, default=False)
    add("--compile-mode", "with --compile: torch.compile mode (reduce-overhead = CUDA graphs: needs static shapes and "
        "no host syncs in the compiled region; unmeasured here, no GPU has run it)",
        choices=["default", "reduce-overhead", "max-autotune"], default="default")
    add("--compile-backend", "with --compile: torch.compile backend (inductor: C++ on the CPU, Triton on CUDA; "
        "aot_eager: the traced graphs run eagerly, for debugging and the tests)",
        choices=["inductor", "aot_eager"], default="inductor")
    if "sgd_rule" in d:
        add("--sgd-rule", "the per-entry SGD over the duplicated 1x group (docs/quirks.md Q4): torch0.4 adds the weight "
            "decay into p.grad, compounding over a tensor's listings (PyTorch 0.3-1.4); torch1.5 adds it out of place "
            "(SGD only; no effect with --clean-param-groups)", choices=common.SGD_RULES)
    add("--workers", "data-loading worker processes per data stream (the authors use 4; images/s per worker: "
        "benchmarks/RESULTS.md)", type=int, default=4)
    add("--demo", "run on the generated demo dataset with the small demo settings", action="store_true")
    add("--global-batch", "under torchrun (K processes): every process runs the paper's batch (per-rank: "
        "global batch K x the paper's) or the paper's batch is split over the processes (paper)",
        choices=["per-rank", "paper"], default="per-rank")
    add("--scale-lr", "under torchrun with --global-batch per-rank: learning rate(s) x K (linear scaling)",
        action="store_true")
    add("--scale-iters", "under torchrun with --global-batch per-rank: --iters (and poly, warm-up and ramp-up "
        "lengths) / K",
        action="store_true")
    add("--sync-bn", "under torchrun: the student's BatchNorm statistics over all processes' images "
        "(torch.nn.SyncBatchNorm, CUDA only; a train-mode EMA teacher keeps per-process statistics)",
        action="store_true")
    return p


def parse_with_demo(parser, demo, argv=None):
    """Parse; with --demo the `demo` values ({dest: value}) replace the paper defaults (explicit flags win)."""
    parser.epilog = "--demo sets: " + ", ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in demo.items())
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**demo)
    args = parser.parse_args(argv)
    if getattr(args, "split_file", None) is not None:
        split_file_gives_n(args, parser)
    return args


def split_file_gives_n(args, parser):
    """--split-file replaces the drawn split (common.labeled_split), so it gives N: --n-labeled takes its
    count of stems (the run folder's name, config.json, the demo labels follow); a different explicit
    --n-labeled, or a --split-seed beside it, is a DataError rather than silently unused."""
    path = Path(args.split_file)
    if not path.is_file():
        raise DataError(f"--split-file {args.split_file}: file not found (expected one image stem per line)")
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    if args.n_labeled not in (n, parser.get_default("n_labeled")):
        raise DataError(f"--n-labeled {args.n_labeled} with --split-file {args.split_file} of {n} stems: the file "
                        f"gives N (drop --n-labeled)")
    if args.split_seed != parser.get_default("split_seed"):
        raise DataError(f"--split-seed {args.split_seed} with --split-file {args.split_file}: --split-file gives the "
                        f"labeled list itself (drop --split-seed)")
    args.n_labeled = n


def add_split_args(parser, n_labeled, source, split_seed=0, seed_help=""):
    """--n-labeled / --split-seed / --split-file for the scripts with labeled Cityscapes images."""
    parser.add_argument("--n-labeled", type=int, default=n_labeled,
                        help=f"labeled Cityscapes train images (default: %(default)s; {source})")
    parser.add_argument("--split-seed", type=int, default=split_seed,
                        help=f"seed of the permutation of the sorted train list; the first N are labeled "
                             f"(default: %(default)s){seed_help}")
    parser.add_argument("--split-file", default=None,
                        help="reuse a list of labeled image stems, one per line (e.g. a run's split.txt); it gives "
                             "N and replaces --n-labeled / --split-seed")


def check_args(args):
    """Range checks shared by every script (DataError = exit 2)."""
    for name in ("iters", "batch_size", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.lr is not None and not args.lr > 0:
        raise DataError(f"--lr {args.lr}: expected a positive number")
    if args.eval_only and not args.checkpoint:
        raise DataError("--eval-only needs --checkpoint PATH")
    unused = [flag for flag, on in (("--checkpoint", args.checkpoint), ("--save-predictions", args.save_predictions),
                                    ("--eval-model teacher", args.eval_model == "teacher")) if on]
    if unused and not (args.eval_only or getattr(args, "stage", None) == "eval"):   # dldm.py: --stage eval too
        raise DataError(f"{unused[0]} is used by --eval-only only (add --eval-only, or drop it)")
    for name in ("eval_every", "save_every", "workers"):
        if getattr(args, name, None) is not None and getattr(args, name) < 0:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected 0 or a positive integer")
    for name in ("seed", "split_seed"):   # numpy's seeds
        if getattr(args, name, None) is not None and not 0 <= getattr(args, name) < 2 ** 32:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer in [0, 2^32)")
    if getattr(args, "layers", None) is not None and min(args.layers) < 1:
        raise DataError(f"--layers {' '.join(map(str, args.layers))}: expected four block counts >= 1")
    if getattr(args, "width", None) is not None and args.width < 1:
        raise DataError(f"--width {args.width}: expected a positive number of channels")
    for name in ("source_size", "target_size"):
        size = getattr(args, name, None)
        if size is not None and min(size) < 1:
            raise DataError(f"--{name.replace('_', '-')} {size[0]} {size[1]}: expected positive W H")
    if args.crop_size is not None and (min(args.crop_size) < 0 or (0 in args.crop_size and any(args.crop_size))):
        raise DataError(f"--crop-size {args.crop_size[0]} {args.crop_size[1]}: expected positive H W or 0 0")
    if getattr(args, "amp_dtype", "auto") != "auto" and not args.amp:
        raise DataError(f"--amp-dtype {args.amp_dtype} has an effect with --amp only (add --amp, or drop it)")
    check_compile_args(args)
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise DataError(f"--resume {args.resume}: file not found")
    check_eval_set_args(args)


def check_eval_set_args(args):
    """--eval-set / --split / --export: with --eval-only, the test split only into a new or empty --export
    folder, and only for a set with a test server (DataError before anything is read or written)."""
    unused = [flag for flag, on in (("--eval-set", args.eval_set), ("--split test", args.split == "test"),
                                    ("--export", args.export)) if on]
    if unused and not (args.eval_only or getattr(args, "stage", None) == "eval"):   # dldm.py: --stage eval too
        raise DataError(f"{unused[0]} is used by --eval-only only (add --eval-only --checkpoint PATH, or drop it)")
    if args.split == "test" and args.export is None:
        raise DataError("--split test: the test splits have no public labels to score; add --export DIR to write "
                        "the test server's submission")
    if args.export is None:
        return
    if args.split != "test":
        raise DataError(f"--export {args.export}: a submission is made from the test split; add --split test")
    if args.eval_set not in (None,) + SERVERS:
        raise DataError(f"--export with --eval-set {args.eval_set}: no test server (expected --eval-set "
                        f"{', '.join(SERVERS)})")
    if args.save_predictions:
        raise DataError("--save-predictions with --export: the export writes the predictions itself; drop it")
    out = Path(args.export)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(f"--export {args.export}: not an empty folder (expected a new or empty folder for the "
                        f"submission)")


def add_target_arg(parser, labeled=False):
    """--target: the domain adapted to (its val is the run's evaluation); `labeled`: the script trains on
    labeled target images (Dark Zurich has no train labels: check_target refuses it)."""
    parser.add_argument("--target", choices=TARGETS, default="cityscapes",
                        help="target domain: Cityscapes, ACDC (fog/night/rain/snow) or Dark Zurich (night; "
                             + ("refused: no train labels" if labeled else "train night images, no labels")
                             + "); ACDC/Dark Zurich scale the Cityscapes resizes to their 1920x1080 frame and "
                               "evaluate at full label resolution")


def set_target_defaults(parser, argv=None, sizes=("target_size",), extra=None, dest="target"):
    """--target's defaults (explicit flags win): ACDC and Dark Zurich scale the script's Cityscapes resizes
    `sizes` to their frame (target_frame_size) and evaluate at full label resolution, as mmseg does for them
    (DAFormer/HRDA cs2acdc and cs2darkzurich configs: the 1920x1080 labels); `extra` maps a target to further
    {dest: value}; `dest`: the flag naming the target (classmix_ssl.py: --dataset)."""
    target = getattr(parser.parse_known_args(argv)[0], dest)
    if target not in TARGET_FRAMES or target == "cityscapes":
        return
    defaults = {d: target_frame_size(parser.get_default(d), target) for d in sizes
                if parser.get_default(d) is not None}
    if parser.get_default("eval_res") is not None:
        defaults["eval_res"] = "full"
    parser.set_defaults(**defaults, **(extra or {}).get(target, {}))


def target_frame_size(size, target):
    """A Cityscapes resize (W, H) at the same scale of `target`'s frame: 1024x512 -> 960x540 (DAFormer's
    cs2acdc/cs2darkzurich target resize), 2048x1024 -> 1920x1080 (HRDA's)."""
    (cw, ch), (tw, th) = TARGET_FRAMES["cityscapes"], TARGET_FRAMES[target]
    return [round(size[0] * tw / cw), round(size[1] * th / ch)]


def check_target(args, source, target, labeled=False, flag="--target"):
    """DataError for a target the run cannot use: the source itself, another target than the demo's generated
    Cityscapes with the demo, Dark Zurich where labeled target images are trained on (`labeled`; its train split
    has none), --acdc-conditions without ACDC."""
    if source == target:
        raise DataError(f"--source {source} --target {target}: the source is labeled and the target adapted to; "
                        f"expected another target ({', '.join(t for t in TARGETS if t != source)})")
    if source == "demo" and target != "cityscapes":
        raise DataError(f"{flag} {target}: the demo adapts to its generated Cityscapes-layout data (drop --target "
                        f"or --demo)")
    if labeled and target == "dark_zurich":
        raise DataError(f"{flag} dark_zurich: Dark Zurich train has no labels, and this script trains on labeled "
                        f"target images (use {flag} acdc or cityscapes)")
    if args.acdc_conditions and "acdc" not in (target, args.eval_set):
        raise DataError(f"--acdc-conditions {' '.join(args.acdc_conditions)}: ACDC is neither --target nor "
                        f"--eval-set (drop it)")


def check_optimizer_flags(args):
    """--clean-param-groups changes the duplicated 1x group of the authors' SGD; Adam has one group of each
    tensor at one rate (common.deeplab_optimizer), so the flag would do nothing there: DataError."""
    if args.clean_param_groups and args.optimizer != "sgd":
        raise DataError(f"--clean-param-groups with --optimizer {args.optimizer}: Adam lists every tensor once at "
                        f"one learning rate already (the flag changes the SGD groups only)")


def dataset_root(args, kind):
    """The root of one dataset: --<kind>-root or <data-root>/<kind>."""
    return Path(getattr(args, f"{kind}_root", None) or Path(args.data_root) / common.DATASET_FOLDERS.get(kind, kind))


def data_roots(args, domain, target="cityscapes"):
    """(source kind, source root, target kind, target root) for --source/--dataset `domain` and --target;
    'demo' is the generated demo data (GTA5 layout source, Cityscapes layout target), written under
    <data-root>/demo once."""
    if domain == "demo":
        import demo
        given = [f"--{k.replace('_', '-')}-root" for k in common.DATASET_FOLDERS if getattr(args, f"{k}_root", None)]
        if given:
            raise DataError(f"{given[0]}: the demo reads its generated data under --data-root (drop {given[0]})")
        root = demo.ensure_demo(args.data_root)
        return "gta5", root / "gta5", "cityscapes", root / "cityscapes"
    return domain, dataset_root(args, domain), target, dataset_root(args, target)


def lock_run_dir(out_dir):
    """Claim out_dir for this process (run.lock: pid and host, removed at exit); DataError if a live run
    holds it; the lock of a process that is gone is taken over with a note."""
    import atexit
    import socket
    path, mine = Path(out_dir) / "run.lock", f"{os.getpid()} {socket.gethostname()}"
    if path.is_file():
        held = path.read_text().split()
        if held == mine.split():
            return
        pid, host = (int(held[0]), held[1]) if len(held) == 2 and held[0].isdigit() else (None, None)
        if host is not None and host != socket.gethostname():
            raise DataError(f"{out_dir}: in use by a run on {host} (pid {pid}); pick another --out-dir, or delete "
                            f"{path} if that run is gone")
        if pid is not None and process_alive(pid):
            raise DataError(f"{out_dir}: in use by a running process (pid {pid}); pick another --out-dir")
        print(f"note: {path} of a process that is gone (pid {pid}) taken over", flush=True)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:   # a file, under a file, or not writable
        raise DataError(f"--out-dir {out_dir}: cannot be made a folder ({exc.strerror}; expected a new or existing "
                        f"writable folder)") from None
    common.atomic_write_text(path, mine + "\n")
    atexit.register(lambda: path.is_file() and path.read_text().split() == mine.split() and path.unlink())


def process_alive(pid):
    """True if a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_run_files(out_dir, args, split=None, dist=common.Dist()):
    """Claim out_dir (lock_run_dir); write config.json (every resolved argument) and split.txt (rank 0 only)."""
    if not dist.main:
        return
    out_dir = Path(out_dir)
    lock_run_dir(out_dir)
    common.atomic_write_text(out_dir / "config.json", json.dumps(vars(args), indent=1, default=str))
    if split is not None:
        common.atomic_write_text(out_dir / "split.txt", "".join(s + "\n" for s in split))


def resume_state(args, out_dir, num_classes):
    """The checkpoint to continue from (None for a fresh start), per --resume."""
    if args.resume is None:
        return None
    path = Path(out_dir) / "checkpoint.pth" if args.resume == "auto" else Path(args.resume)
    if args.resume == "auto" and not path.is_file():
        return None
    ckpt = load_checkpoint(path, num_classes, getattr(args, "stack", "deeplabv2"))
    if "args" in ckpt:  # the authors' checkpoints hold no arguments
        check_same_run(ckpt["args"], vars(args), path)
    return ckpt


RUN_ONLY_ARGS = {"data_root", "gta5_root", "synthia_root", "cityscapes_root", "acdc_root", "dark_zurich_root",
                 "bdd100k_root", "mapillary_root", "out_dir", "resume", "eval_only", "checkpoint", "eval_model",
                 "save_predictions", "eval_set", "split", "export", "eval_every", "save_every", "keep_checkpoints",
                 "log_every", "device", "amp", "amp_dtype", "workers", "demo", "compile", "compile_mode",
                 "compile_backend"}


ADDED_ARGS = {"sgd_rule": "torch1.5", "stack": "deeplabv2", "mit": None, "drop_path_rate": None, "fd_lambda": None,
              "pl_crop": None, "warmup_iters": None, "rcs": None, "rcs_temp": None, "rcs_min_pixels": None,
              "classmix_select": None, "target_cat_max_ratio": None, "hr_loss_weight": None, "eval_mode": None,
              "mic": False, "mask_ratio": None, "mask_block": None, "mask_lambda": None,
              "mask_lambda_all": False, "labeled_loss": None, "mic_on": None, "target": "cityscapes",
              "acdc_conditions": None}  # flags added later: what older runs ran


def check_same_run(saved, current, path):
    """DataError naming the differences when a checkpoint was made by another script or configuration
    (arguments that only say where and how fast to run may differ; paths inside the run folder are compared
    relative to it)."""
    def norm(d):
        out = str(d.get("out_dir") or "\0")
        return {k: json.loads(json.dumps(v, default=str).replace(out, "<out-dir>")) for k, v in d.items()
                if k not in RUN_ONLY_ARGS}
    saved, current = norm(saved), norm(current)
    saved = {**{k: v for k, v in ADDED_ARGS.items() if k in current}, **saved}  # a run made before a flag existed
    if saved.keys() != current.keys():
        only = sorted(saved.keys() - current.keys())[:5]
        raise DataError(f"--resume {path}: made by another script (its arguments {only} do not exist here)")
    diff = [f"--{k.replace('_', '-')} {saved[k]} (here {current[k]})" for k in sorted(saved) if saved[k] != current[k]]
    if diff:
        raise DataError(f"--resume {path}: made with other settings: {'; '.join(diff[:5])}")


def target_val(kind, root, size, eval_res, norm, num_classes=19, interp="bilinear", conditions=None,
               stack="deeplabv2"):
    """The target's val as the protocols read it: image resized to `size` (W, H) by `interp`, keeping its ratio
    as common.target_keeps_ratio says for `stack`; labels nearest-downsampled to the input ('half', DACS/ClassMix)
    or at full resolution ('full', AdaptSegNet, mmseg); `conditions`: ACDC's subset."""
    return common.SegmentationDataset(kind, root, "val", resize=tuple(size),
                                      keep_ratio=common.target_keeps_ratio(stack, kind), norm=norm,
                                      num_classes=num_classes, label_res="input" if eval_res == "half" else "full",
                                      interp=interp, conditions=conditions)


def eval_dataset(args, val):
    """(dataset, metrics file name) of --eval-set/--split: the run's val itself, its test split, or another set
    fit into the run's val size keeping the ratio with labels at full resolution (HRDA's DG evaluation of
    BDD100K/Mapillary with the run's Cityscapes test pipeline; lhoyer/HRDA dg branch tools/test.py)."""
    kind = args.eval_set or val.kind
    if kind == val.kind and args.split == "val":
        return val, "metrics.json"
    same = kind == val.kind
    data = common.SegmentationDataset(kind, val.root if same else dataset_root(args, kind), args.split,
                                      resize=val.resize, keep_ratio=val.keep_ratio if same else True,
                                      interp=val.interp, norm=val.norm, num_classes=val.num_classes,
                                      label_res=val.label_res if same else "full", conditions=args.acdc_conditions)
    return data, "metrics.json" if same else f"metrics_{kind}.json"


def is_due(i, every, max_iter):
    """True after loop iteration i when a periodic action (every N; 0 = never) or the last iteration is due."""
    return (every > 0 and (i + 1) % every == 0) or i + 1 == max_iter


def evaluate_and_write(model, val, device, out_dir, iteration, synthia=False, amp=None, align_corners=True,
                       model_name="student", save_predictions=False, dist=common.Dist(), name="metrics.json"):
    """Evaluate a model on val (vis/, and predictions/ if asked, in out_dir) and write `name` (metrics.json),
    which names the dataset as "target" and the protocol as "labels" ('input': --eval-res half, 'full') (split
    over the ranks under torchrun; rank 0 writes)."""
    metrics = common.evaluate(model, val, device, synthia=synthia, out_dir=out_dir, iteration=iteration,
                       amp_dtype=amp.dtype if amp is not None and amp.enabled else None, align_corners=align_corners,
                       model_name=model_name, save_predictions=save_predictions, dist=dist)
    metrics["target"], metrics["labels"] = val.kind, val.label_res
    if dist.main:
        write_metrics(out_dir, metrics, name)
    return metrics


def write_metrics(out_dir, metrics, name="metrics.json"):
    """Write an evaluation atomically and print its one-line summary."""
    common.atomic_write_text(Path(out_dir) / name, json.dumps(metrics, indent=1))
    extra = f" mIoU13 {metrics['mIoU13']:.2f}" if "mIoU13" in metrics else ""
    print(f"eval it {metrics['iteration']} {metrics['model']}: mIoU {metrics['mIoU']:.2f}{extra} "
          f"({metrics['num_classes']} classes)", flush=True)


def reported_key(synthia):
    """The mIoU the papers report: over 13 classes for SYNTHIA (`mIoU13`), else over all classes (`mIoU`)."""
    return "mIoU13" if synthia else "mIoU"


def update_best(best, metrics, out_dir, synthia, main=True):
    """Best-of-snapshots on val by the reported mIoU (`best` is updated in place and belongs in the checkpoint):
    model selection on the evaluation set, never the primary number (rank 0 writes best_snapshot.json and
    says it)."""
    key = reported_key(synthia)
    if not best or metrics[key] > best[key]:
        best.clear()
        best.update({"iteration": metrics["iteration"], key: metrics[key]})
        record = {**best, "selection": f"best of the evaluated snapshots on {metrics.get('target', 'cityscapes')} "
                                       "val (selected on the evaluation set; metrics.json holds the final snapshot, "
                                       "the primary number)"}
        if main:
            common.atomic_write_text(Path(out_dir) / "best_snapshot.json", json.dumps(record, indent=1))
    if main:
        print(f"best of snapshots so far (selected on val): {key} {best[key]:.2f} at iteration {best['iteration']}",
              flush=True)


def eval_only(args, model, val, device, out_dir, synthia=False, align_corners=True, dist=common.Dist()):
    """--eval-only: load --checkpoint's `model` or `ema_model` (--eval-model; class count checked,
    weights_only; network settings checked against the checkpoint's own) and evaluate it on val or --eval-set
    (eval_dataset), with --amp as during training; --export writes the test split's submission instead
    (common.export_submission; returns its export.json record)."""
    ckpt = load_checkpoint(args.checkpoint, model.num_classes, getattr(args, "stack", "deeplabv2"))
    check_same_network(ckpt.get("args", {}), args, args.checkpoint)
    if args.eval_model == "teacher" and "ema_model" not in ckpt:
        raise DataError(f"{args.checkpoint}: no 'ema_model' (teacher) in this checkpoint; use --eval-model student")
    state = ckpt["ema_model"] if args.eval_model == "teacher" else ckpt.get("model", ckpt)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{args.checkpoint}: not a state_dict of this model "
                        f"({str(exc).splitlines()[0][:200]})") from None
    data, name = eval_dataset(args, val)
    amp = Amp(device, args.amp, args.amp_dtype)
    if args.export is not None:    # --split test: the test server's submission instead of metrics
        if dist.world > 1:
            raise DataError("--export runs in one process: launch it without torchrun")
        record = {"checkpoint": str(args.checkpoint), "model": args.eval_model, "iteration": ckpt.get("iteration")}
        return common.export_submission(model, data, data.kind, args.export, device,
                                        amp.dtype if amp.enabled else None, align_corners, record=record)
    if dist.main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return evaluate_and_write(model, data, device, out_dir, ckpt.get("iteration"), synthia, amp,
                              align_corners=align_corners, model_name=args.eval_model,
                              save_predictions=args.save_predictions, dist=dist, name=name)


NETWORK_ARGS = ("layers", "width", "mit")  # the arguments that change the network a checkpoint needs


def check_same_network(saved, args, path):
    """Refuse a checkpoint trained with another ASPP, size or input convention (stride style, normalisation)
    than this run builds, also one of another script: the tensor names and shapes can be the same, the
    predictions would be wrong. `saved`: the checkpoint's arguments ({} for the authors' checkpoints: nothing
    to compare)."""
    if not saved:
        return
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (this run: {getattr(args, k, None)})" for k in NETWORK_ARGS
             if k in saved and saved[k] != getattr(args, k, None)]
    (style, norm, full), (my_style, my_norm, my_full) = (common.run_input_convention(saved),
                                                         common.run_input_convention(vars(args)))
    if full != my_full:
        diffs.append(f"--aspp-full {full} (this run: {my_full})")
    if (style, norm) != (my_style, my_norm):
        diffs.append(f"--init {saved.get('init')} (this run: {getattr(args, 'init', None)}; with the training "
                     f"script, it sets the stride style and input normalisation: {style}/{norm}, this run "
                     f"{my_style}/{my_norm})")
    if diffs:
        raise DataError(f"{path}: trained with {'; '.join(diffs)}: evaluate with the training run's settings")


# ======================================================================================
# The network stack (--stack): DeepLabv2-ResNet-101 or DAFormer's MiT + DAFormer head
# ======================================================================================

STACKS = ("deeplabv2", "daformer", "hrda")
DEEPLAB_ONLY = ("layers", "width", "aspp_full", "optimizer", "clean_param_groups", "sgd_rule", "frozen_bn")
DAFORMER_ONLY = ("mit", "drop_path_rate", "fd_lambda", "pl_crop")
HRDA_ONLY = ("hr_loss_weight", "eval_mode")
MIC_ONLY = ("mask_ratio", "mask_block", "mask_lambda")
MIT_B5_SOURCE = ("SegFormer's ImageNet-1k encoder weights mit_b5.pth (NVlabs/SegFormer README, 'ImageNet-1K "
                 "pretrained weights'; lhoyer/DAFormer puts it at pretrained/mit_b5.pth)")
HEAD_KEY = {"daformer": "decode_head.conv_seg.weight", "hrda": "decode_head.head.conv_seg.weight"}
MIC = {"mask_ratio": 0.7, "mask_lambda": 1.0}   # lhoyer/MIC seg/experiments.py ids 80, 81
MIC_BLOCK = {"hrda": 64, "daformer": 32, "deeplabv2": 32}   # lhoyer/MIC seg/experiments.py: 64 px on HRDA's 1024 crops
#   (id 80), 32 px on the 512 crops of DAFormer and DeepLabv2 (id 81: "half the patch size ... half resolution")
DEMO_MIC_BLOCK = 4   # --demo --mic: the same 16x16 grid of blocks on the demo's 64x64 crops


def add_stack_args(parser):
    """--stack, the flags of DAFormer's and HRDA's network and training additions (defaults follow --stack) and
    MIC's masked image consistency (--mic, any stack)."""
    parser.add_argument("--stack", choices=STACKS, default="deeplabv2",
                        help="network and training set-up: the method paper's DeepLabv2-ResNet-101, DAFormer's "
                             "MiT-B5 + DAFormer head with DAFormer's training (Hoyer et al., CVPR 2022), or HRDA's "
                             "multi-resolution training on it (Hoyer et al., ECCV 2022) (what each sets: the "
                             "script's docstring above)")
    parser.add_argument("--mit", choices=["b0", "b1", "b2", "b3", "b4", "b5", "tiny"], default=None,
                        help="--stack daformer/hrda: MiT encoder size (default: b5, DAFormer; tiny = the tests' and "
                             "the demo's)")
    parser.add_argument("--drop-path-rate", type=float, default=None,
                        help="--stack daformer/hrda: MiT stochastic depth (default: 0.1, DAFormer mit_b5 config)")
    parser.add_argument("--fd-lambda", type=float, default=None,
                        help="--stack daformer/hrda: weight of the ImageNet feature distance on thing classes "
                             "(default: 0.005, DAFormer/HRDA; 0 = off; HRDA: on the context features)")
    parser.add_argument("--pl-crop", choices=["none", "v1", "v2"], default=None,
                        help="--stack daformer/hrda: pseudo-label weight 0 on the top 15 / bottom 120 rows of a "
                             "512-row crop (v1; other crop heights scale the rows, DAFormer's default), on the "
                             "margins top 30 / bottom 240 / left 30 / right 30 of the 2048x1024 target image, "
                             "transformed with it (v2, --stack hrda only; HRDA's default), or none")
    parser.add_argument("--hr-loss-weight", type=float, default=None,
                        help="--stack hrda: weight of the detail-crop loss; the fused loss gets 1 minus it "
                             "(default: 0.1, HRDA hr_loss_weight)")
    parser.add_argument("--eval-mode", choices=["whole", "slide"], default=None,
                        help="--stack hrda: evaluation on the whole image (one context view, detail windows) or in "
                             "windows of --crop-size every half crop, each a whole HRDA inference (default: slide, "
                             "HRDA test_cfg)")
    parser.add_argument("--mic", action="store_true",
                        help="MIC (Hoyer et al., CVPR 2023): also train on the colour-augmented, block-masked target "
                             "image against the teacher's pseudo-label and weights (any --stack)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="--mic: share of masked blocks (default: 0.7, MIC)")
    parser.add_argument("--mask-block", type=int, default=None,
                        help="--mic: mask block side in pixels (default: 64 with --stack hrda, 32 otherwise, MIC; "
                             "4 with --demo); at most the masked crop's side")
    parser.add_argument("--mask-lambda", type=float, default=None,
                        help="--mic: weight of the masked loss (default: 1, MIC); with --stack hrda MIC scales its "
                             "fused term only (the authors' code), --mask-lambda-all scales the detail term too")
    parser.add_argument("--mask-lambda-all", action="store_true",
                        help="--mic --stack hrda, clean variant: --mask-lambda scales the whole masked HRDA loss")


def parse_with_stack(parser, stacks, demo, argv=None, daformer_only=(), targets=None):
    """parse_with_demo with --stack's defaults: `stacks` maps a stack other than deeplabv2 to its {dest: value}
    defaults, then --target's (set_target_defaults; `targets` maps a stack to its per-target extras), `demo`
    maps each stack to its demo values; explicit flags win. A DeepLabv2-only flag changed
    under another stack, a stack flag (DAFORMER_ONLY and the script's `daformer_only`, None by default)
    given under deeplabv2, an HRDA flag under another stack or a MIC flag without --mic is a DataError;
    --mic fills the MIC flags' defaults."""
    stack = parser.parse_known_args(argv)[0].stack
    if stack != "deeplabv2":
        parser.set_defaults(**stacks[stack])
    if "target" in vars(parser.parse_known_args(argv)[0]):
        set_target_defaults(parser, argv, extra=(targets or {}).get(stack))
    args = parse_with_demo(parser, demo[stack], argv)
    if stack != "hrda":
        given = [k for k in HRDA_ONLY if getattr(args, k, None) is not None]
        if given or getattr(args, "mask_lambda_all", False):
            name = given[0] if given else "mask_lambda_all"
            raise DataError(f"--{name.replace('_', '-')} is a --stack hrda flag (this run: --stack {stack})")
    if hasattr(args, "mic"):
        given = [k for k in MIC_ONLY if getattr(args, k) is not None]
        if given and not args.mic:
            raise DataError(f"--{given[0].replace('_', '-')} is a --mic flag; add --mic or drop it")
        if args.mic:
            for k, v in {**MIC, "mask_block": DEMO_MIC_BLOCK if args.demo else MIC_BLOCK[stack]}.items():
                setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
            if not (0 <= args.mask_ratio < 1 and args.mask_block > 0 and args.mask_lambda >= 0):
                raise DataError(f"--mask-ratio {args.mask_ratio} in [0,1), --mask-block {args.mask_block} > 0 and "
                                f"--mask-lambda {args.mask_lambda} >= 0 expected")
            flag, size = ("--crop-size", args.crop_size) if any(args.crop_size) else ("--target-size", args.target_size)
            if min(size) < args.mask_block:
                raise DataError(f"--mask-block {args.mask_block} with {flag} {size[0]} {size[1]}: a mask block larger "
                                f"than the masked image; expected --mask-block <= {min(size)}")
    if stack != "deeplabv2":
        changed = [k for k in DEEPLAB_ONLY if hasattr(args, k) and getattr(args, k) != parser.get_default(k)]
        if changed:
            raise DataError(f"--{changed[0].replace('_', '-')} is a --stack deeplabv2 flag (this run: --stack "
                            f"{stack}); drop it")
        if stack == "daformer" and args.pl_crop == "v2":
            raise DataError("--pl-crop v2 is HRDA's pseudo-label crop (this run: --stack daformer); use --stack hrda "
                            "or --pl-crop v1/none")
        return args
    given = [k for k in DAFORMER_ONLY + tuple(daformer_only) if getattr(args, k) is not None]
    if given:
        raise DataError(f"--{given[0].replace('_', '-')} is a --stack daformer flag (this run: --stack deeplabv2)")
    return args


def check_hrda_args(args):
    """--stack hrda: crop sides HRDA can split (detail crop = half the crop, divisible by 8), images at least as
    large as the crop, --hr-loss-weight in [0,1] (DataError)."""
    crop = tuple(args.crop_size)
    if min(crop) <= 0 or any(c % 16 for c in crop):
        raise DataError(f"--crop-size {crop[0]} {crop[1]}: --stack hrda needs sides divisible by 16 (the "
                               "detail crop is half the crop, on a grid of 8; HRDA: 1024 1024)")
    for flag, size in (("--target-size", args.target_size), ("--source-size", args.source_size)):
        if size is not None and (size[0] < crop[1] or size[1] < crop[0]):
            raise DataError(f"{flag} {size[0]} {size[1]}: smaller than the HRDA crop --crop-size {crop[0]} "
                                   f"{crop[1]}; expected images at least as large as the crop")
    if not 0 <= args.hr_loss_weight <= 1:
        raise DataError(f"--hr-loss-weight {args.hr_loss_weight}: expected a value in [0,1]")


def check_mit_init(args):
    """--stack daformer: --init is a readable mit_*.pth (or none = random init); DataError saying where to get it."""
    if args.init == "none" or Path(args.init).is_file():
        return
    if args.init in ("coco", "imagenet", "demo"):
        problem = f"--init {args.init} is a DeepLabv2 initialisation"
    else:
        problem = f"--init {args.init}: file not found"
    raise DataError(f"{problem}; --stack daformer starts from {MIT_B5_SOURCE}: download it, put it at a path and "
                    f"pass --init PATH (or --init none for a random init)")


def check_same_stack(ckpt, stack, path):
    """DataError naming both stacks when a checkpoint holds another network than this run builds (from its
    arguments, or for the authors' files from its tensor names: DAFormer's have `decode_head.*`, HRDA's
    `decode_head.scale_attention.*`)."""
    if isinstance(ckpt.get("args"), dict):
        found = ckpt["args"].get("stack", "deeplabv2")
    else:
        state = ckpt.get("model", ckpt.get("state_dict", ckpt))
        found = ("hrda" if any("decode_head.scale_attention." in k for k in state) else
                 "daformer" if any("decode_head." in k for k in state) else "deeplabv2")
    if found != stack:
        raise DataError(f"{path}: a --stack {found} checkpoint (this run: --stack {stack}); evaluate or resume it "
                        f"with --stack {found}")


def daformer_checkpoint(ckpt, path, num_classes=None, stack="daformer"):
    """A --stack daformer/hrda checkpoint as {'model', 'ema_model'?, ...}: ours as it is; the authors' mmcv
    `latest.pth` ({'meta', 'state_dict': {'model.*', 'ema_model.*', 'imnet_model.*'}, 'optimizer'}) as its
    student and teacher under the student's names (lhoyer/DAFormer and lhoyer/HRDA tools/test.py keep
    `model.*`)."""
    if "model" not in ckpt and "state_dict" in ckpt:   # the authors' file: its student and teacher
        ckpt = common.authors_checkpoint(ckpt, path)
    head = ckpt.get("model", {}).get(HEAD_KEY[stack])
    if head is None:
        raise DataError(f"{path}: no {stack} classifier weights found (expected 'model' with '{HEAD_KEY[stack]}', "
                        f"or the authors' 'state_dict' with 'model.{HEAD_KEY[stack]}')")
    if num_classes is not None and head.shape[0] != num_classes:
        raise DataError(f"{path}: checkpoint has {head.shape[0]} classes, expected {num_classes}")
    return ckpt


def next_target_batch(loader, device):
    """The next target images of a training loader on `device` and their pseudo-label margin masks (`valid`,
    HRDA's --pl-crop v2; None when the dataset has none)."""
    batch = next(loader)
    valid = batch["valid"].to(device, non_blocking=True) if "valid" in batch else None
    return batch_images(batch, device), valid


class WeightsOf(nn.Module):
    """An evaluation wrapper (e.g. common.SlideInference) whose state dict is its wrapped model's: --eval-only
    loads the checkpoint into the model itself."""

    def __init__(self, wrapper):
        super().__init__()
        self.wrapper, self.num_classes = wrapper, wrapper.num_classes

    def forward(self, x):
        return self.wrapper(x)

    def state_dict(self, *args, **kwargs):
        return self.wrapper.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict=True):
        return self.wrapper.model.load_state_dict(state, strict)


def write_demo_summary(out_dir, script, method, baselines, iterations, seconds):
    """Write <out_dir>/demo.json (method and baseline mIoUs of a --demo run) and print its one-line summary;
    `method` is (name, metrics), `baselines` a list of (name, metrics)."""
    entry = lambda name, m: {"name": name, "mIoU": round(m["mIoU"], 2)}  # noqa: E731
    summary = {"script": script, "method": entry(*method), "baselines": [entry(*b) for b in baselines],
               "iterations": iterations, "seconds": round(seconds, 1), "torch": torch.__version__}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    common.atomic_write_text(Path(out_dir) / "demo.json", json.dumps(summary, indent=1))
    others = ", ".join(f"{b['name']} {b['mIoU']:.2f}" for b in summary["baselines"])
    print(f"demo target val mIoU: {summary['method']['name']} {summary['method']['mIoU']:.2f} vs {others} "
          f"({iterations} iterations, {seconds:.0f} s, torch {torch.__version__})", flush=True)
    return summary


def default_out_dir(script, source, n_labeled, seed, target="cityscapes"):
    """runs/<script>_<source>_<n>_s<seed>; without a label budget (UDA) runs/<script>_<source>_s<seed>; a
    target other than Cityscapes follows the source (runs/dacs_cityscapes_acdc_s0)."""
    n = "" if n_labeled is None else f"_{n_labeled}"
    to = "" if target == "cityscapes" else f"_{target}"
    return Path("runs") / f"{script}_{source}{to}{n}_s{seed}"


def training_state(i, model, optimizer, scheduler, args, teacher=None):
    """Checkpoint dict: the official keys (`model`, `ema_model`, `optimizer`, `iteration`) plus the
    scheduler, every RNG state and the arguments."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": i,
             "scheduler": scheduler.state_dict(), "rng": rng_states(), "args": vars(args)}
    if teacher is not None:
        state["ema_model"] = teacher.state_dict()
    return state


def write_checkpoints(out_dir, state, keep=False, dist=common.Dist()):
    """checkpoint.pth (atomically), plus checkpoint_<iter>.pth when `keep`; Diverged instead of writing
    non-finite weights (the previous checkpoint stays). Under torchrun every rank calls it: rank 0 writes,
    with every rank's RNG states (`rng_ranks`) and the process count (`world`)."""
    if dist.world > 1:  # sent as torch.save bytes: gather_object's unpickler cannot rebuild tensors
        import io
        buf, ranks = io.BytesIO(), [None] * dist.world if dist.main else None
        torch.save(state["rng"], buf)
        torch.distributed.gather_object(buf.getvalue(), ranks, dst=0, group=dist.group)
        rng = [torch.load(io.BytesIO(b), weights_only=True) for b in ranks] if dist.main else None
        state = {**state, "rng_ranks": rng, "world": dist.world}
    for name in ("model", "ema_model"):
        floats = {k: v for k, v in state.get(name, {}).items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist() if floats else []
        bad = [k for k, ok in zip(floats, finite) if not ok]  # one host sync for the whole state
        if bad:
            raise Diverged(f"iteration {state['iteration']}: non-finite weights in {name} ({bad[0]}, ...); "
                           f"not saved, {Path(out_dir) / 'checkpoint.pth'} is the last good checkpoint")
    if not dist.main:
        return
    save_checkpoint(Path(out_dir) / "checkpoint.pth", state)
    if keep:
        save_checkpoint(Path(out_dir) / f"checkpoint_{state['iteration']}.pth", state)


def restore_training(ckpt, model, optimizer, scheduler, teacher=None, seed=0, dist=common.Dist()):
    """Load a checkpoint into the run's objects; returns the iteration to start at. An authors' checkpoint
    (`model`, `ema_model`, `optimizer`, `iteration` only) continues at its iteration: the schedule is
    fast-forwarded to it and the RNGs are re-seeded from `seed`, which is said on the console. Under
    torchrun every rank loads rank 0's checkpoint and its own RNG states; the process count must match
    (each rank's draws depend on it)."""
    if "rng" in ckpt and ckpt.get("world", 1) != dist.world:
        raise DataError(f"--resume: the checkpoint was written by a run of {ckpt.get('world', 1)} process(es), "
                        f"this run has {dist.world} (the data draws depend on it); launch with "
                        f"--nproc_per_node/--nnodes giving {ckpt.get('world', 1)}")
    missing = [k for k in ("model", "optimizer", "iteration") + ("ema_model",) * (teacher is not None)
               if k not in ckpt]
    if missing:
        raise DataError(f"--resume: the checkpoint has no {', '.join(map(repr, missing))}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(ckpt["ema_model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DataError(f"--resume: the checkpoint does not fit this run ({str(exc).splitlines()[0][:200]})") from None
    start = ckpt["iteration"]
    if "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    else:
        scheduler.last_epoch = start - 1
        with warnings.catch_warnings():        # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    if "rng" in ckpt:
        set_rng_states(ckpt["rng_ranks"][dist.rank] if "rng_ranks" in ckpt else ckpt["rng"])
    else:
        common.seed_everything(seed)
        print(f"resuming an external checkpoint at iteration {start}: no RNG state in it, re-seeded from "
              f"--seed {seed}", flush=True)
    return start


def shuffled_loader(dataset, args, stream, start, batch_size=None, dist=common.Dist()):
    """Training loader drawing `dataset` epoch by epoch in seeded order (IterationSampler) from iteration
    `start`; `stream` keeps the draws of different loaders independent; `dist` picks this rank's slots."""
    sampler = common.IterationSampler(len(dataset), batch_size or args.batch_size, args.seed, stream, start, args.iters,
                               dist.rank, dist.world)
    return infinite_loader(dataset, sampler, args.workers)


def rare_class_loader(dataset, args, stream, start, num_classes, cache, dist=common.Dist()):
    """Training loader with DAFormer's rare-class sampling (--rcs-temp, --rcs-min-pixels); the class counts
    of `dataset` are cached in `cache` (rank 0 writes it; a cache of another length is refused)."""
    with main_first(dist):
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        counts = common.rcs_statistics(dataset, cache=cache, workers=args.workers)
    if len(counts) != len(dataset):
        raise DataError(f"{cache}: class counts of {len(counts)} images, the source has {len(dataset)} "
                        f"(a cache of another dataset: delete it)")
    return infinite_loader(dataset, common.RareClassSampler(
        counts, num_classes, args.batch_size, args.seed, stream, start, args.iters, temperature=args.rcs_temp,
        min_pixels=args.rcs_min_pixels, rank=dist.rank, world=dist.world), args.workers)


def batch_images(batch, device):
    """A loader batch's images on `device` (non-blocking copy); uint8 ones (infinite_loader's) are normalised
    there, bit-identically to the normalisation the workers did before (common.normalise_batch)."""
    x = batch["image"].to(device, non_blocking=True)
    return common.normalise_batch(x, batch["norm"][0]) if x.dtype == torch.uint8 else x


def next_batch(loader, device):
    """The next (images, labels) of a training loader on `device` (pinned memory, non-blocking copies; uint8
    labels widened there)."""
    batch = next(loader)
    return batch_images(batch, device), batch["label"].to(device, non_blocking=True).long()


def infinite_loader(dataset, sampler, workers):
    """DataLoader over an iteration-indexed batch sampler (order and crops fixed by seed and iteration).

    One iterator serves the whole run (the sampler spans every iteration), so persistent workers would
    change nothing; pinned memory on CUDA keeps next_batch's copies asynchronous; 2 batches in flight per
    worker absorb the per-batch spread of load times (benchmarks/RESULTS.md, 'Data-loading defaults').
    A SegmentationDataset (or PseudoMarginDataset) delivers uint8 images and labels, which next_batch normalises
    on the device.
    """
    if isinstance(dataset, (common.SegmentationDataset, common.PseudoMarginDataset)):
        dataset = dataset.uint8_items()
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                            pin_memory=torch.cuda.is_available(),
                                            prefetch_factor=2 if workers > 0 else None,
                                            worker_init_fn=worker_stop_signals))


def worker_stop_signals(worker_id):
    """Data-loading workers leave Ctrl-C (SIGINT, sent to the whole process group) to the main process; on
    SIGTERM (a scheduler signals every process) they keep serving for 5 s, so the main process can finish
    its iteration and checkpoint, then end with status 0, which raises no error in the main process."""
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Timer(5.0, os._exit, (0,)).start())


def run_script(main):
    """Call main() under common.run_cli (bad data, arguments, disk errors -> one line `error: ...`, exit 2); a
    diverged run -> its one line and exit 3."""
    try:
        common.run_cli(main)
    except Diverged as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(3)


# ======================================================================================
# A step of several passes
# ======================================================================================

@contextlib.contextmanager
def grad_sync(model, last):
    """Around the forward and the backward of one loss of a step that backpropagates several: under DDP
    every pass but the step's `last` runs in `no_sync()`, so the gradients add up on each rank and the last
    backward all-reduces their sum once (the same average as an all-reduce per backward); in one process
    nothing changes. DDP decides at the forward whether the backward all-reduces, hence the forward inside.
    DDP broadcasts rank 0's buffers (BN statistics) before a forward only when the previous forward
    synchronised; it is told to go on doing so after a no_sync pass, so the buffers follow the same path
    as without no_sync."""
    if last or not isinstance(model, nn.parallel.DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield
    model.require_forward_param_sync = True


def cast_once(amp):
    """Around a step's passes, each in its own `amp.autocast()`: the low-precision copies of the trainable
    weights are made once per step, not once per pass. Autocast caches them until the outermost autocast
    region ends; this outer region has autocast off, so the code between the passes and the backward passes
    run as outside any region (fp32 stays fp32). End it before the optimiser step (the weights change). Give
    each pass its own backward: one backward through two passes would add their gradients at the shared
    cast, in low precision (separate regions add them in fp32)."""
    return torch.autocast(amp.device_type, dtype=amp.dtype, enabled=False)


# ======================================================================================
# The compiled step (--compile)
# ======================================================================================

def check_compile_args(args):
    """--compile-mode / --compile-backend need --compile; a mode other than default is inductor's (DataError)."""
    if not hasattr(args, "compile"):
        return
    changed = [f"--compile-{k} {getattr(args, 'compile_' + k)}" for k, default in (("mode", "default"),
               ("backend", "inductor")) if getattr(args, "compile_" + k) != default]
    if changed and not args.compile:
        raise DataError(f"{changed[0]} has an effect with --compile only (add --compile, or drop it)")
    if args.compile_mode != "default" and args.compile_backend != "inductor":
        raise DataError(f"--compile-mode {args.compile_mode} is an inductor mode (this run: --compile-backend "
                        f"{args.compile_backend}); use --compile-backend inductor or --compile-mode default")


def compile_networks(args, *networks):
    """--compile: torch.compile each network in place (nn.Module.compile: its state_dict keys stay unprefixed,
    so checkpoints are the same with and without --compile). A DDP wrapper is compiled as a whole, as PyTorch
    documents for DDP (wrap, then compile: TorchDynamo splits the graph at DDP's bucket boundaries); a DAFormer/
    HRDA segmentor as its encoder and decode head, which `forward_features` calls past the segmentor's own
    forward. common.evaluate runs eagerly (torch.compiler.set_stance): no recompile for eval mode. Donated buffers
    are off: the feature-distance pass of the MiT stacks backpropagates the source graph twice (retain_graph), which
    a compiled backward that reuses its saved tensors' memory refuses."""
    if not args.compile:
        return
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    for net in dict.fromkeys(n for n in networks if n is not None):   # each module once
        for part in [net.backbone, net.decode_head] if isinstance(net, common.DAFormer) else [net]:
            part.compile(mode=args.compile_mode, backend=args.compile_backend)

