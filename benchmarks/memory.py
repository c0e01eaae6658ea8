"""Per training step, on the CPU: the aten ops each method's step issues and its peak live device memory at
paper settings (DeepLabv2-ResNet-101; MiT-B5 + DAFormer head for the --stack daformer rows, MiT-B5 + HRDA's
head for the --stack hrda rows at HRDA's 1024x1024 crops), fp32 and --amp.

Both run a script's own `main(argv)` in this process (its real loop: data, mixing, augmentation, teacher,
EMA, optimiser) with speed.py's rows, arguments and benchmark data, cut into steps at the
`training.Logger.log` call every loop makes once per iteration; the run stops after step 2 (no
checkpoint, no evaluation). Step 2 is the one measured: step 1 creates the optimiser's momentum.

OP COUNT. A TorchDispatchMode counts every aten op that reaches the dispatcher during the step (forward,
autograd's backward, optimiser, EMA, mixing, augmentation; the data loaders' own ops are not the step's
and are left out): the operator calls the host issues per step, which bound a launch-bound step (each is
one or more kernel launches on a GPU). It is counted three times: in the estimate below at paper sizes
and at speed.py's --small sizes (equal counts: the count does not depend on the input size), split into
device ops (on the step's device tensors) and host ops (CPU-side draws and index arithmetic), and on a
real CPU step at --small sizes (its total must equal device + host).

PEAK MEMORY. The step runs at paper sizes on fake tensors (torch._subclasses.FakeTensorMode: shapes,
strides and dtypes, no data, no compute) of the CPU device. The scripts' device tensors become fake where
they enter: the models returned by training.prepare_model and the batches of training.next_batch.
Host-side work stays real: the models are built on the CPU, the data loaders run outside the fake mode,
and every op without a fake input runs for real (the CPU random draws of the mixing and augmentation). A
TorchDispatchMode above the fake mode records each storage that an op on fake tensors creates or reads (a
real non-scalar input is a tensor the step made on the host and moved with .to(device), a no-op on the
CPU, a device tensor on a GPU) with its byte size, and drops it when the storage dies
(torch.multiprocessing.reductions.StorageWeakRef). The sum of the live storages is what the program holds
on the device at that moment: weights, gradients, the optimiser's momentum, the EMA teacher, the graphs
autograd keeps alive until their backward (saved tensors freed node by node during the backward, as the
engine does), the no-grad teacher pass while it runs.
Views and in-place results share their storage and are counted once, so the authors' duplicated 1x
parameter group costs nothing twice. "peak": the largest sum during step 2; "at start": what is alive
when it begins.

Values the step reads back on the host (`.item()`, a Python `if` on a tensor) have no data on fake
tensors: the mode answers 1 / True and lists where they were asked (`assumed` in the JSON, the table).

What the estimate is not. --amp runs CPU autocast (bf16), whose op lists agree with CUDA's on what holds
the memory (convolutions, matmuls and attention in bf16, batch norm in its input's dtype, losses in fp32) but
not op for op; layer_norm, which CPU autocast leaves in bf16 and CUDA's runs in fp32, is run in fp32 here
(the MiT rows' LayerNorm outputs and residual stream). On a GPU, torch.cuda.max_memory_allocated also counts the caching allocator's rounding of each
block (512 B; larger blocks from 2 MiB / 20 MiB segments) and the cuDNN and cuBLAS workspaces
(cudnn.benchmark picks algorithms by speed, some with large workspaces); max_memory_reserved adds the
cached blocks it could not reuse (fragmentation); nvidia-smi adds the CUDA context. None of these has a
fake tensor, so the GPU figures are higher by an amount only gpu_check.sh can measure.

    python benchmarks/memory.py --data-root DIR     # every row, fp32 and --amp: memory.json, RESULTS.md
"""
import collections
import contextlib
import datetime
import importlib
import json
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from speed import ROOT, ROWS, common, training, row_name  # noqa: E402

GB = 1e9  # the bars are in decimal GB; tables also give GiB


def bar_gb(record):
    """The --amp bar of a row: 11 GB; 24 GB for HRDA (the authors' HRDA needs 22.5 GB in fp32)."""
    return 24 if record.get("network") == "hrda" else 11
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class Steps:
    """Logger.log replaced: counts calls, runs `on_step(k)` at each, stops the run after `last` steps."""

    def __init__(self, last, on_step):
        self.k, self.last, self.on_step = 0, last, on_step

    def log(self, i, losses, lr):
        self.k += 1
        self.on_step(self.k)
        if self.k == self.last:
            raise speed.StopRun


class OpCounter(TorchDispatchMode):
    """Counts the aten ops of each step, by op name; `close_step` ends a step."""

    def __init__(self):
        super().__init__()
        self.per_step, self.current = [], collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.current[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def close_step(self, k):
        self.per_step.append(self.current)
        self.current = collections.Counter()


class LiveFakeBytes(TorchDispatchMode):
    """Above a FakeTensorMode: runs each op fake when it touches a fake tensor and for real otherwise, tracks
    the bytes of the live fake storages and their peak, counts the aten ops, answers host reads."""

    def __init__(self):
        super().__init__()
        self.live, self.bytes, self.peak = {}, 0, 0
        self.ops, self.host_ops, self.assumed = 0, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(a, FakeTensor) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            self.host_ops += func.namespace == "aten"
            with _disable_current_modes():   # host work: CPU random draws, index arithmetic
                return func(*args, **kwargs)
        self.ops += func.namespace == "aten"
        if func in HOST_READS:
            site = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(traceback.extract_stack())
                         if Path(f.filename).parent == ROOT), "?")
            self.assumed[site] += 1
            return True if args[0].dtype == torch.bool else 1
        self.register((args, kwargs))   # real inputs: made on the host and moved with a (no-op) .to(device)
        out = func(*args, **kwargs)
        self.register(out)
        return out

    def register(self, tensors):
        """Count the storages not yet seen of the fake tensors and the real non-scalar tensors in `tensors`
        (on a GPU only a 0-dim CPU tensor can meet a CUDA tensor); update the live sum and peak.

        Between sweeps the sum only grows (frees are not yet subtracted): an upper bound of the live bytes, so
        the dead storages are swept only when it passes the peak, and the peak stays exact."""
        for t in torch.utils._pytree.tree_leaves(tensors):
            if isinstance(t, FakeTensor) or isinstance(t, torch.Tensor) and t.dim() > 0:
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.bytes += self.live[ref.cdata][1]
        if self.bytes > self.peak:
            self.sweep()

    def sweep(self):
        """Drop dead storages; the live sum and its peak."""
        for cdata in [c for c, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[cdata]
        self.bytes = sum(n for _, n in self.live.values())
        self.peak = max(self.peak, self.bytes)


def host_loader(original):
    """training.infinite_loader, run outside any mode: real CPU batches, as the scripts' workers make them."""
    def loader(*args, **kwargs):
        with _disable_current_modes():
            it = original(*args, **kwargs)

        def batches():
            while True:
                with _disable_current_modes():
                    batch = next(it)
                yield batch
        return batches()
    return loader


def cuda_autocast_layer_norm(original):
    """F.layer_norm as CUDA's autocast runs it: in float32 (its fp32 op list), where CPU autocast keeps a bf16
    input in bf16; on a GPU the MiT's LayerNorm outputs and the residual stream after them hold fp32 bytes."""
    def layer_norm(input, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return original(input.float(), *args, **kwargs)
        return original(input, *args, **kwargs)
    return layer_norm


@contextlib.contextmanager
def fake_device():
    """The scripts' device tensors (models from training.prepare_model, batches from training.next_batch)
    become fake; everything else stays real."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveFakeBytes()
    prepare, next_batch = training.prepare_model, training.next_batch

    def to_fake(t):
        with _disable_current_modes():
            fake = fake_mode.from_tensor(t)
        tracker.register(fake)
        return fake

    def fake_model(model, device, amp):
        model = prepare(model, device, amp)
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(to_fake(p.detach()), p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = to_fake(b)
        return model

    def host_load(*args, **kwargs):
        with _disable_current_modes():
            return torch_load(*args, **kwargs)

    torch_load = torch.load
    def fake_batch(loader, device):
        return tuple(map(to_fake, next_batch(loader, device)))

    with mock.patch.object(training, "prepare_model", fake_model), mock.patch("torch.load", host_load), \
            mock.patch.object(training, "next_batch", fake_batch), \
            mock.patch.object(torch.nn.functional, "layer_norm", cuda_autocast_layer_norm(F.layer_norm)), \
            mock.patch.object(training, "infinite_loader", host_loader(training.infinite_loader)), \
            fake_mode, tracker:
        yield tracker


def run_row(module, argv, steps, on_step):
    """module.main(argv) for `steps` logged iterations (Logger.log replaced)."""
    stepper = Steps(steps, on_step)
    with speed.restored_signal_handlers(), \
            mock.patch.object(training.Logger, "log", lambda logger, *a: stepper.log(*a)):
        try:
            module.main(argv)
        except speed.StopRun:
            pass
    if stepper.k != steps:
        raise RuntimeError(f"{module.__name__}: the loop ended after {stepper.k} iterations")


def estimate(row, preset, bench, amp, warmup, layers):
    """Peak and at-start live device bytes of step warmup+1 on fake tensors, its device and host op counts,
    and the host reads answered without data."""
    script = row[0]
    module = importlib.import_module(script[:-3])
    iters = warmup + 1
    marks = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = speed.write_teacher(Path(tmp) / "teacher.pth", layers) if script == "dldm.py" else ""
        argv = speed.script_argv(row, preset, bench, Path(tmp) / "run", iters + 1, "cpu", amp, 0, layers, teacher)
        with fake_device() as tracker:
            def on_step(k):
                tracker.sweep()
                if k == warmup:
                    tracker.peak, marks["start"] = tracker.bytes, tracker.bytes
                    marks["ops"], marks["host_ops"] = tracker.ops, tracker.host_ops
                if k == warmup + 1:
                    marks.update(peak=tracker.peak, ops=tracker.ops - marks["ops"],
                                 host_ops=tracker.host_ops - marks["host_ops"])
            run_row(module, argv, iters, on_step)
    return {"peak_bytes": marks["peak"], "start_bytes": marks["start"], "device_ops_per_step": marks["ops"],
            "host_ops_per_step": marks["host_ops"], "assumed": dict(tracker.assumed)}


def count_ops_cpu(row, bench, warmup, layers):
    """aten ops per step of a real CPU run (--small sizes, the given layers), step warmup+1."""
    module = importlib.import_module(row[0][:-3])
    counter = OpCounter()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = speed.write_teacher(Path(tmp) / "teacher.pth", layers) if row[0] == "dldm.py" else ""
        argv = speed.script_argv(row, "small", bench, Path(tmp) / "run", warmup + 2, "cpu", False, 0, layers, teacher)
        with mock.patch.object(training, "infinite_loader", host_loader(training.infinite_loader)), counter:
            run_row(module, argv, warmup + 1, counter.close_step)
    return sum(counter.per_step[warmup].values())


# ------------------------------------------------------------------------------------------- output

def results_section(records):
    """The "Per-step aten ops and peak-memory estimate" section of RESULTS.md, generated from the records."""
    runs = sorted({(r["command"], r["date"], r["commit"], r["machine"], r["torch"]) for r in records})
    lines = ["## Per-step aten ops and peak-memory estimate (`benchmarks/memory.py`)", "",
             "Generated by `benchmarks/memory.py` from `benchmarks/memory.json` (method: the file's docstring). "
             "Peak: the largest sum of live device-tensor storage bytes during one training step of the script's "
             "own loop (step 2, after the optimiser state exists), run at paper settings (DeepLabv2-ResNet-101; "
             "MiT-B5 + DAFormer head for `--stack daformer`, MiT-B5 + HRDA head for `--stack hrda` (1024x1024 crops, "
             "GTA5 at 2560x1440, Cityscapes at 2048x1024); the scripts' PAPER sizes and batches) on fake "
             "tensors; at start: what stays alive between steps (weights, teacher, momentum, gradients). Not a "
             "GPU measurement: the CUDA caching allocator's reserve, the CUDA context and cuDNN/cuBLAS "
             "workspaces come on top (docstring). aten ops: dispatcher calls per step (device ops: on the "
             "step's device tensors; host ops: CPU-side draws and index arithmetic), fake paper sizes / fake "
             "--small sizes / a real CPU step at --small sizes (all with the full network: ResNet-101 layers, "
             "MiT-B5).", "", "Runs:", ""]
    lines += [f"- `{c}` ({date}, commit {commit}, torch {t}; {machine})" for c, date, commit, machine, t in runs]
    lines += ["", "| script | fp32 peak GB (GiB) | at start GB | amp peak GB (GiB) | at start GB "
              "| amp within the bar (11 GB; --stack hrda: 24 GB) "
              "| fp32 aten ops/step: device + host (paper / small / real CPU small) | amp device + host ops "
              "(paper / small) |", "|---|---|---|---|---|---|---|---|"]
    for script, stage, _, _ in ROWS:
        pair = {r["amp"]: r for r in records if (r["script"], r["stage"]) == (script, stage)}
        if not pair:
            continue
        cells = []
        for amp in (False, True):
            r = pair.get(amp)
            cells += ["–", "–"] if r is None else [f"{r['peak_bytes'] / GB:.2f} ({r['peak_bytes'] / 2 ** 30:.2f})",
                                                    f"{r['start_bytes'] / GB:.2f}"]
        small = any(r["sizes"] != "paper" or r["layers"] != [3, 4, 23, 3] for r in pair.values())
        ok = "–" if True not in pair or small else ("yes" if pair[True]["peak_bytes"] <= bar_gb(pair[True]) * GB
                                                    else "**no**")
        ops = []
        for amp in (False, True):
            r = pair.get(amp)
            if r is None:
                ops.append("–")
                continue
            counts = [f"{r['device_ops_per_step']} + {r['host_ops_per_step']}",
                      f"{r['small_device_ops_per_step']} + {r['small_host_ops_per_step']}"]
            if r.get("real_cpu_ops_per_step") is not None:
                counts.append(str(r["real_cpu_ops_per_step"]))
            ops.append(" / ".join(counts))
        name = row_name(script, stage) + (" (**not paper settings**: --sizes small, light network)" * small)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ok} | " + " | ".join(ops) + " |")
    assumed = sorted({site for r in records for site in r["assumed"]})
    lines += ["", "Host reads answered without data (1 / True): " + (", ".join(assumed) if assumed else "none") + "."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter)
    p.add_argument("--data-root", default="./data", help="where the demo and benchmark data are written")
    p.add_argument("--amp", choices=["both", "off", "on"], default="both", help="fp32 and --amp rows, or one")
    p.add_argument("--scripts", nargs="+", default=None, metavar="ROW",
                   help="rows to run (default all): " + ", ".join(row_name(s, st) for s, st, _, _ in ROWS)
                   + "; a script name selects all its rows")
    p.add_argument("--layers", type=int, nargs=4, default=[3, 4, 23, 3],
                   help="ResNet stages (tests: fewer; then the --stack daformer rows train MiT tiny, not B5)")
    p.add_argument("--sizes", choices=["paper", "small"], default="paper",
                   help="the estimate's sizes (small: only to test this tool quickly)")
    p.add_argument("--no-real-count", action="store_true", help="skip the real CPU step's op count")
    p.add_argument("--machine", default="this machine", help="how the records name the machine")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "memory.json"), help="records, merged")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="table regenerated here")
    args = p.parse_args(argv)
    known = {row_name(s, st) for s, st, _, _ in ROWS} | {s for s, _, _, _ in ROWS}
    bad = [name for name in args.scripts or [] if name not in known]
    if bad:
        raise common.DataError(f"--scripts {bad[0]}: expected one of {', '.join(sorted(known))}")
    if min(args.layers) < 1:
        raise common.DataError(f"--layers {' '.join(map(str, args.layers))}: expected four counts >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for r in ROWS if args.scripts is None or r[0] in args.scripts or row_name(r[0], r[1]) in args.scripts]
    bench = speed.write_bench_data(args.data_root, args.sizes)
    small = speed.write_bench_data(args.data_root, "small")
    meta = {"machine": args.machine, "torch": torch.__version__, "commit": speed.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    records = []
    for row in rows:
        real = None if args.no_real_count else count_ops_cpu(row, small, 1, args.layers)
        for amp in {"both": (False, True), "off": (False,), "on": (True,)}[args.amp]:
            rec = estimate(row, args.sizes, bench, amp, 1, args.layers)
            check = rec if args.sizes == "small" else estimate(row, "small", small, amp, 1, args.layers)
            rec.update(small_device_ops_per_step=check["device_ops_per_step"],
                       small_host_ops_per_step=check["host_ops_per_step"], real_cpu_ops_per_step=None if amp else real)
            kind = speed.row_network(row)
            records.append({"script": row[0], "stage": row[1], "amp": amp, "sizes": args.sizes,
                            "layers": list(args.layers), "network": kind,
                            "network_size": speed.network_size(kind, args.layers), **rec, **meta})
            print(f"{row_name(row[0], row[1]):32s} {'amp ' if amp else 'fp32'} peak {rec['peak_bytes'] / GB:6.2f} GB "
                  f"start {rec['start_bytes'] / GB:5.2f} GB  "
                  f"ops {rec['device_ops_per_step']}+{rec['host_ops_per_step']}"
                  f" (small {check['device_ops_per_step']}+{check['host_ops_per_step']}, real CPU {real})", flush=True)
    key = lambda r: (r["script"], r["stage"], r["amp"], r["sizes"], tuple(r["layers"]))  # noqa: E731
    old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
    fresh = {key(r) for r in records}
    records = [r for r in old if key(r) not in fresh] + records
    common.atomic_write_text(args.json, json.dumps(records, indent=1) + "\n")
    paper = [r for r in records if r["sizes"] == "paper" and r["layers"] == [3, 4, 23, 3]]
    shown = paper + [r for r in records if (r["script"], r["stage"]) not in {(p["script"], p["stage"]) for p in paper}]
    results = Path(args.results)
    text = results.read_text() if results.is_file() else "# Measured results\n"
    common.atomic_write_text(results, speed.replace_section(text, ("## Per-step aten ops and peak-memory",),
                                                            results_section(shown)))
    return records


if __name__ == "__main__":
    training.run_script(main)
