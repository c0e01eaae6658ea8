"""Foundation II: mixing masks, augmentation, losses, schedules, EMA, checkpoints, CLI errors, exact resume."""
import json
import math
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import training
import demo
from common import IGNORE
from conftest import ROOT, make_cityscapes, write_malicious_checkpoint


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- ClassMix masks -------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,expect", [("floor", 1), ("ceil", 2)])
def test_class_mix_mask_counts_and_ignore(rule, expect):
    y = torch.tensor([[[0, 1, 2, IGNORE]]]).expand(1, 4, 4).clone()  # classes {0,1,2} plus ignore
    for s in range(30):
        m = common.class_mix_mask(y, gen(s), rule=rule)
        chosen = set(y[m.bool()].tolist())
        assert IGNORE not in chosen and len(chosen) == expect
        assert (m == torch.isin(y, torch.tensor(sorted(chosen))).float()).all()


def test_class_mix_mask_dacs_rule_can_draw_ignore():
    y = torch.tensor([[[0, 1, 2, IGNORE]]]).expand(1, 4, 4).clone()  # n = 4 candidates, 2 drawn
    drawn = [IGNORE in set(y[common.class_mix_mask(y, gen(s), "ceil", drop_ignore=False).bool()].tolist())
             for s in range(60)]
    assert 15 < sum(drawn) < 45  # P = 1/2


def test_class_mix_mask_single_class():
    y = torch.full((2, 3, 3), 5)
    assert common.class_mix_mask(y, gen(), "floor").sum() == 0  # floor(1/2) = 0: empty mask (ClassMix)
    assert common.class_mix_mask(y, gen(), "ceil").mean() == 1  # ceil(1/2) = 1 (DACS)


def test_class_mix_mask_is_per_image_and_uniform():
    y = torch.arange(4).repeat_interleave(4).view(1, 4, 4).repeat(2, 1, 1)
    picks = np.zeros(4)
    for s in range(400):
        m = common.class_mix_mask(y, gen(s))
        assert m.view(2, -1).sum(1).tolist() == [8, 8]
        picks += np.array([m[0][y[0] == c].mean().item() for c in range(4)])
    assert np.allclose(picks / 400, 0.5, atol=0.08)


def test_mix_operators_direction():
    a = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 2, 2)  # image i is filled with value i
    mask = torch.zeros(2, 2, 2)
    mask[:, 0] = 1  # top row pasted from image i, bottom row from image (i+1) mod 2
    out = common.mix_pairs(mask, a)
    assert out[0, :, 0].eq(0).all() and out[0, :, 1].eq(1).all()
    assert out[1, :, 0].eq(1).all() and out[1, :, 1].eq(0).all()
    lab = torch.tensor([[[3, 3], [3, 3]], [[7, 7], [7, 7]]])
    assert common.mix_pairs(mask, lab.float())[0].tolist() == [[3, 3], [7, 7]]
    src, tgt = torch.full((1, 3, 2, 2), 9.0), torch.zeros(1, 3, 2, 2)
    one = common.one_mix(mask[:1], src, tgt)  # source pixels pasted onto the target
    assert one[0, :, 0].eq(9).all() and one[0, :, 1].eq(0).all()
    assert common.one_mix(mask[:1], lab[:1], torch.zeros_like(lab[:1])).dtype == lab.dtype
    three = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)   # k+1, not k-1: only 3 images tell
    out = common.mix_pairs(torch.zeros(3, 2, 2), three)                  # nothing pasted: all from k+1
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.0]


# --- augmentation ----------------------------------------------------------------------------------

def test_blur_kernel_sizes_and_reference():
    assert [common.odd_kernel(s) for s in (512, 1024, 720, 32, 5)] == [51, 103, 71, 3, 1]
    x = torch.randn(2, 3, 20, 24)
    sigma = torch.tensor([0.5, 1.1])
    out = common.blur_batch(x, sigma, (5, 5))
    import torchvision.transforms.v2.functional as TF
    for k in range(2):  # torchvision's reflect-padded Gaussian blur, one image at a time
        ref = TF.gaussian_blur(x[k], [5, 5], [sigma[k].item()] * 2)
        assert torch.allclose(out[k], ref, atol=1e-5)


def test_blur_sigma_is_uniform_on_0_15_to_1_15(monkeypatch):
    seen = []
    monkeypatch.setattr(common, "blur_batch", lambda x, sigma, kernel: seen.append(sigma.clone()) or x)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        common.gaussian_blur(torch.zeros(4, 3, 8, 8), g, gate=0.0)
    sigma = torch.cat(seen)
    assert len(sigma) == 800 and sigma.min() >= 0.15 and sigma.max() <= 1.15
    assert sigma.min() < 0.17 and sigma.max() > 1.13 and abs(sigma.mean().item() - 0.65) < 0.03


def test_blur_gate():
    x = torch.randn(3, 3, 32, 32)  # kernel 3
    applied = sum(not torch.equal(common.gaussian_blur(x, gen(s)), x) for s in range(100))
    assert 35 < applied < 65


def test_color_jitter_semantics():
    x = common.renormalise(torch.full((64, 3, 4, 4), 0.5), "imagenet_bgr")
    applied = [not torch.allclose(common.color_jitter(x, "imagenet_bgr", gen(s)), x) for s in range(200)]
    assert 0.72 < np.mean(applied) < 0.88  # 80 % gate
    # brightness alone is additive, contrast alone multiplicative
    rgb = torch.rand(1, 3, 8, 8) * 0.5 + 0.25
    g = gen(3)
    out = common.denormalise(common.color_jitter(common.renormalise(rgb, "imagenet_rgb"), "imagenet_rgb", g,
                                                 strength=0.25, gate=-1), "imagenet_rgb")
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5 and not torch.allclose(out, rgb)
    hue, sat, val = common.rgb_to_hsv(rgb)
    assert torch.allclose(common.hsv_to_rgb(hue, sat, val), rgb, atol=1e-5)


def test_color_jitter_factor_statistics():
    # grey images: saturation/hue do nothing; brightness + contrast give x*c+b or (x+b)*c per image
    grey = common.renormalise(torch.full((400, 3, 2, 2), 0.5), "imagenet_rgb")
    out = common.denormalise(common.color_jitter(grey, "imagenet_rgb", gen(1), strength=0.25, gate=-1),
                             "imagenet_rgb")[:, 0, 0, 0]
    assert out.min() > 0.5 * 0.75 - 0.25 - 1e-4 and out.max() < 0.5 * 1.25 + 0.25 + 1e-4
    assert abs(out.mean().item() - 0.5) < 0.02 and out.std().item() > 0.1


def test_color_jitter_order_per_call_vs_per_image():
    x = common.renormalise(torch.rand(8, 3, 4, 4), "imagenet_bgr")
    a = common.color_jitter(x, "imagenet_bgr", gen(5), gate=-1)
    b = common.color_jitter(x, "imagenet_bgr", gen(5), gate=-1, per_image_order=True)
    assert a.shape == x.shape and not torch.allclose(a, b)


# --- losses ----------------------------------------------------------------------------------------

def test_ce_loss_ignores_and_zero_when_empty():
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    target = torch.randint(0, 5, (2, 3, 3))
    target[0, 0] = IGNORE
    valid = target != IGNORE
    ref = -F.log_softmax(logits, 1).gather(1, target.clamp(max=4)[:, None])[:, 0][valid].mean()
    assert torch.allclose(common.ce_loss(logits, target), ref)
    empty = common.ce_loss(logits, torch.full_like(target, IGNORE))
    assert empty.item() == 0 and empty.requires_grad
    empty.backward()


def test_pixel_weighted_ce_averages_over_all_pixels():
    logits = torch.randn(1, 4, 2, 2)
    target = torch.tensor([[[0, 1], [IGNORE, 3]]])
    weight = torch.tensor([[[0.5, 1.0], [1.0, 0.25]]])
    ce = [-F.log_softmax(logits, 1)[0, t, i // 2, i % 2] for i, t in enumerate([0, 1, 0, 3])]
    ref = (ce[0] * 0.5 + ce[1] * 1.0 + ce[3] * 0.25) / 4  # divided by all 4 pixels
    assert torch.allclose(common.ce_pixel_weighted(logits, target, weight), ref)


def test_mse_softmax():
    logits, target = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    assert torch.allclose(common.mse_softmax(logits, target), ((logits.softmax(1) - target) ** 2).mean())


def test_pseudo_label_weights():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 10  # image 0: confident everywhere (p = 0.9999)
    logits[1, 2, 0, 0] = 10  # image 1: confident on one pixel
    label, w, _ = common.pseudo_label(logits, 0.968)
    assert label[0].eq(1).all() and label[1, 0, 0] == 2
    assert torch.allclose(w, torch.full_like(w, 5 / 8))
    _, w_img, _ = common.pseudo_label(logits, 0.968, per_image=True)
    assert torch.allclose(w_img[0], torch.ones(2, 2)) and torch.allclose(w_img[1], torch.full((2, 2), 0.25))
    _, w_pix, _ = common.pseudo_label(logits, 0.968, mode="pixel")
    assert w_pix[1].tolist() == [[1, 0], [0, 0]]
    assert common.pseudo_label(logits, mode="none")[1].eq(1).all()


# --- schedules and EMA -----------------------------------------------------------------------------

def test_poly_lr_with_head_and_scheduler():
    model = common.DeepLabV2(layers=(1, 1, 1, 1))
    opt = common.LegacySGD(common.param_groups(model, 2.5e-4), lr=2.5e-4)
    sched = common.lr_scheduler(opt, lambda i: common.poly_factor(i, 1000))
    seen = []
    for i in range(3):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for i, (lr0, lr1) in enumerate(seen):
        assert lr0 == pytest.approx(2.5e-4 * (1 - i / 1000) ** 0.9) and lr1 == pytest.approx(10 * lr0)
    assert common.poly_factor(999, 1000) * 2.5e-4 == pytest.approx(2.5e-4 * (1 / 1000) ** 0.9)


def test_warmup_poly_table():
    lr = lambda i: 6e-5 * common.warmup_poly_factor(i, 40000, 1500, 1.0)  # noqa: E731
    assert lr(0) == pytest.approx(6e-11)
    assert lr(750) == pytest.approx(2.944e-5, rel=1e-3)
    assert lr(1500) == pytest.approx(5.775e-5)
    assert lr(20000) == pytest.approx(3.0e-5)
    assert lr(39999) == pytest.approx(1.5e-9)


def test_ema_alpha_and_update():
    assert [common.ema_alpha(i) for i in (0, 1, 9, 99, 500)] == [0, 0.5, pytest.approx(0.9), 0.99, 0.99]
    build = lambda: common.DeepLabV2(layers=(1, 1, 1, 1))  # noqa: E731
    student = build()
    teacher = common.ema_teacher(student, build)
    assert teacher.training and all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert not torch.equal(teacher.bn1.running_mean + 1, student.bn1.running_mean)  # buffers are fresh
    student.bn1.running_mean.fill_(3.0)
    t0 = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    common.ema_update(teacher, student, 1)  # alpha 0.5
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.5 * t_old + 0.5 * s)
    assert teacher.bn1.running_mean.eq(0).all()  # buffers untouched



def test_ema_teacher_buffers_per_bn_mode():
    build = lambda: common.DeepLabV2(layers=(1, 1, 1, 1))  # noqa: E731
    student = build()
    student.bn1.running_mean.fill_(2.0)
    student.layer4[0].bn3.running_var.fill_(5.0)
    train_mode = common.ema_teacher(student, build)            # the authors': buffers not copied
    assert train_mode.training and train_mode.bn1.running_mean.eq(0).all()
    eval_mode = common.ema_teacher(student, build, train_bn=False)
    assert not eval_mode.training
    assert all(torch.equal(t, s) for t, s in zip(eval_mode.buffers(), student.buffers()))
    assert eval_mode.layer4[0].bn3.running_var.eq(5).all()

# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_roundtrip_rng_and_class_check(tmp_path):
    model = common.DeepLabV2(5, layers=(1, 1, 1, 1))
    common.seed_everything(3)
    state = {"model": model.state_dict(), "iteration": 4, "rng": training.rng_states(), "args": {"a": 1}}
    expect = (torch.rand(3), np.random.rand(), __import__("random").random())
    training.save_checkpoint(tmp_path / "c.pth", state)
    ck = training.load_checkpoint(tmp_path / "c.pth", 5)
    training.set_rng_states(ck["rng"])
    assert torch.equal(torch.rand(3), expect[0]) and np.random.rand() == expect[1]
    assert __import__("random").random() == expect[2]
    with pytest.raises(common.DataError, match="checkpoint has 5 classes, expected 19"):
        training.load_checkpoint(tmp_path / "c.pth", 19)
    (tmp_path / "t.pth").write_bytes((tmp_path / "c.pth").read_bytes()[:1000])
    with pytest.raises(common.DataError, match="not a readable plain weights file"):
        training.load_checkpoint(tmp_path / "t.pth", 5)
    with pytest.raises(common.DataError, match="file not found"):
        training.load_checkpoint(tmp_path / "missing.pth", 5)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    training.save_checkpoint(path, {"model": common.DeepLabV2(3, layers=(1, 1, 1, 1)).state_dict(), "iteration": 1})

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert training.load_checkpoint(path, 3)["iteration"] == 1


# --- demo dataset ----------------------------------------------------------------------------------

def test_demo_generator_deterministic_and_in_layout(tmp_path):
    a = demo.ensure_demo(tmp_path / "a")
    b = demo.ensure_demo(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files) == 2 * (demo.COUNTS["source"] + demo.COUNTS["train"] + demo.COUNTS["val"])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files[::37])
    src = common.SegmentationDataset("gta5", a / "gta5")
    tgt = common.SegmentationDataset("cityscapes", a / "cityscapes", split="val")
    assert len(src) == demo.COUNTS["source"] and len(tgt) == demo.COUNTS["val"]
    report = common.check_data(a)
    assert all(not r["orphans"] and not r["unreadable"] for s in report.values() for r in s.values())
    hist_s = report["gta5"]["train"]["histogram"]
    hist_t = report["cityscapes"]["train"]["histogram"]
    assert hist_s["bus"] / sum(hist_s.values()) > hist_t["bus"] / sum(hist_t.values())  # frequency gap
    assert all(hist_s[c] > 0 for c in ("road", "sidewalk", "sky", "car", "bus", "rider", "bicycle",
                                       "motorcycle", "traffic sign", "traffic light", "pole", "person"))
    # colour gap: the mean colour of road pixels differs between domains
    assert demo.DOMAINS["source"]["colour"][demo.ROAD] != demo.DOMAINS["target"]["colour"][demo.ROAD]
    mtime = (a / "gta5" / "images" / "00001.png").stat().st_mtime_ns
    demo.ensure_demo(tmp_path / "a")  # generated once
    assert (a / "gta5" / "images" / "00001.png").stat().st_mtime_ns == mtime


# --- a real script: bad input and exact resume after kill -9 ---------------------------------------

SCRIPT = ROOT / "tests" / "tiny_train.py"


def run(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture
def city(tmp_path):
    make_cityscapes(tmp_path)
    return tmp_path


BASE = ["--layers", 1, 1, 1, 1, "--workers", 0, "--log-every", 1, "--device", "cpu"]


@pytest.mark.parametrize("args,needle", [
    (["--iters", "0"], "--iters 0: expected a positive integer"),
    (["--lr", "-1"], "--lr -1.0: expected a positive number"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--n-labeled", "99"], "--n-labeled 99: expected 0..6"),
    (["--crop-size", "0", "8"], "--crop-size 0 8"),
    (["--resume", "nothing.pth"], "--resume nothing.pth: file not found"),
    (["--init", "nothing.pth"], "nothing.pth: file not found"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--save-predictions"], "--save-predictions is used by --eval-only only"),
    (["--eval-model", "teacher"], "--eval-model teacher is used by --eval-only only"),
    (["--eval-every", "-1"], "--eval-every -1: expected 0 or a positive integer"),
    (["--save-every", "-5"], "--save-every -5: expected 0 or a positive integer"),
    (["--workers", "-1"], "--workers -1: expected 0 or a positive integer"),
])
def test_bad_arguments_exit_2_with_one_line(city, args, needle):
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert not (city / "run").exists()  # nothing half-written


def test_bad_data_exit_2(city):
    (city / "cityscapes" / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    out = run("--data-root", city, "--out-dir", city / "run", *BASE)
    assert out.returncode == 2 and "aachen_000000_000019_leftImg8bit.png: has no matching" in out.stderr
    out = run("--data-root", city / "nowhere", "--out-dir", city / "run", *BASE)
    assert out.returncode == 2 and "folder not found" in out.stderr and "Traceback" not in out.stderr


def test_malicious_checkpoint_refused_by_script(city):
    marker = city / "pwned"
    evil = write_malicious_checkpoint(city / "evil.pth", marker)
    out = run("--data-root", city, "--out-dir", city / "run", *BASE, "--resume", evil)
    assert out.returncode == 2 and "not a readable plain weights file" in out.stderr
    assert not marker.exists()


def final_weights(out_dir):
    return torch.load(out_dir / "checkpoint.pth", weights_only=True)


def test_killed_and_resumed_run_is_exact(city):
    args = ["--data-root", city, *BASE, "--iters", 8, "--save-every", 1]
    ref = run(*args, "--out-dir", city / "ref")
    assert ref.returncode == 0, ref.stderr
    out_dir = city / "killed"
    ck = out_dir / "checkpoint.pth"
    saved = lambda: ck.stat().st_mtime_ns if ck.is_file() else 0  # noqa: E731
    kills = 0
    for attempt in range(12):
        before = saved()
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out-dir", str(out_dir),
                                 "--resume", "auto"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and saved() == before:   # each attempt saves once: progress under any load
            time.sleep(0.05)
        time.sleep(0.07 * attempt)     # then kill -9 at a varying moment: some land while the next one is written
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if ck.is_file() and torch.load(ck, weights_only=True)["iteration"] == 8:
            break
    assert kills >= 1
    a, b = final_weights(city / "ref"), final_weights(out_dir)
    assert a["iteration"] == b["iteration"] == 8
    for key in ("model", "ema_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 8 and {"loss_s", "loss_u", "lr", "it_per_s", "eta_s"} <= set(log[-1])
    assert json.loads((out_dir / "config.json").read_text())["iters"] == 8
    assert len((out_dir / "split.txt").read_text().split()) == 2


def test_keep_checkpoints(city):
    out = run("--data-root", city, *BASE, "--iters", 2, "--save-every", 1, "--keep-checkpoints",
              "--out-dir", city / "run")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (city / "run").glob("*.pth"))
    assert names == ["checkpoint.pth", "checkpoint_1.pth", "checkpoint_2.pth"]
    ck = torch.load(city / "run" / "checkpoint_1.pth", weights_only=True)
    assert {"model", "ema_model", "optimizer", "iteration", "rng", "args", "scheduler"} <= set(ck)
    assert set(ck["model"]) == set(common.DeepLabV2(layers=(1, 1, 1, 1)).state_dict())


def test_amp_autocasts_in_bf16_and_off_means_fp32():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    on, off = training.Amp(torch.device("cpu"), True), training.Amp(torch.device("cpu"), False)
    with on.autocast():
        assert conv(x).dtype == torch.bfloat16
    with off.autocast():
        assert conv(x).dtype == torch.float32
    assert not on.scaler.is_enabled()                      # bf16 needs no loss scaling
    model = training.prepare_model(common.DeepLabV2(19, layers=(1, 1, 1, 1)), torch.device("cpu"), on)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_write_demo_summary_schema(tmp_path, capsys):
    s = training.write_demo_summary(tmp_path / "d", "x.py", ("X", {"mIoU": 41.234}), [("base", {"mIoU": 30.0})],
                                  200, 61.27)
    saved = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert saved == s and set(saved) == {"script", "method", "baselines", "iterations", "seconds", "torch"}
    assert saved["method"] == {"name": "X", "mIoU": 41.23} and saved["baselines"] == [{"name": "base", "mIoU": 30.0}]
    assert saved["iterations"] == 200 and saved["torch"] == torch.__version__
    assert "X 41.23 vs base 30.00" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["asss.py", "camix.py", "classmix_ssl.py", "dacs.py", "dldm.py", "iidm.py"])
def test_help_shows_each_default_once(script):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    assert "(default:" in text
    assert not re.search(r"\(default: [^()]*\) \(default:", text), re.search(r".{80}\(default: [^()]*\) \(default:.{20}", text)


def test_demo_init_is_built_once_and_rebuilt_for_another_network(tmp_path, capsys):
    path = demo.ensure_demo_init(tmp_path, [1, 1, 1, 1], "caffe", "imagenet_bgr")
    assert "building the demo init" in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    assert "layer1.0.conv1.weight" in state and not any(k.startswith("layer5.") for k in state)  # no classifier
    mtime = path.stat().st_mtime_ns
    assert demo.ensure_demo_init(tmp_path, [1, 1, 1, 1], "caffe", "imagenet_bgr") == path
    assert path.stat().st_mtime_ns == mtime and "building" not in capsys.readouterr().out   # reused
    other = demo.ensure_demo_init(tmp_path, [1, 1, 2, 1], "caffe", "imagenet_bgr")          # another network
    assert other != path and other.is_file() and "building" in capsys.readouterr().out
    assert demo.ensure_demo_init(tmp_path, [1, 1, 1, 1], "pytorch", "imagenet_rgb") not in (path, other)
    model = common.DeepLabV2(19, layers=(1, 1, 2, 1))
    assert training.initialise(model, "demo", "imagenet_bgr", tmp_path) == len(torch.load(other, weights_only=True))
    narrow = common.DeepLabV2(19, layers=(1, 1, 2, 1), width=16)                               # another width
    assert training.initialise(narrow, "demo", "imagenet_bgr", tmp_path) == len(torch.load(other, weights_only=True))
    assert "building" in capsys.readouterr().out


def test_ema_update_with_buffers_lerps_statistics_and_copies_counters():
    build = lambda: common.DeepLabV2(layers=(1, 1, 1, 1))  # noqa: E731
    student = build()
    teacher = common.ema_teacher(student, build, train_bn=False)
    with torch.no_grad():
        for b in student.buffers():
            b.add_(4) if b.is_floating_point() else b.fill_(7)
    before = [b.clone() for b in teacher.buffers()]
    common.ema_update(teacher, student, 3, buffers=True)  # alpha 0.75
    for t, t0, s in zip(teacher.buffers(), before, student.buffers()):
        if t.is_floating_point():
            assert torch.allclose(t, 0.75 * t0 + 0.25 * s)
        else:
            assert torch.equal(t, s) and t.eq(7).all()


def test_logger_means_per_loss_with_changing_loss_sets_and_first_non_finite(tmp_path):
    log = training.Logger(tmp_path, every=4, max_iter=100)
    t = torch.tensor
    log.log(0, {"a": t(1.0), "b": t([2.0, 4.0])}, 0.1)
    log.log(1, {"a": t(3.0)}, 0.1)
    log.log(2, {"a": t(5.0), "b": t(6.0), "q": t(0.5)}, 0.1)
    log.log(3, {"a": t(7.0), "b": t(0.0)}, 0.1)
    rec = json.loads((tmp_path / "log.jsonl").read_text())
    assert rec["iteration"] == 4 and rec["a"] == 4.0 and rec["b"] == 2.25 and rec["q"] == 0.125  # / 4 iterations
    log.log(4, {"a": t(1.0)}, 0.1)
    log.log(5, {"a": t(1.0), "b": t(float("inf"))}, 0.1)
    log.log(6, {"a": t(float("nan")), "b": t(float("nan"))}, 0.1)  # later failures do not replace the first
    with pytest.raises(training.Diverged, match="iteration 6: b is inf"):
        log.log(7, {"a": t(1.0)}, 0.1)


def color_jitter_per_image(x, norm, generator, strength=0.25, per_image_order=False):
    """Reference: the same draws as color_jitter (gate passed), each image jittered alone in its op order."""
    torch.rand((), generator=generator)  # the gate draw
    n = x.shape[0]
    f = (torch.rand(4, n, generator=generator) * 2 - 1) * strength
    order = torch.rand(n if per_image_order else 1, 4, generator=generator).argsort(1).expand(n, 4)
    out = []
    for j in range(n):
        y = common.denormalise(x[j:j + 1].float(), norm)
        for op in order[j].tolist():
            if op == 0:
                y = (y + f[0, j]).clamp(0, 1)
            elif op == 1:
                y = (y * (1 + f[1, j])).clamp(0, 1)
            else:
                hue, sat, val = common.rgb_to_hsv(y)
                sat = (sat * (1 + f[2, j])).clamp(0, 1) if op == 2 else sat
                hue = (hue + f[3, j] * 2 * math.pi) % (2 * math.pi) if op == 3 else hue
                y = common.hsv_to_rgb(hue, sat, val).clamp(0, 1)
        out.append(y)
    return common.renormalise(torch.cat(out), norm)


@pytest.mark.parametrize("per_image_order", [False, True])
def test_color_jitter_grouped_by_order_equals_per_image(per_image_order):
    x = common.renormalise(torch.rand(6, 3, 5, 7), "imagenet_bgr")
    for seed in range(4):
        fast = common.color_jitter(x, "imagenet_bgr", gen(seed), gate=-1, per_image_order=per_image_order)
        ref = color_jitter_per_image(x, "imagenet_bgr", gen(seed), per_image_order=per_image_order)
        assert torch.allclose(fast, ref, atol=1e-5, rtol=0), seed
    if per_image_order:  # several op orders in one batch were exercised
        g = gen(0)
        torch.rand((), generator=g), torch.rand(4, 6, generator=g)
        assert len(torch.rand(6, 4, generator=g).argsort(1).unique(dim=0)) > 1


def test_is_due_after_every_nth_iteration_and_the_last():
    """Loop index i is 0-based: a periodic action every N runs after iterations N, 2N, ... (i = N-1, 2N-1, ...)
    and after the last one; every = 0 means only the last."""
    assert [i for i in range(10) if training.is_due(i, 4, 10)] == [3, 7, 9]
    assert [i for i in range(10) if training.is_due(i, 5, 10)] == [4, 9]
    assert [i for i in range(10) if training.is_due(i, 0, 10)] == [9]


def test_eval_only_refuses_a_checkpoint_of_another_network(tmp_path):
    """Same tensor names and shapes, other ASPP or input convention: refused before anything is written."""
    import argparse
    model = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    saved = {"layers": [1, 1, 1, 1], "width": 64, "aspp_full": True, "init": "imagenet"}
    training.save_checkpoint(tmp_path / "c.pth", {"model": model.state_dict(), "iteration": 3, "args": saved})
    args = argparse.Namespace(checkpoint=str(tmp_path / "c.pth"), eval_model="student", layers=[1, 1, 1, 1],
                              width=64, aspp_full=False, init="coco", amp=False, save_predictions=False)
    with pytest.raises(common.DataError) as exc:
        training.eval_only(args, model, [], torch.device("cpu"), tmp_path / "ev")
    assert "--aspp-full True (this run: False)" in str(exc.value) and "--init imagenet (this run: coco" in str(exc.value)
    assert not (tmp_path / "ev").exists()
    same = {**saved, "aspp_full": False, "init": "none"}          # 'none' follows the script's own convention
    training.check_same_network(same, args, "c.pth")              # dacs.py's none = coco's: accepted
    with pytest.raises(common.DataError, match="--init none .*pytorch/imagenet_rgb, this run caffe/imagenet_bgr"):
        training.check_same_network({**same, "resize": "cv2"}, args, "c.pth")            # iidm.py's none: RGB
    with pytest.raises(common.DataError, match="--init none .*caffe/cityscapes_bgr, this run caffe/imagenet_bgr"):
        training.check_same_network({**same, "no_unlabeled": False}, args, "c.pth")     # classmix_ssl.py's mean
    with pytest.raises(common.DataError, match=r"--aspp-full True \(this run: False\)"):
        training.check_same_network({**same, "lab": "on"}, args, "c.pth")                # dldm.py: AdvEnt's ASPP
    with pytest.raises(common.DataError, match=r"--width 32 \(this run: 64\)"):
        training.check_same_network({**same, "init": "coco", "width": 32}, args, "c.pth")
    training.check_same_network({}, args, "c.pth")                # an authors' checkpoint: no args


def test_eval_only_evaluates_under_amp_as_training_does(tmp_path, monkeypatch):
    import argparse
    model = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    training.save_checkpoint(tmp_path / "c.pth", {"model": model.state_dict(), "iteration": 3})
    seen = []
    metrics = {"mIoU": 1.0, "iteration": 3, "model": "student", "num_classes": 19}
    monkeypatch.setattr(common, "evaluate", lambda *a, **k: seen.append(k["amp_dtype"]) or metrics)
    for amp, dtype in ((True, "auto"), (True, "fp16"), (False, "auto")):
        args = argparse.Namespace(checkpoint=str(tmp_path / "c.pth"), eval_model="student", init="coco", amp=amp,
                                  amp_dtype=dtype, save_predictions=False, eval_set=None, split="val", export=None)
        training.eval_only(args, model, argparse.Namespace(kind="cityscapes", label_res="full"), torch.device("cpu"),
                           tmp_path / f"ev{amp}{dtype}")
    assert seen == [torch.bfloat16, torch.float16, None]


def test_dataset_roots_are_refused_with_the_demo(tmp_path):
    import argparse
    args = argparse.Namespace(data_root=str(tmp_path), gta5_root=None, synthia_root=None, cityscapes_root="/x")
    with pytest.raises(common.DataError, match="--cityscapes-root: the demo reads its generated data"):
        training.data_roots(args, "demo")
    assert not (tmp_path / "demo").exists()
    args.cityscapes_root = None
    assert training.data_roots(args, "gta5") == ("gta5", tmp_path / "gta5", "cityscapes", tmp_path / "cityscapes")
    assert training.data_roots(args, "cityscapes", "dark_zurich") == ("cityscapes", tmp_path / "cityscapes",
                                                                      "dark_zurich", tmp_path / "dark_zurich")
