"""Images/s of every training pipeline of the method scripts with 0..N data-loading workers, against the
images/s their training step consumes.

The pipelines are the scripts' own: every row of speed.py, with GTA5 and with SYNTHIA as the source, runs
its `main(argv)` in-process at the paper sizes (a light --layers 1 1 1 1 network on the CPU: the network
does not change the data) with `training.infinite_loader` wrapped to collect each (dataset, batch sampler)
pair the script builds; the run ends at its first batch request. Identical configurations are measured
once. Each is then read through `training.infinite_loader` itself (the scripts' DataLoader options) with k
workers: after the first batch (worker start-up), batches are drawn for --seconds and images/s = images
read / time. The 0-worker run also gives the median and 90th-percentile time per batch in the main
process. The consumption is batch x 1000 / ms_per_iter of the paper-preset records of speed.json for the
same script and stage (the fastest device and precision there), when present. With --prepared, the benchmark
data are also prepared (`common.prepare_data`, every frame set the pipelines read, under
<data-root>/bench_<preset>_prepared) and each pipeline is read again from there, as the scripts read it with
--data-root on a prepared root: images/s and the speed-up over the original.

With --together, each row's streams (every loader its script builds: source, target, labeled, unlabeled)
run at once instead, each with --stream-workers workers (default: the scripts' --workers default), and the
main process draws one batch from every stream per iteration, as the training loop does, with no step in
between: delivered iterations/s (and images/s per stream) over --seconds, after the batches the workers had
prefetched at start-up. Against the step: consumed iterations/s = 1000 / ms per iteration, where the ms is
--step-ms (a figure you measured with `benchmarks/speed.py` on your GPU, e.g. `--step-ms dacs.py=24.6`),
else the fastest paper-preset record of the row in --speed-json; the ratio delivered / consumed is the
margin (>= 1.5 is the issue's target on 16 cores). With --prepared, again from the prepared root.

    python benchmarks/loader.py --workers 0 1 2         # real resolutions; --small for a quick check
    OMP_NUM_THREADS=1 python benchmarks/loader.py --workers 0 --seconds 5 --prepared   # images/s per core
    python benchmarks/loader.py --together --prepared --scripts dacs.py --step-ms dacs.py=24.6
"""
import datetime
import importlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: rows, benchmark data, run arguments)
from speed import ROOT, common, training  # noqa: E402

SOURCES = ("gta5", "synthia")


class FirstBatch(Exception):
    """Raised at a script's first batch request: every loader of its run has been built by then."""


class StopAtFirstBatch:
    """The iterator handed to the script instead of a DataLoader."""

    def __next__(self):
        raise FirstBatch


def loader_rows():
    """(name, speed.py row, source) for every row of speed.py with GTA5 and, where the script has a
    --source, SYNTHIA as the source."""
    out = []
    for script, stage, extra, floor in speed.ROWS:
        for source in SOURCES if "--source" in extra else ("cityscapes",):
            args = [source if a == "gta5" else a for a in extra]
            out.append((f"{speed.row_name(script, stage)} ({source})", (script, stage, args, floor), source))
    return out


def describe(dataset, sampler):
    """A key naming one pipeline configuration (dataset class and options, sampler, images per batch)."""
    if isinstance(dataset, common.PseudoMarginDataset):   # HRDA's target: a SegmentationDataset with margins
        return describe(dataset.dataset, sampler).replace("SegmentationDataset(", "PseudoMarginDataset(", 1)
    opts = {k: getattr(dataset, k) for k in ("resize", "keep_ratio", "interp", "crop", "cat_max_ratio", "flip")}
    opts = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in opts.items()
                     if v not in (None, False) and not (k == "crop" and tuple(v) == (0, 0)))
    extra = f", lab={dataset.mode}" if hasattr(dataset, "ref_stats") else ""
    return (f"{type(dataset).__name__}({dataset.kind}, {opts}{extra}) x{sampler.bs} "
            f"[{type(sampler).__name__}]")


def capture(row, preset, bench, out_dir):
    """[(dataset, batch sampler)] that one row's script builds for its training loop."""
    module = importlib.import_module(row[0][:-3])
    found = []

    def collect(dataset, sampler, workers):
        found.append((dataset, sampler))
        return StopAtFirstBatch()

    num_classes = 16 if "synthia" in row[2] else 19   # DLDM's 16-way head for SYNTHIA
    teacher = speed.write_teacher(out_dir / "teacher.pth", [1, 1, 1, 1], num_classes) if row[0] == "dldm.py" else ""
    argv = speed.script_argv(row, preset, bench, out_dir / "run", 10 ** 5, "cpu", False, 0, [1, 1, 1, 1], teacher)
    with speed.restored_signal_handlers(), mock.patch.object(training, "infinite_loader", collect):
        try:
            module.main(argv)
        except FirstBatch:
            pass
    return found


def throughput(dataset, sampler, workers, seconds):
    """(images/s, per-batch seconds, images per CPU-second of this process) of training.infinite_loader with
    `workers` workers over `seconds`; with 0 workers the last is the rate of one free core, whatever the load."""
    loader = training.infinite_loader(dataset, sampler, workers)
    next(loader)                                  # worker start-up, first batch
    images, per_batch, t0, cpu0 = 0, [], time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        images += len(next(loader)["image"])
        per_batch.append(time.perf_counter() - t)
    rate, cpu_rate = images / (time.perf_counter() - t0), images / max(time.process_time() - cpu0, 1e-9)
    del loader                                    # shuts its workers down
    return rate, per_batch, cpu_rate


def prepare_bench(bench, pipelines):
    """The prepared root of the benchmark data with every frame set the pipelines read (made once, then reused)."""
    datasets = [e["dataset"] for e in pipelines.values()]
    datasets = [d.dataset if isinstance(d, common.PseudoMarginDataset) else d for d in datasets]  # HRDA's target
    specs = sorted({common.frames_spec(d.kind, d.resize, d.keep_ratio, d.interp) for d in datasets
                    if d.resize is not None})
    out = bench.with_name(bench.name + "_prepared")
    common.prepare_data(bench, out, specs)
    return out


def consumption(records, script, stage):
    """(images/s one stream of the step consumes, which record) per the fastest paper-preset record of the
    row in speed.json (GTA5 source), or (None, None)."""
    rows = [r for r in records if r["script"] == script and r["stage"] == stage and r["preset"] == "paper"]
    if not rows:
        return None, None
    best = min(rows, key=lambda r: r["ms_per_iter"])
    return best["batch_per_stream"] * 1000 / best["ms_per_iter"], best["device"] + (" amp" if best["amp"] else "")


def together_rate(streams, workers, seconds):
    """(iterations/s, images/s of each stream) of `streams` [(dataset, batch sampler)] read through
    training.infinite_loader at once, each with `workers` workers, one batch of every stream per iteration;
    timed after each stream's first batch (worker start-up) and the batches prefetched meanwhile."""
    loaders = [training.infinite_loader(dataset, sampler, workers) for dataset, sampler in streams]
    for _ in range(1 + 2 * workers):              # prefetch_factor 2 per worker (training.infinite_loader)
        for loader in loaders:
            next(loader)
    iterations, images, t0 = 0, [0] * len(loaders), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for k, loader in enumerate(loaders):
            images[k] += len(next(loader)["image"])
        iterations += 1
    elapsed = time.perf_counter() - t0
    del loaders                                   # shuts their workers down
    return iterations / elapsed, [n / elapsed for n in images]


def step_ms(specs, records, script, stage):
    """(ms per iteration, where the figure comes from) for one row: its --step-ms entry, else the bare
    --step-ms value, else the fastest paper-preset record of speed.json, else (None, None)."""
    name = speed.row_name(script, stage)
    if name in specs or None in specs:
        return specs.get(name, specs.get(None)), "--step-ms"
    rows = [r for r in records if r["script"] == script and r["stage"] == stage and r["preset"] == "paper"]
    if not rows:
        return None, None
    best = min(rows, key=lambda r: r["ms_per_iter"])
    return best["ms_per_iter"], "speed.json: " + best["device"] + (" amp" if best["amp"] else "")


def together_section(result):
    """The 'Data loading, all streams together' section of RESULTS.md."""
    prepared = result["prepared"]
    lines = ["## Data loading, all of a script's streams together (`benchmarks/loader.py --together`)", "",
             f"Generated by `benchmarks/loader.py --together` ({result['date']}, commit {result['commit']}, torch "
             f"{result['torch']}, {result['machine']}, load average {result['load']} at the start): "
             f"`{result['command']}`. Every loader a row's script builds runs at once with "
             f"{result['stream_workers']} workers each, and the main process draws one batch of every stream per "
             f"iteration with no training step in between, for {result['seconds']} s after the start-up and "
             "prefetched batches: 'delivered it/s' is the most iterations/s these loaders feed; images/s per "
             "stream = it/s x its batch. 'step ms': the training step's ms/iter (--step-ms, a figure measured with "
             "speed.py, or speed.json's fastest paper-preset record; '–' where neither exists), 'delivered / "
             "consumed' = delivered it/s x step ms / 1000 (the target is >= 1.5)."
             + (" 'prepared': the same, read from a prepared root of the same data." if prepared else "")
             + ("" if any(r["step_ms"] for r in result["rows"]) else
                " **No step figure was given or recorded, so there is no ratio: these are the loaders' rates alone "
                "on this machine, not a measurement against a GPU step.**"), "",
             "| row | streams (batch) | delivered it/s | images/s per stream | step ms | delivered / consumed"
             + " | prepared it/s | prepared, delivered / consumed" * prepared + " |",
             "|---|---|---|---|---|---" + "|---|---" * prepared + "|"]
    for r in result["rows"]:
        ms = f"{r['step_ms']:g} ({r['step_from']})" if r["step_ms"] else "–"
        ratio = lambda rate: f"{rate * r['step_ms'] / 1000:.2f}" if r["step_ms"] else "–"  # noqa: E731
        cells = [r["row"], "; ".join(f"{s} ({b})" for s, b in zip(r["streams"], r["batches"])),
                 f"{r['iterations_per_s']:.2f}", ", ".join(f"{v:.1f}" for v in r["images_per_s"]), ms,
                 ratio(r["iterations_per_s"])]
        if prepared:
            cells += [f"{r['prepared_iterations_per_s']:.2f}", ratio(r["prepared_iterations_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main_together(args, rows, bench, records, tmp, command, write):
    """--together: each row's streams at once, on the original data and (--prepared) on a prepared root;
    `write(result)` after every row, so a run cut short keeps the rows it finished."""
    captured = []
    for k, (name, row, source) in enumerate(rows):
        (Path(tmp) / str(k)).mkdir()
        captured.append(capture(row, args.preset, bench, Path(tmp) / str(k)))
    if args.prepared:
        prepared = prepare_bench(bench, {describe(*s): {"dataset": s[0]} for streams in captured for s in streams})
    result = {"together": True, "stream_workers": args.stream_workers, "seconds": args.seconds,
              "preset": args.preset, "machine": args.machine, "torch": torch.__version__,
              "commit": speed.git_commit(), "prepared": args.prepared, "load": f"{os.getloadavg()[0]:.1f}",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command, "rows": []}
    for k, ((name, row, source), streams) in enumerate(zip(rows, captured)):
        ms, where = step_ms(args.step_ms, records, row[0], row[1])
        rate, per_stream = together_rate(streams, args.stream_workers, args.seconds)
        record = {"row": name, "streams": [describe(d, s) for d, s in streams], "batches": [s.bs for _, s in streams],
                  "iterations_per_s": rate, "images_per_s": per_stream, "step_ms": ms, "step_from": where}
        line = f"{name}: {len(streams)} streams x {args.stream_workers} workers, {rate:.2f} it/s"
        if args.prepared:
            (Path(tmp) / f"prepared{k}").mkdir()
            again = capture(row, args.preset, prepared, Path(tmp) / f"prepared{k}")
            record["prepared_iterations_per_s"], record["prepared_images_per_s"] = together_rate(
                again, args.stream_workers, args.seconds)
            line += f", prepared {record['prepared_iterations_per_s']:.2f} it/s"
        print(line + (f"; step {ms:g} ms: delivered / consumed {rate * ms / 1000:.2f}" if ms else ""), flush=True)
        result["rows"].append(record)
        write(result)
    return result


def results_section(result):
    """The 'Data-loading throughput' section of RESULTS.md."""
    workers, default = result["workers"], result["default_workers"]
    prepared = result.get("prepared", False)
    lines = ["## Data-loading throughput (`benchmarks/loader.py`)", "",
             f"Generated by `benchmarks/loader.py` ({result['date']}, commit {result['commit']}, torch "
             f"{result['torch']}, {result['machine']}): `{result['command']}`. Images/s of each training "
             f"pipeline the scripts build (read through `training.infinite_loader`, each for {result['seconds']} s "
             f"after the first batch), with {', '.join(map(str, workers))} workers; 'img per CPU-s': the 0-worker "
             "run's images per second of CPU time of the process (one free core's rate, robust to a loaded machine); "
             "ms/batch: median and 90th percentile in the main process (0 workers). 'step consumes': images/s of one stream of the training "
             "step (speed.json, paper settings; '–' where no such record exists). 'it/s fed 3x': the step rate "
             f"this stream could feed with a 3x margin from --workers {default} (the default) if each worker "
             "delivered the single-core (0-worker) rate — an extrapolation to a machine with a free core per "
             "worker, not a measurement."
             + (" 'prepared': the same pipeline read from a prepared root of the same data (`python common.py "
                "prepare-data`), and its speed-up over the original at 0 workers (one core)." if prepared else ""), "",
             "| pipeline | used by | " + " | ".join(f"{k} workers img/s" for k in workers) + " | img per CPU-s"
             + "".join(f" | prepared, {k} workers img/s" for k in workers if prepared)
             + " | prepared, img per CPU-s | speed-up per core" * prepared
             + " | ms/batch p50 / p90 | step consumes img/s | it/s fed 3x |",
             "|---|---|" + "---|" * ((2 if prepared else 1) * len(workers) + 2 * prepared + 4)]
    for p in result["pipelines"]:
        rates = " | ".join(f"{p['images_per_s'][str(k)]:.2f}" for k in workers) + f" | {p['images_per_cpu_s']:.2f}"
        if prepared:
            rates += "".join(f" | {p['prepared_images_per_s'][str(k)]:.2f}" for k in workers)
            rates += f" | {p['prepared_images_per_cpu_s']:.2f} | {p['prepared_images_per_cpu_s'] / p['images_per_cpu_s']:.1f}x"
        used = ", ".join(p["used_by"])
        consumed = ", ".join(f"{c['images_per_s']:.1f} ({c['row']}, {c['record']})" for c in p["consumed"]) or "–"
        fed = f"{p['images_per_s']['0'] * default / 3 / p['batch']:.1f}" if "0" in p["images_per_s"] else "–"
        lines.append(f"| {p['pipeline']} | {used} | {rates} | {p['ms_per_batch_p50']:.0f} / "
                     f"{p['ms_per_batch_p90']:.0f} | {consumed} | {fed} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter)
    p.add_argument("--data-root", default="./data", help="where the demo and benchmark data are written")
    p.add_argument("--small", action="store_true", help="1/8-scale data and sizes (a quick check of the harness)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to measure (with 0)")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per pipeline and worker count")
    p.add_argument("--scripts", nargs="+", default=None, metavar="SCRIPT", help="only these scripts' pipelines")
    p.add_argument("--speed-json", default=str(ROOT / "benchmarks" / "speed.json"), help="step records")
    p.add_argument("--json", default=None, help="results written here (default: benchmarks/loader.json, with "
                                                "--together benchmarks/loader_together.json)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="table regenerated here")
    p.add_argument("--machine", default="this machine", help="how RESULTS.md names the machine")
    p.add_argument("--prepared", action="store_true", help="also read every pipeline from a prepared root of the "
                                                           "benchmark data (images/s and speed-up)")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                   help="source datasets of the rows whose script has --source")
    p.add_argument("--together", action="store_true",
                   help="each row's streams at once, one batch of each per iteration, against the step")
    p.add_argument("--stream-workers", type=int, default=training.shared_parser({}).get_default("workers"),
                   help="--together: workers per stream (default: the scripts' --workers default)")
    p.add_argument("--step-ms", nargs="+", default=[], metavar="[ROW=]MS",
                   help="--together: the training step's ms/iter that you measured with benchmarks/speed.py on "
                        "your GPU, for every row or for one ROW (a speed.py row: 'dacs.py', 'dldm.py M_RL'); "
                        "default: speed.json's fastest paper-preset record of the row")
    args = p.parse_args(argv)
    if min(args.workers) < 0 or 0 not in args.workers or not args.seconds > 0:
        raise common.DataError(f"--workers {' '.join(map(str, args.workers))}: expected counts >= 0 including 0 (the "
                               f"single-core rate and per-batch times come from it), and --seconds > 0")
    known = {row[0] for row in speed.ROWS}
    if args.scripts and not set(args.scripts) <= known:
        raise common.DataError(f"--scripts {sorted(set(args.scripts) - known)[0]}: expected one of "
                               f"{', '.join(sorted(known))}")
    args.step_ms = dict(step_ms_entry(entry, {speed.row_name(r[0], r[1]) for r in speed.ROWS})
                        for entry in args.step_ms)
    if args.stream_workers < 0:
        raise common.DataError(f"--stream-workers {args.stream_workers}: expected a count >= 0")
    args.json = args.json or str(ROOT / "benchmarks" / ("loader_together.json" if args.together else "loader.json"))
    args.preset = "small" if args.small else "paper"
    return args


def step_ms_entry(entry, rows):
    """(row name or None for every row, ms) of one --step-ms entry '[ROW=]MS'."""
    name, _, ms = entry.rpartition("=")
    try:
        value = float(ms)
    except ValueError:
        value = 0.0
    if not value > 0 or (name and name not in rows):
        raise common.DataError(f"--step-ms {entry}: expected MS or ROW=MS with MS > 0 (milliseconds per iteration "
                               f"measured with speed.py) and ROW one of {', '.join(sorted(rows))}")
    return name or None, value


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # the main process only batches and copies here
    bench = speed.write_bench_data(args.data_root, args.preset)
    records = json.loads(Path(args.speed_json).read_text()) if Path(args.speed_json).is_file() else []
    pipelines = {}  # description -> {dataset, sampler, used_by, consumed}
    command = "python benchmarks/loader.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = [r for r in loader_rows() if (args.scripts is None or r[1][0] in args.scripts)
            and r[2] in (*args.sources, "cityscapes")]
    if args.together:
        def write(result):
            common.atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
            results = Path(args.results)
            text = results.read_text() if results.is_file() else "# Measured results\n"
            common.atomic_write_text(results, speed.replace_section(
                text, ("## Data loading, all of a script's streams together",), together_section(result)))
        with tempfile.TemporaryDirectory() as tmp:
            return main_together(args, rows, bench, records, tmp, command, write)
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, row, source) in enumerate(rows):
            out_dir = Path(tmp) / str(k)
            out_dir.mkdir()
            rate, record = consumption(records, row[0], row[1]) if source != "synthia" else (None, None)
            for dataset, sampler in capture(row, args.preset, bench, out_dir):
                entry = pipelines.setdefault(describe(dataset, sampler), {"dataset": dataset, "sampler": sampler,
                                                                          "used_by": [], "consumed": []})
                entry["used_by"].append(name)
                if rate is not None:
                    entry["consumed"].append({"row": name, "record": record, "images_per_s": rate})
        if args.prepared:   # each script again, on the prepared root: its datasets read the frame sets
            prepared = prepare_bench(bench, pipelines)
            for k, (name, row, source) in enumerate(rows):
                out_dir = Path(tmp) / f"prepared{k}"
                out_dir.mkdir()
                for dataset, sampler in capture(row, args.preset, prepared, out_dir):
                    pipelines[describe(dataset, sampler)]["prepared"] = dataset
        result = {"workers": args.workers, "default_workers": training.shared_parser({}).get_default("workers"),
                  "seconds": args.seconds, "preset": args.preset, "machine": args.machine,
                  "torch": torch.__version__, "commit": speed.git_commit(),
                  "prepared": args.prepared,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": command, "pipelines": []}
        for description, entry in pipelines.items():
            rates, ms, per_cpu_s = {}, [], None
            for workers in args.workers:
                rates[str(workers)], per_batch, cpu_rate = throughput(entry["dataset"], entry["sampler"], workers,
                                                                      args.seconds)
                if workers == 0:
                    ms, per_cpu_s = sorted(1000 * t for t in per_batch), cpu_rate
            p50, p90 = statistics.median(ms), ms[math.ceil(0.9 * len(ms)) - 1]
            record = {"pipeline": description, "used_by": entry["used_by"], "batch": entry["sampler"].bs,
                      "images_per_s": rates, "images_per_cpu_s": per_cpu_s, "ms_per_batch_p50": p50,
                      "ms_per_batch_p90": p90, "consumed": entry["consumed"]}
            print(f"{description}: " + ", ".join(f"{k} workers {v:.2f} img/s" for k, v in rates.items())
                  + f"; {p50:.0f}/{p90:.0f} ms per batch (p50/p90, main process)", flush=True)
            if args.prepared:
                runs = {str(k): throughput(entry["prepared"], entry["sampler"], k, args.seconds) for k in args.workers}
                record["prepared_images_per_s"] = {k: r[0] for k, r in runs.items()}
                record["prepared_images_per_cpu_s"] = runs["0"][2]
                print("  prepared: " + ", ".join(f"{k} workers {v:.2f} img/s"
                                                 for k, v in record["prepared_images_per_s"].items())
                      + f"; {per_cpu_s:.2f} -> {runs['0'][2]:.2f} img per CPU-s (0 workers)", flush=True)
            result["pipelines"].append(record)
    common.atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    results = Path(args.results)
    text = results.read_text() if results.is_file() else "# Measured results\n"
    common.atomic_write_text(results, speed.replace_section(text, ("## Data-loading throughput",),
                                                            results_section(result)))
    return result


if __name__ == "__main__":
    training.run_script(main)
