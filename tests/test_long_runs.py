"""Long runs lose nothing: divergence guard, preemption, data errors in workers, one run per folder, full disk.
Each behaviour is checked through a real process of tests/tiny_train.py (the toolkit's training loop)."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_cityscapes

SCRIPT = ROOT / "tests" / "tiny_train.py"
BASE = ["--layers", 1, 1, 1, 1, "--workers", 0, "--log-every", 1, "--device", "cpu"]


def run(*args, prefix=None):
    argv = [sys.executable, *(["-c", prefix, str(SCRIPT)] if prefix else [str(SCRIPT)]), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def city(tmp_path):
    make_cityscapes(tmp_path, n_train=8)
    return tmp_path


def one_error_line(out):
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(city):
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 6, "--save-every", 1, "--lr", 1e7)
    assert out.returncode == 3, out.stderr
    line = one_error_line(out)
    assert line.startswith("error: iteration ") and ("is nan" in line or "is inf" in line or "non-finite" in line)
    ck = torch.load(city / "run" / "checkpoint.pth", weights_only=True)
    assert 1 <= ck["iteration"] < 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not list((city / "run").glob(".*.tmp*"))


@pytest.mark.parametrize("target", ["process", "group"])   # kill PID, or a scheduler signalling every process
def test_sigterm_with_workers_checkpoints_and_resume_is_exact(city, target):
    args = ["--data-root", city, *BASE, "--workers", 2, "--iters", 6, "--save-every", 100, "--lr", 1e-3]
    ref = run(*args, "--out-dir", city / "ref")
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out-dir", str(city / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stdout.readline()                  # "it 1/6 ...": training is under way
    assert first.startswith("it 1/6"), first + proc.stderr.read()
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)         # the data-loading workers get it too
    else:
        proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in rest and "--resume auto" in rest
    stopped_at = torch.load(city / "run" / "checkpoint.pth", weights_only=True)["iteration"]
    assert 1 <= stopped_at < 6
    out = run(*args, "--out-dir", city / "run", "--resume", "auto")
    assert out.returncode == 0, out.stderr
    a = torch.load(city / "ref" / "checkpoint.pth", weights_only=True)
    b = torch.load(city / "run" / "checkpoint.pth", weights_only=True)
    for key in ("model", "ema_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_truncated_image_in_a_worker_is_one_line_naming_it(city):
    bad = sorted((city / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))
    for path in bad:                                 # every train image: the first batch meets one
        path.write_bytes(path.read_bytes()[:60])
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--workers", 2, "--iters", 2)
    assert out.returncode == 2
    line = one_error_line(out)
    assert "leftImg8bit.png: unreadable image" in line and "Traceback" not in out.stderr


def test_a_live_run_holds_its_folder_and_a_stale_lock_is_taken_over(city):
    (city / "run").mkdir()
    (city / "run" / "run.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")   # this live process
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 1)
    assert out.returncode == 2 and f"in use by a running process (pid {os.getpid()})" in one_error_line(out)
    assert sorted(p.name for p in (city / "run").iterdir()) == ["run.lock"]             # nothing written
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (city / "run" / "run.lock").write_text(f"{gone.pid} {os.uname().nodename}\n")
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 1)
    assert out.returncode == 0, out.stderr
    assert f"(pid {gone.pid}) taken over" in out.stdout
    assert not (city / "run" / "run.lock").exists()                                       # released at exit


def test_resume_with_other_settings_is_refused_naming_them(city):
    assert run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 2).returncode == 0
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 2, "--resume", "auto", "--lr", 0.5)
    assert out.returncode == 2 and "made with other settings: --lr 0.001 (here 0.5)" in one_error_line(out)
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 2, "--resume", "auto",
              "--workers", 1)                                                           # where/how fast: allowed
    assert out.returncode == 0, out.stderr


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(city):
    fail_second_save = (
        "import errno, sys, torch\n"
        "real, calls = torch.save, []\n"
        "def save(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(getattr(f, 'name', f)))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "sys.argv = sys.argv[1:]\n"
        "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--iters", 3, "--save-every", 1,
              prefix=fail_second_save)
    assert out.returncode == 2
    assert "No space left on device" in one_error_line(out)
    assert torch.load(city / "run" / "checkpoint.pth", weights_only=True)["iteration"] == 1
    assert not list((city / "run").glob(".*.tmp*"))
