"""Training-step speed of every method script against the floor of its network passes, fp32 and --amp.

Each row runs a script's own `main(argv)` in this process (its real loop: data loading, mixing,
augmentation, EMA, optimiser, logging) with a short --iters; `training.Logger.log`, called once per
iteration by every loop, is wrapped here to take the time of each call (after torch.cuda.synchronize on
CUDA) and to stop the run after the last timed step. ms/iter is the median over --steps steps after
--warmup steps. Beside it, THE FLOOR: only the network passes the method inherently needs at the same
batch and sizes (each student forward + backward, each teacher or no-grad forward, each discriminator
pass), built from common.py's model classes on random inputs, timed the same way. On CUDA the timed steps
run under torch.cuda.set_sync_debug_mode(--sync-debug): every host sync the step makes is counted and
located (file:line). Beside ms/iter: the host's time to issue a step (taken before the clock's
synchronisation: far below ms/iter when the GPU is the bottleneck, close to it when the step is
launch-bound), the achieved TFLOP/s of the floor's network passes (FLOP counted by torch's
FlopCounterMode on fake tensors), and max_memory_reserved beside max_memory_allocated. --compile on/both runs
each script (also) with its --compile flag (--compile-mode, --compile-backend passed through) beside the eager
rows; start-up (the script's main() to the end of the warm-up: set-up, the first iterations' compile, the warm-up
steps) is recorded beside ms/iter, so eager and --compile rows show what compiling costs once and saves per step.
The floor stays eager.

Paper preset: full DeepLabv2-ResNet-101, each script's PAPER sizes and batch composition, on demo scenes
upscaled to the real resolutions (GTA5 1914x1052, SYNTHIA 1280x760, Cityscapes 2048x1024, written once
under <data-root>/bench_paper); the --stack daformer rows train MiT-B5 + DAFormer head at DAFormer's sizes
(the scripts' --stack defaults), their floor adding the frozen ImageNet encoder's no-grad forward (feature
distance); the --stack hrda rows train MiT-B5 + HRDA's head on 1024x1024 crops (GTA5 fit into 2560x1440,
Cityscapes 2048x1024), their floor's student passes through model(x, box) (context view + one detail window),
the teacher's through model(x) (context view + overlapping detail windows), the frozen encoder's on the
context view. --small: --layers 1 1 1 1 (MiT tiny) and 1/8-scale data and sizes (HRDA: 128x128 crops), to
check the harness and measure host-side overhead on a CPU. DLDM's stages (M_RL, M_SL, student) and CAMix's two
phases are separate rows. Results are merged into --json (one record per row, device, preset and
precision) and the "Training-step speed" section of --results is regenerated from it.

    python benchmarks/speed.py --device cuda                             # paper settings, >= 50 steps
    OMP_NUM_THREADS=1 python benchmarks/speed.py --device cpu --small --steps 10 --warmup 2 --threads 1 --workers 0
"""
import contextlib
import datetime
import gc
import importlib
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import training  # noqa: E402
import demo  # noqa: E402

FULL_SIZES = {"gta5": (1914, 1052), "synthia": (1280, 760), "cityscapes": (2048, 1024)}  # W, H on disk
SCALE = {"paper": 1.0, "small": 1 / 8}
N_IMAGES = 8  # per dataset (Cityscapes: 8 train + 2 val)
# Network input sizes (H, W) per preset: the paper's (GTA5 1280x720, Cityscapes 1024x512, 512x512 crops,
# CAMix's crops from the full 2048x1024 frame) and the --small ones, passed as flags to the scripts.
# HRDA (--stack hrda): 1024x1024 crops of GTA5 at 2560x1440 and Cityscapes at 2048x1024, the context view at half
# resolution (the frozen encoder's FD input), 512x512 detail windows; --small: a 128x128 crop (sides divisible by 16).
SIZES = {"paper": {"source": (720, 1280), "target": (512, 1024), "crop": (512, 512), "full": (1024, 2048),
                   "hrda_source": (1440, 2560), "hrda_crop": (1024, 1024), "hrda_context": (512, 512)},
         "small": {"source": (90, 160), "target": (64, 128), "crop": (64, 64), "full": (128, 256),
                   "hrda_source": (180, 320), "hrda_crop": (128, 128), "hrda_context": (64, 64)}}
# The networks a row can train, by its floor's "network" key (default deeplabv2): the constructor (the floor's
# "model" options, the size, stochastic=False for a teacher copy), the scripts' flags choosing the size, and the
# size of the full network (ResNet-101 layers; MiT-B5) and of the light one (--small, the tests), and the student's
# training forward when it is not model(x) ("forward": HRDA's takes a detail window); everything else reads this table.
NETWORKS = {
    "deeplabv2": {"build": lambda opts, size, stochastic: common.DeepLabV2(19, layers=size, **opts),
                  "flags": lambda size: ["--layers", *map(str, size)],
                  "sizes": {"paper": [3, 4, 23, 3], "small": [1, 1, 1, 1]}},
    "daformer": {"build": lambda opts, size, stochastic: common.daformer_segmentor(19, size, stochastic=stochastic,
                                                                                  **opts),
                 "flags": lambda size: ["--mit", size], "sizes": {"paper": "b5", "small": "tiny"}},
    "hrda": {"build": lambda opts, size, stochastic: common.hrda_segmentor(
                 19, size, stochastic=stochastic, detail_crop=hrda_detail(size), **opts),
             "flags": lambda size: ["--mit", size], "sizes": {"paper": "b5", "small": "tiny"},
             "forward": lambda model, x: hrda_train_forward(model, x)},
}
# The floor of a row: its network and options, the student's passes (each inner list is forwarded, then one
# backward, as the script does), the no-grad teacher forwards (eval-mode teachers for DLDM) and the no-grad
# forwards of a frozen copy of the encoder (DAFormer's ImageNet feature distance).
MEAN_TEACHER = {"model": {}, "student": [["crop", "crop"]], "teachers": ["crop"], "teacher_eval": False}
DAFORMER_FD = {"network": "daformer", "model": {}, "teachers": ["crop"], "frozen_encoder": ["crop"],
               "teacher_eval": False}
HRDA_FD = {"network": "hrda", "model": {}, "teachers": ["hrda_crop"], "frozen_encoder": ["hrda_context"],
           "teacher_eval": False}   # teacher: overlapping detail windows; FD on the source's context view
ROWS = [  # (script, stage, arguments besides data, sizes and run settings, floor)
    ("dacs.py", None, ["--source", "gta5"], MEAN_TEACHER),
    ("classmix_ssl.py", None, ["--dataset", "cityscapes", "--n-labeled", "4"],
     {"model": {}, "student": [["target", "target"]], "teachers": ["target"], "teacher_eval": False}),
    ("iidm.py", None, ["--source", "gta5", "--n-labeled", "4"],
     {"model": {"style": "pytorch", "freeze_bn_affine": False}, "student": [["crop"]] * 4, "teachers": ["crop"],
      "teacher_eval": False}),
    ("camix.py", "phase B (CAMix)", ["--source", "gta5", "--warmup-iters", "0", "--build-prior"], MEAN_TEACHER),
    ("camix.py", "phase A (DACS warm-up)", ["--source", "gta5", "--warmup-iters", "{iters}"], MEAN_TEACHER),
    ("asss.py", None, ["--source", "gta5", "--preset", "ga-csa", "--n-labeled", "4"], "asss"),
    ("dldm.py", "M_RL", ["--source", "gta5", "--n-labeled", "4", "--stage", "rl"],
     {"model": {"multi_level": True, "aspp_full": True}, "student": [["target"]], "teachers": [],
      "teacher_eval": True}),
    ("dldm.py", "M_SL", ["--source", "gta5", "--n-labeled", "4", "--stage", "sl"],
     {"model": {"multi_level": True, "aspp_full": True}, "student": [["source"], ["target"]], "teachers": [],
      "teacher_eval": True}),
    ("dldm.py", "student", ["--source", "gta5", "--n-labeled", "4", "--stage", "student", "--teachers", "{teacher}",
                            "{teacher}"],
     {"model": {"multi_level": True, "aspp_full": True}, "student": [["target"], ["target"]],
      "teachers": ["target", "target"], "teacher_eval": True}),
    ("dacs.py", "--stack daformer", ["--source", "gta5", "--stack", "daformer"],
     {**DAFORMER_FD, "student": [["crop"], ["crop"]]}),                      # source (+ FD backward), mixed
    ("iidm.py", "--stack daformer", ["--source", "gta5", "--n-labeled", "4", "--stack", "daformer"],
     {**DAFORMER_FD, "student": [["crop"]] * 4}),                            # source, labeled target, two mixes
    ("dacs.py", "--stack hrda", ["--source", "gta5", "--stack", "hrda"],
     {**HRDA_FD, "student": [["hrda_crop"]] * 2}),                           # source (+ FD backward), mixed
    ("iidm.py", "--stack hrda --mic", ["--source", "gta5", "--n-labeled", "4", "--stack", "hrda", "--mic"],
     {**HRDA_FD, "student": [["hrda_crop"]] * 5}),                           # IIDM's four streams, masked x_u
]


def hrda_detail(size):
    """HRDA's detail window for a MiT size: half the crop (512x512 for B5 at paper sizes, 64x64 for --small)."""
    crop = SIZES["paper" if size == "b5" else "small"]["hrda_crop"]
    return tuple(c // 2 for c in crop)


def hrda_train_forward(model, x):
    """HRDA's student pass (model(x, box)): the fused and detail logits over a detail window of half the crop."""
    h, w = x.shape[2:]
    out = model(x, (h // 4, h // 4 + h // 2, w // 4, w // 4 + w // 2))
    return out.fused, out.detail


def row_name(script, stage):
    """'dldm.py M_RL', 'dacs.py': how a row is named in tables and --scripts."""
    return script + (f" {stage}" if stage else "")


def row_network(row):
    """The network kind a row trains (a key of NETWORKS)."""
    return row[3].get("network", "deeplabv2") if isinstance(row[3], dict) else "deeplabv2"


def network_size(kind, layers):
    """The size of a `kind` network at the scale that DeepLabV2 `layers` stand for: the full network for the
    paper's ResNet-101 layers, the light one for any other (--small, the tests)."""
    full = list(layers) == NETWORKS["deeplabv2"]["sizes"]["paper"]
    return list(layers) if kind == "deeplabv2" else NETWORKS[kind]["sizes"]["paper" if full else "small"]


# ------------------------------------------------------------------------------------------- data

def write_png16(path, rgb16):
    """An HxWx3 uint16 array as a 16-bit RGB PNG (the SYNTHIA GT/LABELS encoding; PIL writes no 16-bit RGB)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    chunk = lambda kind, data: (len(data).to_bytes(4, "big") + kind + data  # noqa: E731
                                + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big"))
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))


def write_bench_data(data_root, preset):
    """GTA5, SYNTHIA and Cityscapes trees (official layouts) of demo scenes resized to the real resolutions
    (x 1/8 for --small): 8 images each, Cityscapes 8 train + 2 val; written once, then reused."""
    out = Path(data_root) / f"bench_{preset}"
    if (out / ".complete").is_file():
        return out
    src = demo.ensure_demo(data_root)
    size = {k: (round(w * SCALE[preset]), round(h * SCALE[preset])) for k, (w, h) in FULL_SIZES.items()}
    synthia_id = np.full(256, 0, np.uint16)  # Cityscapes label id -> SYNTHIA raw id (0 = void)
    for raw, train_id in enumerate(common.SYNTHIA_TO_TRAINID):
        if train_id != common.IGNORE:
            synthia_id[common.TRAINID_TO_LABELID[train_id]] = raw
    tmp = out.with_name(out.name + ".tmp")
    for d in ("gta5/images", "gta5/labels", "synthia/RGB", "synthia/GT/LABELS"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    pairs = zip(sorted((src / "gta5" / "images").glob("*.png"))[:N_IMAGES],
                sorted((src / "gta5" / "labels").glob("*.png"))[:N_IMAGES])
    for img, lab in pairs:
        Image.open(img).resize(size["gta5"], Image.BILINEAR).save(tmp / "gta5" / "images" / img.name)
        Image.open(lab).resize(size["gta5"], Image.NEAREST).save(tmp / "gta5" / "labels" / lab.name)
        Image.open(img).resize(size["synthia"], Image.BILINEAR).save(tmp / "synthia" / "RGB" / img.name)
        ids = np.asarray(Image.open(lab).resize(size["synthia"], Image.NEAREST))
        write_png16(tmp / "synthia" / "GT" / "LABELS" / lab.name, np.stack([synthia_id[ids]] * 3, -1))
    for split, n in (("train", N_IMAGES), ("val", 2)):
        for img in sorted((src / "cityscapes" / "leftImg8bit" / split).rglob("*.png"))[:n]:
            city, stem = img.parent.name, img.name.replace("_leftImg8bit.png", "")
            lab = src / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            for path, interp, sub in ((img, Image.BILINEAR, "leftImg8bit"), (lab, Image.NEAREST, "gtFine")):
                d = tmp / "cityscapes" / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.open(path).resize(size["cityscapes"], interp).save(d / path.name)
    (tmp / ".complete").write_text(f"benchmark data, {preset} preset\n")
    tmp.rename(out)
    return out


def size_flags(script, preset, stack="deeplabv2"):
    """--small: the scripts' size flags at 1/8 scale (the paper preset keeps every script's defaults)."""
    if preset == "paper":
        return []
    if script == "dacs.py" and stack == "daformer":   # DAFormer's source RCS (3000 px at full scale)
        return size_flags(script, preset) + ["--rcs-min-pixels", "47"]
    s = SIZES[preset]
    wh = lambda k: [str(s[k][1]), str(s[k][0])]  # noqa: E731
    hw = lambda k: [str(v) for v in s[k]]  # noqa: E731
    if stack == "hrda":   # HRDA's sizes at 1/8 scale (crop sides divisible by 16, images at least the crop)
        return ["--source-size", *wh("hrda_source"), "--target-size", *wh("full"), "--crop-size", *hw("hrda_crop"),
                "--rcs-min-pixels", "47"]
    flags = {"dacs.py": ["--source-size", *wh("source"), "--target-size", *wh("target"), "--crop-size", *hw("crop")],
             "classmix_ssl.py": ["--target-size", *wh("target")],
             "iidm.py": ["--source-size", *wh("source"), "--target-size", *wh("target"), "--crop-size", *hw("crop"),
                         "--rcs-min-pixels", "47"],  # 3000 px of a 1914x1052 label at 1/8 scale
             "camix.py": ["--source-size", *wh("source"), "--target-size", *wh("full"), "--crop-size", *hw("crop"),
                          "--val-size", *wh("target")],
             "asss.py": ["--source-size", *wh("source"), "--target-size", *wh("target")],
             "dldm.py": ["--source-size", *wh("source"), "--target-size", *wh("target")]}
    return flags[script]


def script_argv(row, preset, bench, out_dir, iters, device, amp, workers, layers, teacher=""):
    """The full argument list of one row's run."""
    script, _, extra, _ = row
    extra = [a.format(iters=iters, teacher=teacher) for a in extra]
    kind = row_network(row)
    return [*extra, *size_flags(script, preset, kind), "--gta5-root", str(bench / "gta5"),
            "--synthia-root", str(bench / "synthia"), "--cityscapes-root", str(bench / "cityscapes"),
            "--init", "none", "--iters", str(iters), "--log-every", str(iters), "--eval-every", "0",
            "--save-every", str(iters), "--device", device, "--workers", str(workers), "--out-dir", str(out_dir),
            "--amp" if amp else "--no-amp", *NETWORKS[kind]["flags"](network_size(kind, layers))]


def write_teacher(path, layers, num_classes=19):
    """A stand-in teacher checkpoint for DLDM's student stage (random weights: speed does not depend on them)."""
    model = common.DeepLabV2(num_classes, multi_level=True, aspp_full=True, layers=layers)
    torch.save({"model": model.state_dict()}, path)
    return path


# ------------------------------------------------------------------------------------------- timing

class StopRun(Exception):
    """Raised by the timing hook after the last timed step: ends the script's run there."""


@contextlib.contextmanager
def restored_signal_handlers():
    """The scripts install SIGTERM/SIGINT handlers and restore them only when their loop ends normally."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def time_script(module, argv, device, warmup, steps, sync_debug):
    """Run module.main(argv) with training.Logger.log wrapped: per-step ms (median source), the host's time to
    issue each step, the start-up (main() to the end of the warm-up, --compile's compile included), peak
    allocated and reserved GiB, syncs.

    The wrapper takes the time at each call (one per iteration, after synchronising on CUDA; the time before
    that synchronisation is when the host had issued the whole step), turns the
    sync debug mode on for the timed steps and raises StopRun at the call that closes the last one, before
    the logger's own log-step work (its one host sync) and before any checkpoint or evaluation.
    """
    cuda = device.type == "cuda"
    stamps, issued, original = [], [], training.Logger.log

    def timed_log(logger, i, losses, lr):
        issued.append(time.perf_counter())         # the host has issued the whole step
        if cuda:
            torch.cuda.set_sync_debug_mode(0)      # the clock's own synchronisation is not the step's
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == warmup + steps + 1:
            raise StopRun
        if cuda and len(stamps) == warmup + 1:
            torch.cuda.reset_peak_memory_stats()
        if cuda and len(stamps) > warmup:
            torch.cuda.set_sync_debug_mode(sync_debug)
        return original(logger, i, losses, lr)

    with restored_signal_handlers(), mock.patch.object(training.Logger, "log", timed_log), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            module.main(argv)
        except StopRun:
            pass
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    if len(stamps) != warmup + steps + 1:
        raise RuntimeError(f"{module.__name__}: the loop ended after {len(stamps)} iterations")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"times_ms": [1000 * (b - a) for a, b in zip(stamps[warmup:], stamps[warmup + 1:])],
            "startup_s": stamps[warmup] - start,
            "host_ms": [1000 * (b - a) for a, b in zip(stamps[warmup:], issued[warmup + 1:])],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
            "host_syncs_per_step": len(syncs) / steps if cuda else None,
            "sync_sites": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})}


def scalar(out):
    """A loss touching every output of a forward (one or two heads)."""
    return sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,)))


def mean_teacher_floor(spec, sizes, batch, layers, device, amp):
    """The passes of a mean-teacher or distillation step: teacher forwards, frozen-encoder forwards (no grad),
    then student forwards + backwards; the network of spec["network"] at the scale `layers` stand for."""
    kind = spec.get("network", "deeplabv2")
    size = network_size(kind, layers)

    def build(stochastic=True):
        return training.prepare_model(NETWORKS[kind]["build"](spec["model"], size, stochastic), device, amp)
    student = build().train()
    forward = NETWORKS[kind].get("forward", lambda model, x: model(x))
    teachers = [build(False).train(not spec["teacher_eval"]).requires_grad_(False) for _ in spec["teachers"]]
    encoders = [build(False).backbone.eval().requires_grad_(False) for _ in spec.get("frozen_encoder", [])]
    image = lambda name: torch.randn(batch, 3, *sizes[name], device=device)  # noqa: E731
    student_inputs = [[image(name) for name in group] for group in spec["student"]]
    no_grad_inputs = [image(name) for name in spec["teachers"] + spec.get("frozen_encoder", [])]

    def step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad(), amp.autocast():
            for model, x in zip(teachers + encoders, no_grad_inputs):
                model(x)
        for group in student_inputs:
            with amp.autocast():
                loss = sum(scalar(forward(student, x)) for x in group)
            amp.backward(loss)
    return step


def asss_floor(sizes, batch, layers, device, amp):
    """ASS (GA + CSA, s2t) passes: G on the source with D_g1/D_g2 on its upsampled maps and D_s on its
    layer4 features (D frozen), G on the labeled target, G without a graph on the unlabeled target, then
    D_g1/D_g2 on source and unlabeled-target maps and D_s on source and labeled-target features (detached)."""
    import asss
    prepare = lambda m: training.prepare_model(m, device, amp)  # noqa: E731
    g = prepare(common.DeepLabV2(19, multi_level=True, layers=layers)).train()
    d_g = [prepare(common.FCDiscriminator(19)) for _ in range(2)]
    d_s = prepare(asss.semantic_discriminator("csa"))
    discs = [*d_g, d_s]
    x_s, x_l, x_u = (torch.randn(batch, 3, *sizes[k], device=device) for k in ("source", "target", "target"))

    def step():
        for m in (g, *discs):
            m.zero_grad(set_to_none=True)
        for d in discs:                               # D frozen while G learns through it
            d.requires_grad_(False)
        with amp.autocast():
            p1, p2, f_s = asss.segment(g, x_s)
            maps_s = [asss.d_input(p, x_s.shape[2:]) for p in (p1, p2)]
            loss = scalar((p1, p2)) + sum(scalar(d(m)) for d, m in zip(d_g, maps_s)) + scalar(d_s(f_s))
        amp.backward(loss)
        with amp.autocast():
            p1, p2, f_l = asss.segment(g, x_l)
            loss = scalar((p1, p2))
        amp.backward(loss)
        with torch.no_grad(), amp.autocast():
            p1, p2, _ = asss.segment(g, x_u)
            maps_u = [asss.d_input(p, x_u.shape[2:]) for p in (p1, p2)]
        for d in discs:
            d.requires_grad_(True)
        with amp.autocast():
            loss = sum(scalar(d(a.detach())) + scalar(d(b)) for d, a, b in zip(d_g, maps_s, maps_u))
            loss = loss + scalar(d_s(f_s.detach())) + scalar(d_s(f_l.detach()))
        amp.backward(loss)
    return step


def time_floor(row, sizes, batch, layers, device, amp, warmup, steps):
    """Median ms and peak GiB of the row's floor passes, timed per call like the step (warm-up, sync, median).

    Not torch.utils.benchmark.Timer: its blocked measurements average over blocks, while the step's times
    are single iterations of the script's loop; the ratio step/floor needs the same statistic on both.
    """
    step = asss_floor(sizes, batch, layers, device, amp) if row[3] == "asss" else \
        mean_teacher_floor(row[3], sizes, batch, layers, device, amp)
    cuda = device.type == "cuda"
    times = []
    for k in range(warmup + steps):
        if cuda and k == warmup:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if k >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None


def floor_flops(row, sizes, batch, layers):
    """FLOP of one floor step (every network pass; a backward counted as torch's FlopCounterMode does, about
    twice its forward): counted on fake tensors, no compute (a 512x512 DeepLabv2 forward is 370.6 GFLOP).
    The networks are built for real (MiT draws its stochastic-depth rates on the host), then get fake weights."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake_weights(model, device, amp):   # nn.Module.to cannot convert fake parameters: prepare_model skipped
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(p.detach()), p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fake_mode.from_tensor(b)
        return model
    cpu = torch.device("cpu")
    with mock.patch.object(training, "prepare_model", fake_weights):
        step = asss_floor(sizes, batch, layers, cpu, training.Amp(cpu, False)) if row[3] == "asss" else \
            mean_teacher_floor(row[3], sizes, batch, layers, cpu, training.Amp(cpu, False))
    with fake_mode, FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def release_memory(device):
    """Free the previous run's models and loaders (and the CUDA cache) before the next measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(row, args, device, bench, amp, compile, flops, meta):
    """One record: the script's step and the floor (eager) for one row, precision and --compile."""
    script, stage, _, _ = row
    module = importlib.import_module(script[:-3])
    iters = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        teacher = write_teacher(Path(tmp) / "teacher.pth", args.layers) if script == "dldm.py" else ""
        argv = script_argv(row, args.preset, bench, Path(tmp) / "run", iters, device.type, amp, args.workers,
                           args.layers, teacher)
        flags = ["--compile", "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend]
        step = time_script(module, argv + flags * compile, device, args.warmup, args.steps, args.sync_debug)
    release_memory(device)
    batch = module.PAPER["batch_size"][0]
    floor_ms, floor_mem = time_floor(row, SIZES[args.preset], batch, args.layers, device, training.Amp(device, amp),
                                     args.warmup, args.steps)
    release_memory(device)
    ms = statistics.median(step["times_ms"])
    rounded = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {"script": script, "stage": stage, "preset": args.preset, "device": meta["device"], "amp": amp,
            "compile": compile, "compile_mode": args.compile_mode if compile else None,
            "compile_backend": args.compile_backend if compile else None, "startup_s": round(step["startup_s"], 1),
            "ms_per_iter": round(ms, 2), "floor_ms_per_iter": round(floor_ms, 2),
            "step_over_floor": round(ms / floor_ms, 3),
            "host_ms_per_iter": round(statistics.median(step["host_ms"]), 2),
            "floor_gflop": round(flops / 1e9, 1), "tflops_step": round(flops / ms / 1e9, 4),
            "tflops_floor": round(flops / floor_ms / 1e9, 4),
            "peak_mem_gb": rounded(step["peak_mem_gb"]), "peak_reserved_gb": rounded(step["peak_reserved_gb"]),
            "floor_peak_mem_gb": None if floor_mem is None else round(floor_mem, 3),
            "host_syncs_per_step": step["host_syncs_per_step"], "sync_sites": step["sync_sites"],
            "batch_per_stream": batch, "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "workers": args.workers, "layers": list(args.layers), "network": row_network(row),
            "network_size": network_size(row_network(row), args.layers), **meta}


# ------------------------------------------------------------------------------------------- output

def git_commit():
    """Short hash of HEAD, with '-dirty' when tracked files other than the benchmark outputs differ from it."""
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    outputs = [f":!benchmarks/{name}" for name in ("RESULTS.md", "speed.json", "loader.json", "memory.json")]
    return run("rev-parse", "--short", "HEAD") + ("-dirty" if run("status", "--porcelain", "-uno", "--", ".", *outputs)
                                                  else "")


def device_name(device):
    """'cpu' or 'cuda (<GPU name>)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def merge_records(path, new):
    """Records of --json with those of this run replacing the ones for the same row, preset, device, amp."""
    key = lambda r: (r["script"], r["stage"], r["preset"], r["device"].split(" ")[0], r["amp"],  # noqa: E731
                     compile_variant(r))
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else []
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def compile_variant(record):
    """'' for an eager record, else ' --compile' with its mode and backend where not the defaults."""
    if not record.get("compile", False):
        return ""
    mode, backend = record.get("compile_mode") or "default", record.get("compile_backend") or "inductor"
    return " --compile" + f" {mode}" * (mode != "default") + f" ({backend})" * (backend != "inductor")


def fmt(value, digits=1):
    """A table cell: the number, or a dash when not measured."""
    return "–" if value is None else f"{value:.{digits}f}"


def results_section(records):
    """The 'Training-step speed' section of RESULTS.md, generated from the records."""
    lines = ["## Training-step speed (`benchmarks/speed.py`)", "",
             "Generated by `benchmarks/speed.py` from `benchmarks/speed.json`. ms/iter: median of the timed steps of "
             "the script's own loop (its `main` run in-process, timed at each `Logger.log` call); floor: the same "
             "statistic for only the network passes the step inherently needs (student forward + backward, teacher "
             "or no-grad forwards, discriminator passes) at the same batch and sizes; step/floor: their ratio. "
             "amp = `--amp` (bf16 autocast + channels_last). Host issue: median time until the host has issued the "
             "step (before the clock's synchronisation; equals ms/iter on the CPU). TFLOP/s: FLOP of the floor's "
             "network passes (torch FlopCounterMode; a 512x512 DeepLabv2 forward is 370.6 GFLOP) per step time; "
             "for `--stack daformer` the floor's passes are the student's (fwd + bwd per stream), the EMA "
             "teacher's and the frozen ImageNet encoder's (no-grad forwards). "
             "Peak / reserved: torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps. "
             "Host syncs: per timed step under `torch.cuda.set_sync_debug_mode` (CUDA only). Start-up: the "
             "script's main() to the end of the warm-up steps (set-up, data loaders, and with `--compile` the "
             "compile of the first iterations); a `--compile` row (torch.compile, inductor unless named) beside "
             "the eager one.", ""]
    for preset, title in (("paper", "Paper settings (DeepLabv2-ResNet-101, MiT-B5 for --stack daformer/hrda; the "
                                    "scripts' PAPER sizes and batches)"),
                          ("small", "--small (layers 1 1 1 1 / MiT tiny, 1/8-scale data and sizes): host-side "
                                    "overhead")):
        rows = [r for r in records if r["preset"] == preset]
        lines += [f"### {title}", ""]
        for dev in sorted({r["device"] for r in rows}) or []:
            sel = [r for r in rows if r["device"] == dev]
            runs = sorted({(r["command"], r["date"], r["commit"], r["machine"], r["threads"], r["workers"],
                            r["steps"], r["warmup"]) for r in sel}, key=lambda run: run[1])
            lines += [f"Device {dev}, torch {sel[0]['torch']}. Runs:", ""]
            lines += [f"- `{c}` ({date}, commit {commit}; {machine}; {threads} thread(s), --workers {w}; median of {n} "
                      f"steps after {wu})" for c, date, commit, machine, threads, w, n, wu in runs]
            lines += ["",
                      "| script | fp32 ms/iter | fp32 floor | step/floor | amp ms/iter | amp floor | step/floor "
                      "| host issue ms fp32 / amp | TFLOP/s fp32 / amp (floor GFLOP) | peak GiB fp32 / amp "
                      "| reserved GiB fp32 / amp | host syncs/step | start-up s fp32 / amp |", "|---" * 13 + "|"]
            variants = sorted({compile_variant(r) for r in sel})
            for script, stage, _, _ in ROWS:
                for variant in variants:
                    pair = {r["amp"]: r for r in sel if (r["script"], r["stage"], compile_variant(r))
                            == (script, stage, variant)}
                    if not pair:
                        continue
                    cells = []
                    for amp in (False, True):
                        r = pair.get(amp)
                        cells += [fmt(r and r["ms_per_iter"]), fmt(r and r["floor_ms_per_iter"]),
                                  fmt(r and r["step_over_floor"], 2)]
                    both = lambda key, digits=2: " / ".join(  # noqa: E731
                        fmt(pair[a].get(key), digits) if a in pair else "–" for a in (False, True))
                    gflop = next(iter(pair.values())).get("floor_gflop")
                    cells += [both("host_ms_per_iter", 1), both("tflops_step") + f" ({fmt(gflop)})",
                              both("peak_mem_gb"), both("peak_reserved_gb"), both("host_syncs_per_step"),
                              both("startup_s", 1)]
                    lines.append(f"| {row_name(script, stage)}{variant} | " + " | ".join(cells) + " |")
            lines.append("")
            lines += [f"- host syncs of {row_name(r['script'], r['stage'])}{compile_variant(r)} "
                      f"({'amp' if r['amp'] else 'fp32'}): " + ", ".join(r["sync_sites"])
                      for r in sel if r["sync_sites"]]
        if preset == "paper" and not any(r["device"].startswith("cuda") for r in rows):
            lines += ["CUDA, paper settings: not measured — no GPU in this session (`python benchmarks/speed.py "
                      "--device cuda` fills these rows):", "", "| script | fp32 ms/iter | floor | amp ms/iter | floor "
                      "| peak GiB | host syncs/step |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {row_name(s, st)} | not measured — no GPU in this session | | | | | |" for s, st, _, _ in ROWS]
            lines.append("")
    return "\n".join(lines)


def replace_section(text, title_prefix, section):
    """Replace the first `## ...` section whose title starts with one of `title_prefix` by `section`
    (appended when none does); the other sections are left as they are."""
    parts = text.rstrip("\n").split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    body = section.rstrip("\n")
    for k, s in enumerate(sections):
        if any(s.startswith(p) for p in title_prefix):
            sections[k] = body
            break
    else:
        sections.append(body)
    return "\n\n".join([head.rstrip("\n"), *[s.rstrip("\n") for s in sections]]) + "\n"


# ------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter)
    p.add_argument("--data-root", default="./data", help="where the demo and benchmark data are written")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="--layers 1 1 1 1, 1/8-scale data and sizes (CPU checks)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row (>= 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotuning, allocator)")
    p.add_argument("--amp", choices=["both", "off", "on"], default="both", help="fp32 and --amp rows, or one")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="eager rows, --compile rows, or both (the scripts' torch.compile of their networks)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="the scripts' --compile-mode in the --compile rows")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
                   help="the scripts' --compile-backend in the --compile rows (aot_eager: the CPU tests)")
    p.add_argument("--scripts", nargs="+", default=None, metavar="ROW",
                   help="rows to run (default all): " + ", ".join(row_name(s, st) for s, st, _, _ in ROWS)
                   + "; a script name selects all its rows")
    p.add_argument("--workers", type=int, default=None, help="--workers of the scripts (default: theirs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--sync-debug", choices=["warn", "error"], default="warn",
                   help="torch.cuda.set_sync_debug_mode during the timed steps: count syncs, or stop at the first")
    p.add_argument("--machine", default="this machine", help="how the records name the machine (and its load)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "speed.json"), help="records, merged")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="table regenerated here")
    args = p.parse_args(argv)
    args.preset = "small" if args.small else "paper"
    args.layers = [1, 1, 1, 1] if args.small else [3, 4, 23, 3]
    if args.steps < 1 or args.warmup < 0 or (args.workers is not None and args.workers < 0):
        raise common.DataError("--steps >= 1, --warmup >= 0 and --workers >= 0 expected")
    if args.device == "cuda" and args.steps < 50:
        raise common.DataError(f"--steps {args.steps}: the CUDA medians need >= 50 steps (fewer only on the CPU)")
    if args.compile == "off" and (args.compile_mode, args.compile_backend) != ("default", "inductor"):
        raise common.DataError("--compile-mode/--compile-backend set the --compile rows: add --compile on or both")
    known = {row_name(s, st) for s, st, _, _ in ROWS} | {s for s, _, _, _ in ROWS}
    bad = [name for name in args.scripts or [] if name not in known]
    if bad:
        raise common.DataError(f"--scripts {bad[0]}: expected one of {', '.join(sorted(known))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = training.select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = training.shared_parser({}).get_default("workers")
    rows = [r for r in ROWS if args.scripts is None or r[0] in args.scripts or row_name(r[0], r[1]) in args.scripts]
    bench = write_bench_data(args.data_root, args.preset)
    meta = {"device": device_name(device), "machine": args.machine, "torch": torch.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    records = []
    for row in rows:
        module = importlib.import_module(row[0][:-3])
        flops = floor_flops(row, SIZES[args.preset], module.PAPER["batch_size"][0], args.layers)
        for compile in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
            for amp in {"both": (False, True), "off": (False,), "on": (True,)}[args.amp]:
                rec = measure(row, args, device, bench, amp, compile, flops, meta)
                records.append(rec)
                save(args, records)
                name = f"{row_name(row[0], row[1])}{compile_variant(rec)}"
                print(f"{name:42s} {'amp ' if amp else 'fp32'} {rec['ms_per_iter']:9.1f} ms/iter  "
                      f"floor {rec['floor_ms_per_iter']:9.1f}  x{rec['step_over_floor']:.2f}  host issue "
                      f"{rec['host_ms_per_iter']:.1f} ms  {rec['tflops_step']:.2f} TFLOP/s  peak {rec['peak_mem_gb']}"
                      f" / reserved {rec['peak_reserved_gb']} GiB  syncs/step {rec['host_syncs_per_step']}  "
                      f"start-up {rec['startup_s']} s "
                      f"{' '.join(rec['sync_sites'])}", flush=True)
    return save(args, records)


def save(args, records):
    """Merge the records into --json and regenerate the table of --results; done after every record, so a
    run cut short (gpu_check.sh's time limit) keeps what it measured."""
    records = merge_records(args.json, records)
    common.atomic_write_text(args.json, json.dumps(records, indent=1) + "\n")
    results = Path(args.results)
    text = results.read_text() if results.is_file() else "# Measured results\n"
    common.atomic_write_text(results, replace_section(text, ("## Training-step speed", "## GPU step speed"),
                                                      results_section(records)))
    return records


if __name__ == "__main__":
    training.run_script(main)
