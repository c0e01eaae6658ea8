"""--stack daformer in dacs.py and iidm.py (tiny MiT, generated data): runs, exact resume, the feature distance,
the pseudo-label crop, one test per stack flag, the authors' checkpoint format, and the refusals."""
import json
import subprocess
import sys

import pytest
import torch

import common
import dacs
import iidm
from conftest import ROOT, make_blocky, same_state, script_runner, weights_digest

H, W = 64, 128   # every generated image; crops of 64x64 give the tiny MiT a 2x2 stage-4 map (32-pixel cells)
TINY = ["--iters", "2", "--stack", "daformer", "--mit", "tiny", "--init", "none", "--source-size", str(W), str(H),
        "--target-size", str(W), str(H), "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--tau", "0.01",
        "--warmup-iters", "0", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--device", "cpu"]
run_dacs = script_runner(dacs, TINY)
run_iidm = script_runner(iidm, TINY + ["--n-labeled", "2"])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA5 and Cityscapes trees whose labels hold pure thing-class cells (conftest.make_blocky)."""
    return make_blocky(tmp_path_factory.mktemp("blocky"), H, W)


# ------------------------------------------------------------------ runs and exact resume

@pytest.mark.parametrize("script", ["dacs", "iidm"])
def test_two_iterations_and_exact_resume(root, tmp_path, script):
    run = {"dacs": run_dacs, "iidm": run_iidm}[script]
    metrics, full = run(root, tmp_path / "a", "--save-every", "1", "--keep-checkpoints")   # 2 iterations
    names = list(common.daformer_segmentor(19, "tiny").state_dict())            # the authors' student names
    assert list(full["model"]) == names and list(full["ema_model"]) == names and full["iteration"] == 2
    assert not any(k.startswith("imnet") for k in full)               # the ImageNet copy is rebuilt, not saved
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_fd"] > 0 for r in log)                         # thing cells were found and compared
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["stack"], config["ema_alpha"], config["fd_lambda"], config["pl_crop"]) == (
        "daformer", 0.999, 0.005, "v1")
    assert metrics["model"] == "student" and metrics["num_classes"] == 19
    _, resumed = run(root, tmp_path / "c", "--resume", tmp_path / "a" / "checkpoint_1.pth")
    assert same_state(full["model"], resumed["model"]) and same_state(full["ema_model"], resumed["ema_model"])
    assert same_state(full["optimizer"]["state"][0], resumed["optimizer"]["state"][0])


def test_teacher_starts_as_a_copy_without_stochastic_layers(root, tmp_path, monkeypatch):
    """DAFormer: the teacher copies the student at i = 0 and is first updated at the start of i = 1; it predicts
    with BN in train mode and DropPath/Dropout off."""
    teachers = []
    ema_teacher = common.ema_teacher
    monkeypatch.setattr(common, "ema_teacher", lambda *a, **kw: teachers.append(ema_teacher(*a, **kw)) or teachers[-1])
    ckpt = run_dacs(root, tmp_path / "run", "--iters", "1")[1]
    common.seed_everything(0)
    initial = dict(common.daformer_segmentor(19, "tiny").named_parameters())
    assert all(torch.equal(ckpt["ema_model"][k], p) for k, p in initial.items())
    assert not all(torch.equal(ckpt["model"][k], p) for k, p in initial.items())
    modes = {type(m).__name__: m.training for m in teachers[0].modules()}
    assert modes["BatchNorm2d"] and not modes["DropPath"] and not modes["Dropout2d"]


def test_a_run_made_before_the_stack_flags_resumes(root, tmp_path):
    plain = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--workers", "0", "--device", "cpu",
             "--source-size", "64", "32", "--target-size", "64", "32", "--crop-size", "32", "32"]
    dacs.main([*plain, "--data-root", str(root), "--out-dir", str(tmp_path / "a"), "--save-every", "1"])
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    for k in ("stack", "mit", "drop_path_rate", "fd_lambda", "pl_crop") + dacs.DAFORMER_FLAGS:
        del ckpt["args"][k]
    ckpt["iteration"] = 1
    torch.save(ckpt, tmp_path / "old.pth")
    dacs.main([*plain, "--data-root", str(root), "--out-dir", str(tmp_path / "b"), "--resume",
               str(tmp_path / "old.pth")])                        # accepted: the new arguments take their defaults
    ckpt["args"]["aspp_full"] = True
    torch.save(ckpt, tmp_path / "other.pth")
    with pytest.raises(common.DataError, match="made with other settings: --aspp-full True"):
        dacs.main([*plain, "--data-root", str(root), "--out-dir", str(tmp_path / "c"), "--resume",
                   str(tmp_path / "other.pth")])


def test_daformer_defaults_follow_the_stack():
    dacs_args = dacs.parse_args(["--stack", "daformer", "--init", "none"])
    assert (dacs_args.iters, dacs_args.lr, dacs_args.mit, dacs_args.ema_alpha, dacs_args.fd_lambda) == (
        40000, 6e-5, "b5", 0.999, 0.005)
    assert (dacs_args.warmup_iters, dacs_args.rcs, dacs_args.rcs_temp, dacs_args.rcs_min_pixels) == (
        1500, "source", 0.01, 3000)
    assert (dacs_args.eval_res, tuple(dacs_args.crop_size), dacs_args.classmix_select, dacs_args.pl_crop) == (
        "full", (512, 512), "batch", "v1")
    assert (dacs_args.target_cat_max_ratio, dacs_args.drop_path_rate) == (0.75, 0.1)
    assert dacs.parse_args([]).ema_alpha == 0.99 and dacs.parse_args([]).fd_lambda is None
    iidm_args = iidm.parse_args(["--stack", "daformer", "--init", "none"])
    assert (iidm_args.ema_alpha, iidm_args.fd_lambda, iidm_args.pl_crop, iidm_args.mit) == (0.999, 0.005, "v1", "b5")
    assert iidm.parse_args([]).ema_alpha == 0.99


# ------------------------------------------------------------------ the feature distance and the pseudo-label crop

def test_feature_distance_mask_from_a_toy_label_map():
    y = torch.zeros(1, 4, 8, dtype=torch.long)                        # four 2x2 cells of a 2x4 feature map
    y[0, :2, 0:2] = 13                                                # car: a pure thing cell
    y[0, :2, 2:4] = torch.tensor([[11, 11], [11, 0]])                 # person 3/4: kept (share >= 0.75)
    y[0, :2, 4:6] = torch.tensor([[13, 13], [0, 0]])                  # car 1/2: ignored (share < 0.75)
    y[0, :2, 6:8] = torch.tensor([[255, 255], [255, 13]])            # mostly ignore: ignored
    y[0, 2:, 0:2] = 0                                                 # road: no thing class
    y[0, 2:, 2:4] = 6                                                 # traffic light: a thing class
    y[0, 2:, 4:8] = 255
    cells = common.downscale_label_ratio(y, 2)
    assert cells.tolist() == [[[13, 11, 255, 255], [0, 6, 255, 255]]]
    mask = common.feature_distance_mask(y, 4, common.thing_classes(19))
    assert mask.tolist() == [[[True, True, False, False], [False, True, False, False]]]
    f_s, f_i = torch.zeros(1, 3, 2, 4, requires_grad=True), torch.zeros(1, 3, 2, 4)
    f_i[0, 0] = torch.arange(8.0).view(2, 4)                          # distances 0..7 per cell
    assert common.feature_distance(f_s, f_i, mask).item() == pytest.approx((0 + 1 + 5) / 3)
    empty = common.feature_distance(f_s, f_i, torch.zeros_like(mask))   # assumption: 0 (the authors get NaN)
    empty.backward()
    assert empty.item() == 0 and torch.equal(f_s.grad, torch.zeros_like(f_s))
    assert common.thing_classes(16) == tuple(common.TRAIN_IDS_16.index(c) for c in (6, 7, 11, 12, 13, 15, 17, 18))


def test_feature_distance_gradient_reaches_only_the_encoder():
    torch.manual_seed(0)
    student = common.daformer_segmentor(19, "tiny")
    imnet = common.daformer_segmentor(19, "tiny").backbone.eval()
    x, y = torch.randn(2, 3, 64, 64), torch.full((2, 64, 64), 13)
    features, _ = student.forward_features(x)
    loss = common.thing_feature_distance(features[-1], imnet, x, y)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in student.decode_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert all(p.grad is None for p in imnet.parameters())


def test_pseudo_label_crop_rows():
    w = common.pseudo_label_crop(torch.ones(2, 512, 4))               # DAFormer: top 15, bottom 120 rows
    rows = w[0, :, 0]
    assert rows[:15].sum() == 0 and (rows[15:392] == 1).all() and rows[392:].sum() == 0 and torch.equal(w[0], w[1])
    rows = common.pseudo_label_crop(torch.full((1, 64, 2), 0.5))[0, :, 0]   # scaled: 2 and 15 rows of 64
    assert rows[:2].sum() == 0 and (rows[2:49] == 0.5).all() and rows[49:].sum() == 0


def test_pseudo_label_crop_spares_pasted_source_pixels():
    g = torch.Generator().manual_seed(0)
    args = type("A", (), dict(tau=0.01, mask_rounding="ceil", mask_exclude_ignore=False,
                              pixel_weight="threshold_uniform"))
    y_s = torch.zeros(1, 64, 8, dtype=torch.long)
    y_s[0, :32] = 1
    x = torch.zeros(1, 3, 64, 8)
    _, _, w, q = dacs.cross_domain_mix(x, y_s, x, torch.zeros(1, 19, 64, 8), g, args, "v1")
    pasted = y_s[0] == (1 if w[0, 0, 0] == 1 else 0)
    assert q == 1 and (w[0][pasted] == 1).all()
    rows = torch.arange(64)
    cropped = ((rows < 2) | (rows >= 49))[:, None].expand(64, 8) & ~pasted
    assert (w[0][cropped] == 0).all() and (w[0][~cropped] == 1).all()


# ------------------------------------------------------------------ each stack flag changes training

FLAGS = [["--fd-lambda", "0.05"], ["--pl-crop", "none"], ["--drop-path-rate", "0"], ["--warmup-iters", "3"],
         ["--rcs", "none"], ["--rcs", "none", "--classmix-select", "image"], ["--target-cat-max-ratio", "1"],
         ["--rcs-min-pixels", "3000"], ["--iters", "2", "--ema-alpha", "0.3"]]   # the EMA ramp gives 0.5 at i = 1


@pytest.fixture(scope="module")
def dacs_weights(root, tmp_path_factory):
    cache = {}

    def get(flags):
        if tuple(flags) not in cache:
            out = tmp_path_factory.mktemp("flag")
            ckpt = run_dacs(root, out, "--iters", "1", *flags)[1]
            cache[tuple(flags)] = weights_digest(ckpt["model"]), weights_digest(ckpt["ema_model"])
        return cache[tuple(flags)]
    return get


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f[-2])
def test_dacs_stack_flag_changes_training(dacs_weights, flags):
    base = dacs_weights(flags[:-2])
    changed = dacs_weights(flags)
    assert changed[0] != base[0] or changed[1] != base[1]


@pytest.mark.parametrize("flags", [["--fd-lambda", "0"], ["--pl-crop", "none"]], ids=lambda f: f[0])
def test_iidm_stack_flag_changes_training(root, tmp_path, flags):
    base = run_iidm(root, tmp_path / "base", "--iters", "1")[1]["model"]
    assert weights_digest(run_iidm(root, tmp_path / "flag", "--iters", "1", *flags)[1]["model"]) != weights_digest(base)


# ------------------------------------------------------------------ checkpoints: the authors' format, other stacks

def test_eval_only_reads_ours_and_the_authors_latest_pth(root, tmp_path):
    metrics, ckpt = run_dacs(root, tmp_path / "run", "--iters", "1")
    ours = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "ev"), "--eval-only",
                      "--checkpoint", str(tmp_path / "run" / "checkpoint.pth")])
    assert ours["mIoU"] == pytest.approx(metrics["mIoU"])
    state = {**{f"model.{k}": v for k, v in ckpt["model"].items()},
             **{f"ema_model.{k}": v for k, v in ckpt["ema_model"].items()},
             **{f"imnet_model.{k}": v for k, v in ckpt["model"].items()}}
    torch.save({"meta": {"iter": 40000, "CLASSES": ["road"]}, "state_dict": state, "optimizer": {}},
               tmp_path / "latest.pth")
    authors = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "eva"), "--eval-only",
                         "--checkpoint", str(tmp_path / "latest.pth")])
    assert authors["mIoU"] == pytest.approx(metrics["mIoU"])
    teacher = [dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / f"evt{k}"), "--eval-only",
                          "--checkpoint", str(path), "--eval-model", "teacher"])["mIoU"]
               for k, path in enumerate((tmp_path / "run" / "checkpoint.pth", tmp_path / "latest.pth"))]
    assert teacher[0] == pytest.approx(teacher[1])
    with pytest.raises(common.DataError, match="trained with --mit tiny \\(this run: b0\\)"):   # --mit: another network
        dacs.main([*TINY, "--mit", "b0", "--data-root", str(root), "--out-dir", str(tmp_path / "evb"), "--eval-only",
                   "--checkpoint", str(tmp_path / "run" / "checkpoint.pth")])


def test_a_checkpoint_of_the_other_stack_is_refused(root, tmp_path):
    deeplab = tmp_path / "deeplab.pth"
    torch.save({"model": common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict()}, deeplab)
    with pytest.raises(common.DataError, match="a --stack deeplabv2 checkpoint \\(this run: --stack daformer\\)"):
        dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "e1"), "--eval-only",
                   "--checkpoint", str(deeplab)])
    daformer = tmp_path / "daformer.pth"
    torch.save({"model": common.daformer_segmentor(19, "tiny").state_dict(), "args": {"stack": "daformer"}}, daformer)
    plain = ["--iters", "1", "--layers", "1", "1", "1", "1", "--init", "none", "--workers", "0", "--device", "cpu"]
    for script, extra in ((dacs, []), (iidm, ["--n-labeled", "2"])):
        plain += extra
        with pytest.raises(common.DataError, match="a --stack daformer checkpoint \\(this run: --stack deeplabv2\\)"):
            script.main([*plain, "--data-root", str(root), "--out-dir", str(tmp_path / "e2"), "--eval-only",
                         "--checkpoint", str(daformer)])
        with pytest.raises(common.DataError, match="a --stack daformer checkpoint"):
            script.main([*plain, "--data-root", str(root), "--out-dir", str(tmp_path / "e3"), "--resume",
                         str(daformer)])
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("script", [dacs, iidm])
@pytest.mark.parametrize("flags, message", [
    (["--layers", "1", "1", "1", "1"], "--layers is a --stack deeplabv2 flag"),
    (["--width", "32"], "--width is a --stack deeplabv2 flag")])
def test_deeplab_only_flags_are_refused(script, flags, message):
    with pytest.raises(common.DataError, match=message):
        script.parse_args(["--stack", "daformer", "--init", "none", *flags])


@pytest.mark.parametrize("script, flag", [(dacs, ["--aspp-full"]), (dacs, ["--clean-param-groups"]),
                                          (dacs, ["--sgd-rule", "torch0.4"]), (iidm, ["--frozen-bn"])])
def test_more_deeplab_only_flags_are_refused(script, flag):
    with pytest.raises(common.DataError, match=f"{flag[0]} is a --stack deeplabv2 flag"):
        script.parse_args(["--stack", "daformer", "--init", "none", *flag])


@pytest.mark.parametrize("script", [dacs, iidm])
def test_stack_flags_are_refused_with_deeplabv2(script):
    with pytest.raises(common.DataError, match="--fd-lambda is a --stack daformer flag"):
        script.parse_args(["--fd-lambda", "0.01"])


def test_missing_mit_file_is_refused_in_one_line_and_writes_nothing(root, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "dacs.py"), "--stack", "daformer", "--init",
                          str(tmp_path / "mit_b5.pth"), "--data-root", str(root), "--out-dir", str(out)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"error: --init {tmp_path / 'mit_b5.pth'}: file not found")
    assert "mit_b5.pth" in res.stderr and "SegFormer" in res.stderr and "--init PATH" in res.stderr
    assert not out.exists()
    with pytest.raises(common.DataError, match="nope.pth: file not found.*SegFormer's ImageNet-1k"):
        iidm.main(["--stack", "daformer", "--init", str(tmp_path / "nope.pth"), "--data-root", str(root),
                   "--out-dir", str(out)])
    assert not out.exists()
    with pytest.raises(common.DataError, match="--init coco is a DeepLabv2 initialisation"):
        dacs.parse_args(["--stack", "daformer", "--init", "coco"])
    with pytest.raises(common.DataError, match="pretrained/mit_b5.pth: file not found"):   # DAFormer's location
        iidm.parse_args(["--stack", "daformer"])


def test_demo_runs_tiny_mit_from_random_init(tmp_path):
    out = tmp_path / "run"
    dacs.main(["--demo", "--stack", "daformer", "--iters", "2", "--data-root", str(tmp_path / "data"),
               "--out-dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["stack"], config["mit"], config["init"]) == ("daformer", "tiny", "none")
    summary = json.loads((out / "demo.json").read_text())
    assert summary["method"]["name"] == "DAFormer" and [b["name"] for b in summary["baselines"]] == ["source-only"]


@pytest.mark.parametrize("run", [run_dacs, run_iidm], ids=["dacs", "iidm"])
def test_the_source_graph_kept_for_fd_is_freed_before_the_next_stream(root, tmp_path, monkeypatch, run):
    """The source backward keeps its graph for the FD backward; after that no reference may keep the decoder's
    saved tensors (and so the stage-4 map) alive through the teacher and the later streams."""
    import weakref
    import training
    refs, alive = [], []
    real_fd, real_next, real_target = common.thing_feature_distance, training.next_batch, training.next_target_batch

    def fd(features, *a, **k):
        refs.append(weakref.ref(features))
        return real_fd(features, *a, **k)

    def check(real):
        def next_(*a, **k):
            if refs:
                alive.append(refs.pop()() is not None)
            return real(*a, **k)
        return next_
    monkeypatch.setattr(common, "thing_feature_distance", fd)
    monkeypatch.setattr(training, "next_batch", check(real_next))
    monkeypatch.setattr(training, "next_target_batch", check(real_target))
    run(root, tmp_path / "run", "--iters", "2")
    assert alive and not any(alive), alive
