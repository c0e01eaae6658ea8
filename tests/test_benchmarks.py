"""benchmarks/speed.py and benchmarks/loader.py end to end on the CPU at tiny sizes (no timing asserted)."""
import json
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import loader  # noqa: E402
import memory  # noqa: E402
import speed  # noqa: E402
from speed import common, training  # noqa: E402

SCHEMA = {"script", "device", "amp", "ms_per_iter", "floor_ms_per_iter", "peak_mem_gb", "torch", "commit", "date",
          "command"}
OLD_RESULTS = ("# Measured results\n\nintro\n\n## Demo dataset domain gap\n\nkept as it is\n\n"
               "## GPU step speed and memory (`benchmarks/gpu_step.py`) — not yet measured\n\nold text\n\n"
               "## Method demos\n\nalso kept\n")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Data root (demo + 1/8-scale benchmark trees) and a speed.py --small run over every row (fp32, 1 step)."""
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("out")
    (out / "RESULTS.md").write_text(OLD_RESULTS)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    records = speed.main(["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--threads", "1",
                          "--workers", "0", "--amp", "off", "--data-root", str(data), "--json", str(out / "speed.json"),
                          "--results", str(out / "RESULTS.md")])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers   # scripts' handlers gone
    return data, out, records


def test_speed_records_every_script_and_dldm_stage(bench):
    _, out, records = bench
    assert json.loads((out / "speed.json").read_text()) == records
    assert [(r["script"], r["stage"]) for r in records] == [(s, st) for s, st, _, _ in speed.ROWS]
    assert {r["script"] for r in records} == {"dacs.py", "classmix_ssl.py", "iidm.py", "camix.py", "asss.py", "dldm.py"}
    assert {r["stage"] for r in records if r["script"] == "dldm.py"} == {"M_RL", "M_SL", "student"}
    for r in records:
        assert SCHEMA <= r.keys()
        assert r["device"] == "cpu" and r["amp"] is False and r["preset"] == "small" and r["steps"] == 1
        assert r["ms_per_iter"] > 0 and r["floor_ms_per_iter"] > 0
        assert r["step_over_floor"] == pytest.approx(r["ms_per_iter"] / r["floor_ms_per_iter"], rel=0.01)
        assert r["peak_mem_gb"] is None and r["host_syncs_per_step"] is None   # CUDA-only measurements
        assert r["peak_reserved_gb"] is None and r["compile"] is False
        assert 0 < r["host_ms_per_iter"] and r["floor_gflop"] > 0                # the host's issue time, FLOP
        assert r["tflops_step"] == pytest.approx(r["floor_gflop"] / r["ms_per_iter"], rel=0.02, abs=1e-4)
        assert r["command"].startswith("python benchmarks/speed.py --device cpu --small")
        assert r["torch"] == torch.__version__ and r["commit"] and r["date"].startswith("20")


def test_speed_table_replaces_only_its_section(bench):
    _, out, records = bench
    text = (out / "RESULTS.md").read_text()
    assert "## Demo dataset domain gap\n\nkept as it is\n" in text and "## Method demos\n\nalso kept\n" in text
    assert "GPU step speed" not in text and "old text" not in text
    section = text[text.index("## Training-step speed"):text.index("## Method demos")]
    for script, stage, _, _ in speed.ROWS:
        name = speed.row_name(script, stage)
        assert f"| {name} | not measured — no GPU in this session |" in section         # the CUDA rows
        row = next(r for r in records if (r["script"], r["stage"]) == (script, stage))
        assert f"| {name} | {row['ms_per_iter']:.1f} | {row['floor_ms_per_iter']:.1f} |" in section


def test_rerun_merges_records(bench, tmp_path):
    """A later run replaces the records of its rows and keeps the others (e.g. CUDA rows beside CPU ones)."""
    _, out, records = bench
    other = {**records[0], "device": "cuda (X)", "preset": "paper", "ms_per_iter": 1.0}
    (tmp_path / "speed.json").write_text(json.dumps([other, *records]))
    newer = [{**records[0], "ms_per_iter": 123.0}]
    merged = speed.merge_records(tmp_path / "speed.json", newer)
    assert other in merged and newer[0] in merged and records[0] not in merged and len(merged) == len(records) + 1


@pytest.mark.parametrize("row", [r for r in speed.ROWS if speed.row_network(r) != "hrda"],
                         ids=lambda r: speed.row_name(r[0], r[1]))   # HRDA's rows: the test below
def test_floor_runs_the_passes_of_the_step(row):
    """The floor is a positive time of real passes: the student forwards with a graph, the teacher forwards
    without one, at the script's batch and the given sizes (ASS: also its six D_g passes)."""
    import asss
    seen = []

    def spy(forward):
        def passes(model, x):
            seen.append((tuple(x.shape), torch.is_grad_enabled() and model.training and
                         any(p.requires_grad for p in model.parameters())))
            return forward(model, x)
        return passes

    module = __import__(row[0][:-3])
    batch, sizes = module.PAPER["batch_size"][0], {"source": (40, 72), "target": (32, 64), "crop": (32, 32)}
    network = common.MixVisionTransformer if speed.row_network(row) == "daformer" else common.DeepLabV2
    with mock.patch.object(network, "forward", spy(network.forward)), \
            mock.patch.object(asss, "segment", spy(asss.segment)), \
            mock.patch.object(common.FCDiscriminator, "forward", autospec=True,
                              side_effect=common.FCDiscriminator.forward) as d_g:
        ms, mem = speed.time_floor(row, sizes, batch, [1, 1, 1, 1], torch.device("cpu"),
                                   training.Amp(torch.device("cpu"), False), warmup=0, steps=1)
    assert ms > 0 and mem is None
    shape = lambda k: (batch, 3, *sizes[k])  # noqa: E731
    if row[3] == "asss":
        assert sorted(seen) == sorted([(shape("source"), True), (shape("target"), True), (shape("target"), False)])
        assert d_g.call_count == 6
        return
    no_grad = row[3]["teachers"] + row[3].get("frozen_encoder", [])     # DAFormer: EMA teacher, ImageNet encoder
    expected = [(shape(k), False) for k in no_grad] + [(shape(k), True) for g in row[3]["student"] for k in g]
    assert seen == expected


def test_daformer_rows_run_mit_b5_at_paper_scale_and_mit_tiny_when_small(tmp_path):
    """The --stack daformer rows pass --mit (B5 at the paper's scale, tiny for --small), never --layers, and the
    floor's passes are those of DAFormer's step: two student streams, the teacher and the frozen encoder."""
    rows = [r for r in speed.ROWS if r[1] == "--stack daformer"]
    assert [r[0] for r in rows] == ["dacs.py", "iidm.py"]
    for row in rows:
        assert row[3]["teachers"] == ["crop"] and row[3]["frozen_encoder"] == ["crop"]
        for preset, layers, mit in (("paper", [3, 4, 23, 3], "b5"), ("small", [1, 1, 1, 1], "tiny")):
            argv = speed.script_argv(row, preset, tmp_path, tmp_path / "run", 3, "cpu", False, 0, layers)
            assert argv[argv.index("--mit") + 1] == mit and "--layers" not in argv
            assert argv[argv.index("--stack") + 1] == "daformer"
            args = __import__(row[0][:-3]).parse_args(argv)       # the script accepts them (no --layers refusal)
            assert (args.stack, args.mit) == ("daformer", mit)
    assert speed.network_size("daformer", [3, 4, 23, 3]) == "b5" and speed.network_size("deeplabv2", [1, 2, 1, 1]) \
        == [1, 2, 1, 1]


def test_hrda_rows_pass_the_scripts_flags_and_their_floor_trains_through_the_detail_box(tmp_path):
    """dacs.py --stack hrda and iidm.py --stack hrda --mic: the scripts accept the rows' arguments at both presets
    (HRDA's crop sizes), and the floor runs the teacher's inference path (no box, no grad) on the crop, the frozen
    encoder on its context view, then each student stream through model(x, box) with a graph."""
    rows = [r for r in speed.ROWS if speed.row_network(r) == "hrda"]
    assert [speed.row_name(r[0], r[1]) for r in rows] == ["dacs.py --stack hrda", "iidm.py --stack hrda --mic"]
    for row in rows:
        module = __import__(row[0][:-3])
        for preset, layers, mit, crop in (("paper", [3, 4, 23, 3], "b5", [1024, 1024]),
                                          ("small", [1, 1, 1, 1], "tiny", [128, 128])):
            args = module.parse_args(speed.script_argv(row, preset, tmp_path, tmp_path / "run", 3, "cpu", True, 0,
                                                       layers))
            assert (args.stack, args.mit, list(args.crop_size), args.mic) == ("hrda", mit, crop, "--mic" in row[2])
        seen, encoder = [], []

        def spy(model, x, box=None):
            seen.append((tuple(x.shape), box is not None, torch.is_grad_enabled() and model.training))
            return forward(model, x, box)

        def spy_encoder(model, x):
            encoder.append((tuple(x.shape), torch.is_grad_enabled()))
            return encode(model, x)
        forward, encode = common.HRDA.forward, common.MixVisionTransformer.forward
        sizes, batch = {"hrda_crop": (64, 64), "hrda_context": (32, 32)}, module.PAPER["batch_size"][0]
        with mock.patch.object(common.HRDA, "forward", spy), \
                mock.patch.object(common.MixVisionTransformer, "forward", spy_encoder):
            speed.time_floor(row, sizes, batch, [1, 1, 1, 1], torch.device("cpu"),
                             training.Amp(torch.device("cpu"), False), warmup=0, steps=1)
        crop, context = (batch, 3, 64, 64), (batch, 3, 32, 32)
        assert seen == [(crop, False, False)] + [(crop, True, True)] * len(row[3]["student"])
        # teacher: context view + its detail window; frozen encoder: the context view; students: context + box
        assert encoder[:3] == [(context, False), (crop, False), (context, False)]
        assert encoder[3:] == [(context, True), ((batch, 3, 32, 32), True)] * len(row[3]["student"])


def test_daformer_floor_flops_count_students_teacher_and_frozen_encoder():
    """dacs.py --stack daformer: two student passes (fwd + bwd), the teacher's and the ImageNet encoder's forwards."""
    from torch.utils.flop_counter import FlopCounterMode
    row = next(r for r in speed.ROWS if r[:2] == ("dacs.py", "--stack daformer"))
    model = common.daformer_segmentor(19, "tiny")
    x = torch.randn(1, 3, 64, 64)
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    with FlopCounterMode(display=False) as bwd:
        out.float().mean().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        model.backbone(x)
    flops = speed.floor_flops(row, {"crop": (64, 64)}, 1, [1, 1, 1, 1])
    assert flops == 3 * fwd.get_total_flops() + 2 * bwd.get_total_flops() + enc.get_total_flops()


def test_loader_measures_the_scripts_pipelines(bench, tmp_path):
    data, _, _ = bench
    speed_json = tmp_path / "speed.json"   # a paper-settings record: the consumption column reads it
    speed_json.write_text(json.dumps([{"script": "dacs.py", "stage": None, "preset": "paper", "ms_per_iter": 500.0,
                                       "batch_per_stream": 2, "device": "cuda (X)", "amp": True}]))
    (tmp_path / "RESULTS.md").write_text(OLD_RESULTS)
    result = loader.main(["--small", "--data-root", str(data), "--workers", "0", "1", "--seconds", "0.2",
                          "--scripts", "dacs.py", "dldm.py", "--speed-json", str(speed_json),
                          "--json", str(tmp_path / "loader.json"), "--results", str(tmp_path / "RESULTS.md")])
    assert json.loads((tmp_path / "loader.json").read_text()) == json.loads(json.dumps(result))
    used = {name for p in result["pipelines"] for name in p["used_by"]}
    assert used == {"dacs.py (gta5)", "dacs.py (synthia)", "dacs.py --stack daformer (gta5)",
                    "dacs.py --stack daformer (synthia)", "dacs.py --stack hrda (gta5)",
                    "dacs.py --stack hrda (synthia)", "dldm.py M_RL (gta5)", "dldm.py M_RL (synthia)",
                    "dldm.py M_SL (gta5)", "dldm.py M_SL (synthia)", "dldm.py student (gta5)",
                    "dldm.py student (synthia)"}
    names = [p["pipeline"] for p in result["pipelines"]]
    assert len(names) == len(set(names))                                     # identical configurations once
    assert any(n.startswith("LabSourceDataset(gta5") and "lab=online" in n for n in names)
    for p in result["pipelines"]:
        assert set(p["images_per_s"]) == {"0", "1"} and min(p["images_per_s"].values()) > 0
        assert 0 < p["ms_per_batch_p50"] <= p["ms_per_batch_p90"]
        dacs = "dacs.py (gta5)" in p["used_by"]
        assert [c["images_per_s"] for c in p["consumed"]] == ([4.0] if dacs else [])   # 2 images / 0.5 s
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Data-loading throughput" in text and "## Demo dataset domain gap\n\nkept as it is\n" in text
    assert "old text" in text                                                 # not loader.py's section


def test_loader_together_runs_every_stream_of_a_row_at_once_against_the_step(bench, tmp_path):
    """--together: one record per row with all of its script's streams (as many as the script builds), their
    iterations/s on the original and the prepared root; the step's ms from --step-ms (per row, else the bare
    value), else speed.json; the ratio in the table is delivered it/s x ms / 1000."""
    data, _, _ = bench
    speed_json = tmp_path / "speed.json"
    speed_json.write_text(json.dumps([{"script": "dldm.py", "stage": "student", "preset": "paper",
                                       "ms_per_iter": 400.0, "batch_per_stream": 1, "device": "cuda (X)",
                                       "amp": True}]))
    (tmp_path / "RESULTS.md").write_text(OLD_RESULTS)
    argv = ["--small", "--data-root", str(data), "--together", "--prepared", "--stream-workers", "1",
            "--seconds", "0.2", "--scripts", "dldm.py", "iidm.py", "--sources", "gta5", "--speed-json",
            str(speed_json), "--step-ms", "dldm.py M_RL=250", "--json", str(tmp_path / "together.json"),
            "--results", str(tmp_path / "RESULTS.md")]
    result = loader.main(argv)
    assert json.loads((tmp_path / "together.json").read_text()) == json.loads(json.dumps(result))
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"dldm.py M_RL (gta5)", "dldm.py M_SL (gta5)", "dldm.py student (gta5)", "iidm.py (gta5)",
                         "iidm.py --stack daformer (gta5)", "iidm.py --stack hrda --mic (gta5)"}
    for k, (name, row, _) in enumerate(r for r in loader.loader_rows() if r[0] in rows):   # what the scripts build
        (tmp_path / str(k)).mkdir()
        captured = loader.capture(row, "small", speed.write_bench_data(data, "small"), tmp_path / str(k))
        assert rows[name]["streams"] == [loader.describe(d, s) for d, s in captured]
    assert len(rows["iidm.py (gta5)"]["streams"]) == 3 and len(rows["dldm.py M_RL (gta5)"]["streams"]) == 2
    assert rows["dldm.py M_RL (gta5)"]["streams"][0].startswith("LabSourceDataset(gta5")
    for r in rows.values():
        assert r["iterations_per_s"] > 0 and r["prepared_iterations_per_s"] > 0
        assert r["images_per_s"] == pytest.approx([r["iterations_per_s"] * b for b in r["batches"]])
    assert (rows["dldm.py M_RL (gta5)"]["step_ms"], rows["dldm.py M_RL (gta5)"]["step_from"]) == (250.0, "--step-ms")
    assert (rows["dldm.py student (gta5)"]["step_ms"], rows["dldm.py student (gta5)"]["step_from"]) == \
        (400.0, "speed.json: cuda (X) amp")
    assert rows["iidm.py (gta5)"]["step_ms"] is None
    text = (tmp_path / "RESULTS.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| dldm.py M_RL (gta5) |"))
    assert f"| {rows['dldm.py M_RL (gta5)']['iterations_per_s'] * 0.25:.2f} |" in line
    assert "## Demo dataset domain gap\n\nkept as it is\n" in text and "old text" in text
    assert "## Data loading, all of a script's streams together" in text
    assert "## Data-loading throughput" not in text                           # the per-pipeline table untouched
    assert loader.parse_args(["--together", "--step-ms", "30"]).step_ms == {None: 30.0}
    assert loader.parse_args(["--together"]).stream_workers == training.shared_parser({}).get_default("workers")
    for bad in (["--step-ms", "0"], ["--step-ms", "nope.py=20"], ["--step-ms", "dacs.py=fast"]):
        with pytest.raises(common.DataError, match="--step-ms"):
            loader.parse_args(["--together", *bad])


def test_loader_together_writes_its_table_after_every_row(bench, tmp_path, monkeypatch):
    """A run cut after its first row (gpu_check.sh's time limit) keeps that row in the JSON and RESULTS.md."""
    data, _, _ = bench
    rates = iter([(5.0, [10.0, 10.0])])
    monkeypatch.setattr(loader, "together_rate", lambda streams, workers, seconds: next(rates))
    with pytest.raises(StopIteration):
        loader.main(["--small", "--data-root", str(data), "--together", "--scripts", "dacs.py", "--sources", "gta5",
                     "--step-ms", "500", "--json", str(tmp_path / "t.json"), "--results", str(tmp_path / "R.md")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["row"], r["iterations_per_s"]) for r in rows] == [("dacs.py (gta5)", 5.0)]
    assert "| dacs.py (gta5) |" in (tmp_path / "R.md").read_text() and "| 2.50 |" in (tmp_path / "R.md").read_text()


def test_loader_rows_cover_every_speed_row_and_source():
    names = [name for name, _, _ in loader.loader_rows()]
    for script, stage, extra, _ in speed.ROWS:
        sources = ("gta5", "synthia") if "--source" in extra else ("cityscapes",)
        for source in sources:
            assert f"{speed.row_name(script, stage)} ({source})" in names


def test_bad_arguments_exit_2(tmp_path, capsys):
    for argv, what in ((["--device", "cuda", "--steps", "10"], "--steps 10"), (["--scripts", "nope.py"], "nope.py")):
        if "cuda" in argv and torch.cuda.is_available():
            continue
        with pytest.raises(common.DataError, match=what):
            speed.parse_args(argv)
    with pytest.raises(common.DataError, match="--workers 1 2: expected counts >= 0 including 0"):
        loader.parse_args(["--workers", "1", "2"])
    with pytest.raises(SystemExit) as exc:
        training.run_script(lambda: loader.main(["--scripts", "nope.py", "--json", str(tmp_path / "x.json")]))
    assert exc.value.code == 2 and "error: --scripts nope.py" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_floor_flops_count_every_pass_at_the_batch():
    """FLOP of the floor from fake tensors: the mean-teacher row's two student passes (fwd + bwd) and one
    teacher forward, proportional to the batch."""
    from torch.utils.flop_counter import FlopCounterMode
    row, sizes = speed.ROWS[0], {"crop": (32, 32)}
    one, two = (speed.floor_flops(row, sizes, b, [1, 1, 1, 1]) for b in (1, 2))
    model = common.DeepLabV2(19, layers=[1, 1, 1, 1])
    with FlopCounterMode(display=False) as fwd:
        out = model(torch.randn(1, 3, 32, 32))
    with FlopCounterMode(display=False) as bwd:
        out.float().mean().backward()
    assert one == 3 * fwd.get_total_flops() + 2 * bwd.get_total_flops() and two == 2 * one


def test_compile_rows_run_the_scripts_compiled_beside_the_eager_rows(bench, tmp_path):
    """--compile both: an eager and a --compile record (the scripts' flags passed through; aot_eager here, the
    inductor compile of every row would take minutes on a CPU) with the start-up each paid, in one table."""
    data, _, _ = bench
    compiled = []
    original = training.compile_networks

    def spy(args, *networks):
        compiled.append((args.compile, args.compile_mode, args.compile_backend))
        return original(args, *networks)
    with mock.patch.object(training, "compile_networks", spy):
        records = speed.main(["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--threads", "1",
                              "--workers", "0", "--amp", "off", "--compile", "both", "--compile-backend", "aot_eager",
                              "--scripts", "classmix_ssl.py", "--data-root", str(data),
                              "--json", str(tmp_path / "s.json"), "--results", str(tmp_path / "RESULTS.md")])
    assert compiled == [(False, "default", "inductor"), (True, "default", "aot_eager")]
    assert [(r["compile"], r["compile_backend"]) for r in records] == [(False, None), (True, "aot_eager")]
    assert all(r["ms_per_iter"] > 0 and r["startup_s"] > 0 for r in records)
    section = (tmp_path / "RESULTS.md").read_text()
    assert "| classmix_ssl.py | " in section and "| classmix_ssl.py --compile (aot_eager) | " in section
    with pytest.raises(common.DataError, match="--compile on or both"):
        speed.parse_args(["--device", "cpu", "--compile-mode", "reduce-overhead"])


def test_live_bytes_follow_storages_views_graphs_and_frees():
    """The estimate's tracker: one count per storage (views and in-place results share it), the tensors
    autograd saves stay counted until the backward, freed storages leave the sum; host reads answered."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = memory.LiveFakeBytes()
    x = fake_mode.from_tensor(torch.zeros(1000))
    w = torch.nn.Parameter(fake_mode.from_tensor(torch.zeros(1000)))
    with fake_mode, tracker:
        tracker.register([x, w])
        assert tracker.bytes == 8000
        y = x * 2
        y.view(10, 100).add_(1)                                              # a view, in place: no new bytes
        assert tracker.bytes == 12000
        del y
        loss = (x * w).exp().sum()                                           # mul's output freed, exp's saved
        tracker.sweep()
        assert tracker.bytes == 8000 + 4000 + 4                              # x, w; exp's output; the loss
        loss.backward()
        del loss
        tracker.sweep()
        assert tracker.bytes == 12000                                        # w.grad kept; the graph gone
        assert 16000 < tracker.peak < 20000   # x, w, one of exp's output / its grad / w.grad: freed as it goes
        assert bool((w.grad > 0).all()) is True and sum(tracker.assumed.values()) == 1


def test_op_count_of_the_fake_step_equals_the_real_step(bench):
    """memory.py runs the script's own step: its device + host ops are those of a real CPU step."""
    data, _, _ = bench
    layers, small = [1, 1, 1, 1], data / "bench_small"
    fake = memory.estimate(speed.ROWS[0], "small", small, False, 1, layers)
    assert fake["device_ops_per_step"] + fake["host_ops_per_step"] == memory.count_ops_cpu(
        speed.ROWS[0], small, 1, layers)
    assert fake["peak_bytes"] > fake["start_bytes"] > 0 and fake["assumed"] == {}


def test_memory_estimate_runs_the_daformer_step_with_its_frozen_encoder(bench):
    """dacs.py --stack daformer on fake tensors (MiT tiny): what stays alive between steps holds the student, the
    EMA teacher, the gradients, AdamW's two moments and the frozen ImageNet encoder copy made by deepcopy."""
    data, _, _ = bench
    row = next(r for r in speed.ROWS if r[:2] == ("dacs.py", "--stack daformer"))
    est = memory.estimate(row, "small", data / "bench_small", False, 1, [1, 1, 1, 1])
    model = common.daformer_segmentor(19, "tiny")
    weights, encoder = (sum(p.numel() * 4 for p in m.parameters()) for m in (model, model.backbone))
    assert est["start_bytes"] >= 5 * weights + encoder and est["peak_bytes"] > est["start_bytes"]
    assert est["assumed"] == {}


def test_estimate_runs_layer_norm_in_fp32_under_amp_as_cuda_autocast():
    """CPU autocast leaves a bf16 LayerNorm input in bf16, CUDA's runs it in fp32: the estimate follows CUDA."""
    norm, x = torch.nn.LayerNorm(8), torch.randn(2, 8)
    with mock.patch.object(torch.nn.functional, "layer_norm", memory.cuda_autocast_layer_norm(
            torch.nn.functional.layer_norm)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert norm(x.bfloat16()).dtype == torch.float32
        assert norm(x.bfloat16()).dtype == torch.bfloat16                  # outside autocast: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16                  # what CPU autocast does


def test_memory_table_flags_the_11_gb_bar():
    rec = {"script": "dacs.py", "stage": None, "sizes": "paper", "layers": [3, 4, 23, 3], "command": "c", "date": "d",
           "commit": "x", "machine": "m",
           "torch": "t", "peak_bytes": 12e9, "start_bytes": 1e9, "device_ops_per_step": 10, "host_ops_per_step": 2,
           "small_device_ops_per_step": 10, "small_host_ops_per_step": 2, "real_cpu_ops_per_step": None,
           "assumed": {"dacs.py:1": 1}}
    text = memory.results_section([{**rec, "amp": False, "real_cpu_ops_per_step": 12}, {**rec, "amp": True}])
    assert "| dacs.py | 12.00 (11.18) | 1.00 | 12.00 (11.18) | 1.00 | **no** | 10 + 2 / 10 + 2 / 12 | 10 + 2 / " \
           "10 + 2 |" in text and "dacs.py:1" in text


def test_memory_main_writes_records_and_its_section(bench, tmp_path):
    data, _, _ = bench
    (tmp_path / "RESULTS.md").write_text(OLD_RESULTS)
    argv = ["--data-root", str(data), "--sizes", "small", "--layers", "1", "1", "1", "1", "--amp", "off",
            "--no-real-count", "--scripts", "dldm.py M_RL", "--json", str(tmp_path / "m.json"),
            "--results", str(tmp_path / "RESULTS.md")]
    records = memory.main(argv)
    assert json.loads((tmp_path / "m.json").read_text()) == records
    (r,) = records
    assert (r["script"], r["stage"], r["amp"], r["layers"]) == ("dldm.py", "M_RL", False, [1, 1, 1, 1])
    assert r["peak_bytes"] > r["start_bytes"] > 0 and r["command"].startswith("python benchmarks/memory.py")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Demo dataset domain gap\n\nkept as it is\n" in text
    assert "| dldm.py M_RL (**not paper settings**: --sizes small, light network) | " in text
    assert memory.main(argv)[0]["date"] and len(json.loads((tmp_path / "m.json").read_text())) == 1   # merged
    for bad, what in ((["--scripts", "nope.py"], "--scripts nope.py"), (["--layers", "0", "1", "1", "1"], "--layers")):
        with pytest.raises(common.DataError, match=what):
            memory.parse_args(bad)


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
