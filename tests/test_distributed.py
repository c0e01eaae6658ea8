"""Multi-process training (torchrun + DistributedDataParallel) on the CPU with the gloo backend.

Every run here is a real `python -m torch.distributed.run --nproc_per_node=2` launch of this file, which
runs one rank of a method script (see `rank_main` at the bottom) with a spy on common's checkpoint, file
and confusion-matrix functions: each rank records digests of the student's and the teacher's weights at
every checkpoint, the files it writes and its confusion matrix.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import LABEL_IDS, ROOT, make_cityscapes, make_gta5, make_synthia, random_ids, write_palette, write_rgb

TINY = ["--layers", 1, 1, 1, 1, "--init", "none", "--source-size", 64, 32, "--target-size", 64, 32,
        "--workers", 0, "--log-every", 1, "--device", "cpu"]
FLAGS = {  # the tiny settings of each script's own tests
    "dacs": ["--crop-size", 32, 32],
    "classmix_ssl": ["--n-labeled", 2],
    "iidm": ["--crop-size", 32, 32, "--n-labeled", 2, "--rcs-min-pixels", 40],
    "camix": ["--warmup-iters", 1, "--val-size", 64, 32, "--crop-size", 32, 32, "--build-prior"],
    "asss": ["--n-labeled", 2],
    "dldm": ["--n-labeled", 2, "--poly-iters", 10, "--pl-bins", 4096, "--rounds", 2],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny datasets, with 3 val images (an uneven split over 2 ranks)."""
    r = tmp_path_factory.mktemp("data")
    make_gta5(r)
    make_synthia(r)
    make_cityscapes(r, n_val=3)
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, root, out, *flags, env=None):
    """(argv, environment, spy folder) of a 2-process torchrun of one script on the CPU."""
    spy = Path(str(out) + "_spy")
    spy.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(Path(__file__)), script, *map(str, TINY + FLAGS[script]), "--data-root", str(root),
            "--out-dir", str(out), *map(str, flags)]
    return argv, {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_SPY": str(spy), **(env or {})}, spy


def launch(script, root, out, *flags, env=None):
    """Run a 2-process torchrun of one script to its end; returns (completed process, spy folder)."""
    argv, run_env, spy = command(script, root, out, *flags, env=env)
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=run_env, timeout=300), spy


def records(spy, rank):
    """The spy's per-checkpoint digests of one rank: {iteration: {"model": ..., "ema": ...}}."""
    lines = (spy / f"rank{rank}.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines)}


def written(spy, rank):
    path = spy / f"writes{rank}.txt"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.fixture(scope="module")
def dacs_run(root, tmp_path_factory):
    """An uninterrupted 2-process DACS run of 4 iterations, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("dacs") / "run"
    proc, spy = launch("dacs", root, out, "--iters", 4, "--save-every", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, spy, proc


def check_run(out, spy, proc, iters, log_dir=None, stages=1):
    """Exit 0; the run's files written by rank 0 only (rank 1: its share of DLDM's pseudo-labels); one
    log record and console line per iteration."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = log_dir or out
    assert len((log_dir / "log.jsonl").read_text().splitlines()) == iters
    assert proc.stdout.count(f"it {iters}/{iters} ") == stages
    assert written(spy, 0).count(str(out / "config.json")) == 1
    assert not written(spy, 1) or all("/pseudo/" in p for p in written(spy, 1)), written(spy, 1)[:3]
    assert not list(Path(out).rglob(".*.tmp*")) and not (Path(out) / "run.lock").exists()


def test_dacs_two_processes(dacs_run):
    out, spy, proc = dacs_run
    check_run(out, spy, proc, 4)
    assert proc.stdout.count("eval it 4 student") == 1 and "global 4" in proc.stdout
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["world"] == 2 and len(ck["rng_ranks"]) == 2 and ck["iteration"] == 4


def test_teacher_and_student_identical_on_both_ranks(dacs_run):
    _, spy, _ = dacs_run
    a, b = records(spy, 0), records(spy, 1)
    assert sorted(a) == sorted(b) == [2, 4]
    for it in (2, 4):
        assert a[it]["ema"] == b[it]["ema"] and a[it]["model"] == b[it]["model"]
    assert a[2]["ema"] != a[4]["ema"]   # the teacher moved


def test_compiled_ddp_equals_the_eager_run(root, dacs_run, tmp_path):
    """--compile under torchrun compiles the DDP wrapper (PyTorch's order for DDP): the same weights on both ranks
    as the eager 2-process run (aot_eager backend; gradient_as_bucket_view on in both)."""
    _, ref_spy, _ = dacs_run
    proc, spy = launch("dacs", root, tmp_path / "run", "--iters", 4, "--save-every", 2, "--compile",
                       "--compile-backend", "aot_eager")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert records(spy, rank) == records(ref_spy, rank)


def test_kill_9_then_resume_equals_the_uninterrupted_run(root, dacs_run, tmp_path):
    ref_out, ref_spy, _ = dacs_run
    out = tmp_path / "run"
    proc, _ = launch("dacs", root, out, "--iters", 4, "--save-every", 2, env={"DDP_TEST_KILL_AT": "2"})
    assert proc.returncode != 0 and torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2
    proc, spy = launch("dacs", root, out, "--iters", 4, "--save-every", 2, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert records(spy, rank)[4] == records(ref_spy, rank)[4]
    ours, ref = (torch.load(p / "checkpoint.pth", weights_only=True) for p in (out, ref_out))
    for key in ("model", "ema_model"):
        assert all(torch.equal(ours[key][k], ref[key][k]) for k in ref[key])   # BN statistics too (rank 0's)


def test_sigterm_to_every_process_checkpoints_once_and_stops_every_rank(root, tmp_path):
    """A scheduler's SIGTERM to the whole process group (torchrun forwards it once more to the workers)."""
    import time
    out = tmp_path / "run"
    argv, run_env, spy = command("dacs", root, out, "--iters", 60, "--save-every", 1000, "--eval-every", 0)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=run_env,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended or never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and stdout.count("stopped by SIGTERM") == 1, stderr[-3000:]
    iteration = torch.load(out / "checkpoint.pth", weights_only=True)["iteration"]
    assert 2 <= iteration < 60
    assert list(records(spy, 0)) == list(records(spy, 1)) == [iteration]   # both ranks, one checkpoint
    assert records(spy, 0) == records(spy, 1) and written(spy, 1) == []


def test_a_nan_loss_on_one_rank_stops_every_rank_with_exit_3(root, tmp_path):
    """The divergence guard agrees over the ranks at the log step: rank 1's NaN stops rank 0 too, both exit 3."""
    proc, spy = launch("dacs", root, tmp_path / "run", "--iters", 6, "--log-every", 3, "--save-every", 1,
                       env={"DDP_TEST_NAN_ON_RANK": "1"})
    assert proc.returncode != 0
    assert "error: iteration 2: loss_" in proc.stderr, proc.stderr[-3000:]        # rank 1: its own loss
    assert "error: iteration 2: a loss is not finite on another process" in proc.stderr, proc.stderr[-3000:]
    # torchrun's summary: a rank that exits 3 first gets the other one SIGTERMed, which may land after its error
    # line and before its own exit 3 (both stopped by the guard: the two lines above)
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert "3" in codes and set(codes) <= {"3", "-15"}, proc.stderr[-3000:]
    assert "it 3/6" not in proc.stdout


def test_distributed_evaluation_equals_one_process_exactly(root, dacs_run, tmp_path, monkeypatch):
    import common
    import dacs
    single = []
    real = common.metrics_from_confusion
    monkeypatch.setattr(common, "metrics_from_confusion", lambda cm, *a, **k: single.append(cm) or real(cm, *a, **k))
    ckpt = dacs_run[0] / "checkpoint.pth"
    flags = ["--eval-only", "--checkpoint", ckpt, "--save-predictions"]
    proc, spy = launch("dacs", root, tmp_path / "two", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cm0, cm1 = (torch.load(spy / f"cm{r}.pt", weights_only=True) for r in (0, 1))
    one = dacs.main([*map(str, TINY + FLAGS["dacs"]), "--data-root", str(root), "--out-dir", str(tmp_path / "one"),
                     *map(str, flags)])
    assert torch.equal(cm0, single[0]) and torch.equal(cm1, single[0]) and single[0].sum() > 0
    assert (tmp_path / "two" / "metrics.json").read_text() == (tmp_path / "one" / "metrics.json").read_text()
    assert one["iteration"] == 4
    for folder in ("predictions", "vis"):
        names = sorted(p.name for p in (tmp_path / "two" / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "one" / folder).iterdir()) and len(names) == 3
        for name in names:
            assert (tmp_path / "two" / folder / name).read_bytes() == (tmp_path / "one" / folder / name).read_bytes()
    assert written(spy, 1) == []


@pytest.fixture(scope="module")
def labelled_root(tmp_path_factory):
    """GTA5 and Cityscapes with every pixel of a class (no void): the per-rank mean of the CE over the
    valid pixels then has the same denominator on every rank, as the global mean of one process."""
    r = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(3)
    for i in range(1, 5):
        write_rgb(r / "gta5" / "images" / f"{i:05d}.png", rng, 24, 40)
        write_palette(r / "gta5" / "labels" / f"{i:05d}.png", random_ids(rng, 24, 40, LABEL_IDS[:7]))
    make_cityscapes(r)
    for path in (r / "cityscapes" / "gtFine").rglob("*_gtFine_labelIds.png"):
        ids = np.asarray(Image.open(path))
        Image.fromarray(np.where(np.isin(ids, LABEL_IDS[7:]), LABEL_IDS[0], ids).astype(np.uint8), mode="L").save(path)
    return r


SUPERVISED = ["--stage", "sl", "--round", 1, "--sync-bn", "--iters", 3, "--save-every", 3]


def test_two_processes_equal_one_process_with_twice_the_batch(labelled_root, tmp_path):
    """DLDM's M_SL stage (supervised: a source and a target batch, two backward passes per step, both
    heads) with --sync-bn (here a CPU stand-in for the CUDA kernel): 2 processes x batch b == 1 process x
    batch 2b; and != 1 process x batch b (the check can fail)."""
    import dldm
    proc, spy = launch("dldm", labelled_root, tmp_path / "two", *SUPERVISED, "--batch-size", 1,
                       env={"DDP_TEST_CPU_SYNC_BN": "1"})
    check_run(tmp_path / "two", spy, proc, 3, tmp_path / "two" / "round1" / "sl")
    one = [*map(str, TINY + FLAGS["dldm"] + SUPERVISED), "--data-root", str(labelled_root)]
    for batch in (2, 1):
        dldm.main([*one, "--batch-size", str(batch), "--out-dir", str(tmp_path / f"one{batch}")])
    two, ref, half = (torch.load(tmp_path / d / "round1" / "sl" / "checkpoint.pth", weights_only=True)["model"]
                      for d in ("two", "one2", "one1"))
    for k, v in ref.items():
        torch.testing.assert_close(two[k], v, rtol=1e-3, atol=2e-5, msg=k)   # float sums in another order
    assert max((half[k] - v).abs().max() for k, v in ref.items() if "running" not in k) > 1e-4
    assert records(spy, 0) == records(spy, 1)


@pytest.mark.parametrize("script", ["classmix_ssl", "iidm", "camix", "asss", "dldm"])
def test_script_runs_under_two_processes(root, tmp_path, script):
    """A few iterations of each other script (dacs: the fixture above) on 2 processes."""
    out = tmp_path / "run"
    proc, spy = launch(script, root, out, "--iters", 2, "--save-every", 2)
    dldm = script == "dldm"         # 2 rounds of M_RL, M_SL, M_S
    check_run(out, spy, proc, 2, out / "round2" / "student" if dldm else out, 6 if dldm else 1)
    a, b = ((spy / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1))
    assert a == b and len(a) == (6 if dldm else 1)   # identical weights on both ranks (dldm: every stage's)
    if dldm:                        # round 1's pseudo-labels: split over the ranks, equal to one process's
        assert written(spy, 1) and all("/pseudo/" in p for p in written(spy, 1))
        import dldm as module
        one = tmp_path / "one"
        (one / "round1" / "student").mkdir(parents=True)
        shutil.copy(out / "round1" / "student" / "checkpoint.pth", one / "round1" / "student")
        module.main([*map(str, TINY + FLAGS["dldm"]), "--data-root", str(root), "--out-dir", str(one),
                     "--iters", "2", "--stage", "pseudo", "--round", "1"])
        files = sorted(p.name for p in (one / "round1" / "pseudo").iterdir())
        assert len(files) == 7 and files == sorted(p.name for p in (out / "round1" / "pseudo").iterdir())
        for name in files:           # thresholds.json (from the summed histograms) and the 6 label maps
            assert (one / "round1" / "pseudo" / name).read_bytes() == (out / "round1" / "pseudo" / name).read_bytes()


def test_without_unused_parameters_ddp_skips_the_search():
    """find_unused_parameters only for the two-branch ASPP (or a script's own unused head); DACS trains without
    it with --aspp-full (the test below: DDP raises at the 2nd iteration if a parameter went unused)."""
    import common
    import training
    assert training.has_unused_aspp(common.DeepLabV2(layers=(1, 1, 1, 1)))
    assert not training.has_unused_aspp(common.DeepLabV2(layers=(1, 1, 1, 1), aspp_full=True))
    assert training.has_unused_aspp(common.DeepLabV2(layers=(1, 1, 1, 1), multi_level=True))


def test_dacs_with_the_full_aspp_runs_under_two_processes(root, tmp_path):
    out = tmp_path / "run"
    proc, spy = launch("dacs", root, out, "--iters", 3, "--save-every", 3, "--aspp-full")
    check_run(out, spy, proc, 3)


@pytest.mark.parametrize("script", ["dacs", "iidm"])
def test_no_sync_on_all_but_the_last_backward_gives_the_same_update(root, tmp_path, script):
    """training.grad_sync: DDP's no_sync() on a step's earlier backward passes (DACS: the source CE before the
    mixed pass; IIDM: L_s, L_t and L_inter before L_intra) gives the weights of an all-reduce at every backward,
    with one all-reduce per step; with the last backward under no_sync too the ranks drift apart."""
    runs = {}
    for mode in ("last", "every", "never"):   # all-reduce at the last backward (the scripts) / at each / never
        out = tmp_path / mode
        proc, spy = launch(script, root, out, "--iters", 3, "--save-every", 3, env={"DDP_TEST_GRAD_SYNC": mode})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = (torch.load(out / "checkpoint.pth", weights_only=True), records(spy, 0)[3], records(spy, 1)[3],
                      len((spy / "allreduce0.txt").read_text().splitlines()),
                      torch.load(spy / "buffers1.pt", weights_only=True))
    last, every, never = runs["last"], runs["every"], runs["never"]
    assert last[1] == last[2] and every[1] == every[2]          # both ranks hold the same weights
    for key in ("model", "ema_model"):                          # BN statistics too (rank 0's)
        for k, v in every[0][key].items():
            torch.testing.assert_close(last[0][key][k], v, rtol=1e-4, atol=1e-6, msg=k)   # summation order
    for k, v in every[4].items():   # rank 1's: DDP still broadcasts rank 0's before the pass after a no_sync pass
        torch.testing.assert_close(last[4][k], v, rtol=1e-4, atol=1e-6, msg=k)
    passes = {"dacs": 2, "iidm": 4}[script]                     # backward passes per step
    assert every[3] == passes * last[3] > 0                     # bucket all-reduces: once per step, not per pass
    assert never[1] != never[2] and never[3] == 0


def test_world_settings_resolved_or_refused_before_anything_is_written():
    """training.apply_world for K = 4 (what each script calls first under torchrun)."""
    import classmix_ssl
    import common
    import training
    import dacs
    cpu, four = torch.device("cpu"), common.Dist(0, 4, 0)
    args = dacs.parse_args(["--batch-size", "8", "--global-batch", "paper"])
    training.apply_world(args, four, cpu)
    assert (args.batch_size, args.lr, args.iters) == (2, 2.5e-4, 250000)
    args = dacs.parse_args(["--iters", "10", "--scale-lr", "--scale-iters"])
    training.apply_world(args, four, cpu)
    assert (args.batch_size, args.lr, args.iters) == (2, 1e-3, 3)
    args = dacs.parse_args(["--iters", "10", "--scale-lr"])
    training.apply_world(args, common.Dist(), cpu)           # one process: nothing changes
    assert (args.lr, args.iters) == (2.5e-4, 10)
    refused = [(dacs, ["--demo"], "--demo runs in one process"),
               (dacs, ["--sync-bn"], "--sync-bn: torch.nn.SyncBatchNorm runs on CUDA devices only"),
               (dacs, ["--batch-size", "6", "--global-batch", "paper"], "--global-batch paper: --batch-size 6 over 4"),
               (dacs, ["--global-batch", "paper", "--scale-lr"], "--scale-lr/--scale-iters scale with"),
               (classmix_ssl, ["--batch-size", "4", "--global-batch", "paper"], "ClassMix pairs image k with k")]
    for module, flags, words in refused:
        with pytest.raises(common.DataError, match=words):
            training.apply_world(module.parse_args(flags), four, cpu, pairs_within_batch=module is classmix_ssl)


# ------------------------------------------------------------------ one rank of a launch (torchrun runs this file)

def params_digest(state):
    """sha256 over the parameters of a state dict (BN running statistics left out: they are per rank)."""
    h = hashlib.sha256()
    for k, v in state.items():
        if "running_" not in k and "num_batches_tracked" not in k:
            h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cpu_sync_batch_norm(self, x):
    """SyncBatchNorm's training forward for CPU tensors (PyTorch ships CUDA kernels only): mean and variance
    of the images of all ranks through an autograd all_reduce, running statistics as nn.BatchNorm2d."""
    if not self.training:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    from torch.distributed.nn.functional import all_reduce
    c = x.shape[1]
    total = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.new_tensor([x.numel() / c])]))
    n = total[-1]
    mean = total[:c] / n
    var = total[c:2 * c] / n - mean * mean
    with torch.no_grad():
        self.num_batches_tracked.add_(1)
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * n / (n - 1), self.momentum)
    shape = (1, c, 1, 1)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape)


def rank_main(script, argv):
    """Run one rank of `script` with the spies (and the CPU SyncBatchNorm when asked)."""
    import importlib
    import common
    import training
    spy, rank = Path(os.environ["DDP_TEST_SPY"]), int(os.environ["RANK"])
    kill_at = int(os.environ.get("DDP_TEST_KILL_AT", -1))
    real_write, real_path, real_metrics = training.write_checkpoints, common.atomic_path, common.metrics_from_confusion

    def write_checkpoints(out_dir, state, keep=False, dist=common.Dist()):
        real_write(out_dir, state, keep, dist)
        record = {"iteration": state["iteration"], "model": params_digest(state["model"]),
                  "ema": params_digest(state.get("ema_model", {}))}
        with open(spy / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if os.environ.get("DDP_TEST_GRAD_SYNC"):   # this rank's own BN statistics (rank 0's are the checkpoint's)
            torch.save({k: v for k, v in state["model"].items() if "running_" in k}, spy / f"buffers{rank}.pt")
        if state["iteration"] == kill_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def atomic_path(path):
        with open(spy / f"writes{rank}.txt", "a") as f:
            f.write(f"{path}\n")
        with real_path(path) as tmp:
            yield tmp

    def metrics_from_confusion(cm, *args, **kw):
        torch.save(cm.cpu(), spy / f"cm{rank}.pt")
        return real_metrics(cm, *args, **kw)

    training.write_checkpoints, common.atomic_path, common.metrics_from_confusion = (
        write_checkpoints, atomic_path, metrics_from_confusion)
    grad_sync = os.environ.get("DDP_TEST_GRAD_SYNC")
    if grad_sync:   # which backward passes all-reduce (every: no no_sync; never: the last one in no_sync too)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        real_grad_sync, real_ddp = training.grad_sync, training.ddp
        if grad_sync != "last":
            training.grad_sync = lambda model, last: real_grad_sync(model, grad_sync == "every")

        def counted_ddp(*args, **kwargs):   # the ranks' all-reduces of gradient buckets, one line each
            model = real_ddp(*args, **kwargs)

            def hook(state, bucket):
                with open(spy / f"allreduce{rank}.txt", "a") as f:
                    f.write("1\n")
                return allreduce_hook(state, bucket)
            model.register_comm_hook(None, hook)
            return model
        training.ddp = counted_ddp
        (spy / f"allreduce{rank}.txt").touch()
    if os.environ.get("DDP_TEST_CPU_SYNC_BN"):
        torch.nn.SyncBatchNorm.forward = cpu_sync_batch_norm
        ddp = torch.nn.parallel.DistributedDataParallel
        ddp._passing_sync_batchnorm_handle = lambda self, module: None   # DDP's own refusal of CPU SyncBatchNorm
        training.SYNC_BN_DEVICES = ("cuda", "cpu")
    if os.environ.get("DDP_TEST_NAN_ON_RANK") == str(rank):   # this rank's losses turn NaN from iteration 2
        real_log = training.Logger.log
        training.Logger.log = lambda self, i, losses, lr: real_log(
            self, i, {k: v * float("nan") if i >= 1 else v for k, v in losses.items()}, lr)
    module = importlib.import_module(script)
    training.run_script(lambda: module.main(argv))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    rank_main(sys.argv[1], sys.argv[2:])
