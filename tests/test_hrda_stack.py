"""--stack hrda and --mic in dacs.py and iidm.py (tiny MiT, 64x64 crops with 32x32 detail windows, generated data):
runs and exact resume, one test per new flag, the authors' HRDA checkpoint format, and the refusals."""
import json
import subprocess
import sys

import pytest
import torch

import common
import dacs
import iidm
import training
from conftest import ROOT, make_blocky, same_state, script_runner, weights_digest

H, W = 64, 128   # every generated image; 64x64 crops, 32x32 detail windows, 32x32 context views
TINY = ["--iters", "2", "--stack", "hrda", "--mit", "tiny", "--init", "none", "--source-size", str(W), str(H),
        "--target-size", str(W), str(H), "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--tau", "0.01",
        "--warmup-iters", "0", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--device", "cpu"]
run_dacs = script_runner(dacs, TINY)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA5 and Cityscapes trees whose labels hold pure thing-class cells (conftest.make_blocky)."""
    return make_blocky(tmp_path_factory.mktemp("hrda"), H, W)


@pytest.mark.parametrize("mic", [[], ["--mic", "--pl-crop", "none", "--mask-block", "16"]], ids=["hrda", "mic"])
def test_dacs_two_iterations_and_exact_resume(root, tmp_path, mic):
    metrics, full = run_dacs(root, tmp_path / "a", "--save-every", "1", "--keep-checkpoints", *mic)
    names = list(common.hrda_segmentor(19, "tiny").state_dict())            # the authors' HRDA student names
    assert list(full["model"]) == names and list(full["ema_model"]) == names and full["iteration"] == 2
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all((r.get("loss_mic", 0) > 0) == bool(mic) for r in log)
    _, resumed = run_dacs(root, tmp_path / "c", "--resume", tmp_path / "a" / "checkpoint_1.pth", *mic)
    assert same_state(full["model"], resumed["model"]) and same_state(full["ema_model"], resumed["ema_model"])


DEEPLAB = ["--iters", "2", "--layers", "1", "1", "1", "1", "--width", "16", "--optimizer", "adam", "--init", "none",
           "--source-size", str(W), str(H), "--target-size", str(W), str(H), "--crop-size", "64", "64", "--tau",
           "0.01", "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--device", "cpu"]
DAFORMER = [("daformer" if f == "hrda" else f) for f in TINY]


@pytest.mark.parametrize("flags", [DEEPLAB, DAFORMER], ids=["deeplabv2", "daformer"])
def test_mic_on_the_other_stacks_runs_resumes_and_changes_training(root, tmp_path, flags):
    """--mic is valid with every stack (MIC also reports DeepLabv2): a masked stream that changes the weights."""
    run = script_runner(dacs, flags)
    mic = ["--mic", "--mask-block", "16"]   # a 64-pixel block would mask the whole 64x64 crop 70 % of the time
    _, full = run(root, tmp_path / "a", *mic, "--save-every", "1", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "b", *mic, "--resume", tmp_path / "a" / "checkpoint_1.pth")
    assert same_state(full["model"], resumed["model"])
    _, plain = run(root, tmp_path / "c")
    assert weights_digest(plain["model"]) != weights_digest(full["model"])
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_mic"] > 0 for r in log)


def test_hrda_defaults_follow_the_stack():
    args = dacs.parse_args(["--stack", "hrda", "--init", "none"])
    assert (tuple(args.source_size), tuple(args.target_size), tuple(args.crop_size)) == (
        (2560, 1440), (2048, 1024), (1024, 1024))
    assert (args.pl_crop, args.hr_loss_weight, args.eval_mode, args.eval_res, args.fd_lambda, args.ema_alpha,
            args.iters, args.rcs, args.mic, args.mask_ratio) == ("v2", 0.1, "slide", "full", 0.005, 0.999, 40000,
                                                                "source", False, None)
    mic = dacs.parse_args(["--stack", "hrda", "--init", "none", "--mic"])
    assert (mic.mask_ratio, mic.mask_block, mic.mask_lambda, mic.mask_lambda_all) == (0.7, 64, 1.0, False)
    daformer = dacs.parse_args(["--stack", "daformer", "--init", "none", "--mic"])   # MIC id 81: 32 px on 512 crops
    assert (daformer.mask_block, dacs.parse_args(["--mic"]).mask_block) == (32, 32)
    assert dacs.RCS_MIN_CROP_RATIO["hrda"] == 2.0 and args.target_cat_max_ratio == 1.0   # 0.75 on the source only


# ------------------------------------------------------------------ what the loop does

def test_loop_streams_windows_context_fd_and_q_before_the_margins(root, tmp_path, monkeypatch):
    """Each student pass draws its own detail box; the teacher predicts through the 3x3 overlapping windows;
    FD encodes the 32x32 context view; q is taken before the v2 margins (all of a 64-row image)."""
    calls, fd_inputs, boxes = [], [], []
    head_forward, fd, crop_box = common.HRDAHead.forward, common.thing_feature_distance, common.hr_crop_box

    def record_head(self, context, detail, box=None, windows=None):
        calls.append((context[0].shape[0], box is not None, None if windows is None else len(windows)))
        return head_forward(self, context, detail, box, windows)

    monkeypatch.setattr(common.HRDAHead, "forward", record_head)
    monkeypatch.setattr(common, "thing_feature_distance", lambda f, enc, x, y: fd_inputs.append(x.shape) or fd(
        f, enc, x, y))
    monkeypatch.setattr(common, "hr_crop_box", lambda *a: boxes.append(crop_box(*a)) or boxes[-1])
    run_dacs(root, tmp_path / "a", "--iters", "1", "--mic", "--eval-every", "0")
    train_calls = calls[:4]   # source, teacher, mix, masked; then the final evaluation
    assert [c[1] for c in train_calls] == [True, False, True, True] and train_calls[1] == (2, False, 9)
    assert len(boxes) == 3 and all(b[1] - b[0] == 32 and b[3] - b[2] == 32 for b in boxes)
    assert fd_inputs == [torch.Size([2, 3, 32, 32])]
    log = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])
    assert log["q"] == 1.0   # tau 0.01: every pixel confident; the margins zero the weights, not q


def test_slide_evaluation_runs_windows_of_the_crop(root, tmp_path, monkeypatch):
    """--eval-mode slide (default): 64x64 windows every 32 pixels of the 64x128 image, each an HRDA inference;
    --eval-mode whole: one inference of the whole image."""
    seen = []
    slide = common.slide_inference
    monkeypatch.setattr(common, "slide_inference", lambda f, img, crop, stride: seen.append(
        (tuple(img.shape[2:]), crop, stride)) or slide(f, img, crop, stride))
    _, ckpt = run_dacs(root, tmp_path / "a", "--iters", "1")
    assert seen == [((64, 128), (64, 64), (32, 32))] * 2      # two val images
    seen.clear()
    whole = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "w"), "--eval-only",
                       "--eval-mode", "whole", "--checkpoint", str(tmp_path / "a" / "checkpoint.pth")])
    assert seen == [] and whole["model"] == "student"


# v2 margins would zero every weight of a 64-row image; 8-pixel blocks (an 8x8 grid) practically never mask a whole
# crop: an all-zero image gives a random-init MiT (zero biases) zero-variance LayerNorms, whose backward scales by
# 1/sqrt(eps) each, up to inf/NaN encoder gradients (docs/quirks.md F9)
MIC = ["--mic", "--pl-crop", "none", "--mask-block", "8"]
FLAGS = [([], ["--hr-loss-weight", "0.5"]), ([], ["--pl-crop", "none"]), ([], ["--pl-crop", "v1"]),
         (["--pl-crop", "none"], ["--mic", "--mask-block", "8"]), (MIC, ["--mask-ratio", "0.3"]),
         (MIC, ["--mask-block", "16"]), (MIC, ["--mask-lambda", "0.5"]),
         (MIC + ["--mask-lambda", "0.5"], ["--mask-lambda-all"])]


@pytest.fixture(scope="module")
def dacs_weights(root, tmp_path_factory):
    cache = {}

    def get(flags):
        if tuple(flags) not in cache:
            ckpt = run_dacs(root, tmp_path_factory.mktemp("flag"), "--iters", "1", "--eval-every", "0", *flags)[1]
            cache[tuple(flags)] = weights_digest(ckpt["model"])
        return cache[tuple(flags)]
    return get


@pytest.mark.parametrize("base, flags", FLAGS, ids=lambda f: "_".join(f))
def test_dacs_hrda_flag_changes_training(dacs_weights, base, flags):
    assert dacs_weights(base + flags) != dacs_weights(base)


# ------------------------------------------------------------------ checkpoints

def test_eval_only_reads_the_authors_hrda_latest_pth(root, tmp_path):
    metrics, ckpt = run_dacs(root, tmp_path / "run", "--iters", "1")
    assert not any(k.startswith("decode_head.conv_seg") for k in ckpt["model"])   # HRDA: head.* and scale_attention.*
    state = {**{f"model.{k}": v for k, v in ckpt["model"].items()},
             **{f"ema_model.{k}": v for k, v in ckpt["ema_model"].items()},
             **{f"imnet_model.{k}": v for k, v in ckpt["model"].items() if k.startswith("backbone.")}}
    torch.save({"meta": {"iter": 40000, "CLASSES": ["road"]}, "state_dict": state}, tmp_path / "latest.pth")
    authors = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "eva"), "--eval-only",
                         "--checkpoint", str(tmp_path / "latest.pth")])
    assert authors["mIoU"] == pytest.approx(metrics["mIoU"])
    teacher = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "evt"), "--eval-only",
                         "--checkpoint", str(tmp_path / "latest.pth"), "--eval-model", "teacher"])
    assert teacher["model"] == "teacher"
    with pytest.raises(common.DataError, match="a --stack hrda checkpoint \\(this run: --stack daformer\\)"):
        dacs.main([*TINY[:2], "--stack", "daformer", *TINY[4:], "--data-root", str(root), "--out-dir",
                   str(tmp_path / "e0"), "--eval-only", "--checkpoint", str(tmp_path / "latest.pth")])


def test_checkpoints_of_the_other_stacks_are_refused(root, tmp_path):
    files = {"deeplabv2": {"model": common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict()},
             "daformer": {"state_dict": {f"model.{k}": v for k, v in
                                         common.daformer_segmentor(19, "tiny").state_dict().items()}}}
    for stack, obj in files.items():
        torch.save(obj, tmp_path / f"{stack}.pth")
        for mode in (["--eval-only", "--checkpoint"], ["--resume"]):
            with pytest.raises(common.DataError, match=f"a --stack {stack} checkpoint \\(this run: --stack hrda\\)"):
                dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "e"), *mode,
                           str(tmp_path / f"{stack}.pth")])
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("flags, message", [
    (["--mic", "--source-only"], "error: --mic with --source-only"),
    (["--target-size", "48", "48"], "error: --target-size 48 48: smaller than the HRDA crop --crop-size 64 64"),
    (["--source-size", "60", "64"], "error: --source-size 60 64: smaller than the HRDA crop"),
    (["--crop-size", "56", "56"], "error: --crop-size 56 56: --stack hrda needs sides divisible by 16")])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(root, tmp_path, flags, message):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "dacs.py"), *TINY, "--data-root", str(root), "--out-dir",
                          str(out), *flags], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(message) and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--stack", "daformer", "--hr-loss-weight", "0.2"], "--hr-loss-weight is a --stack hrda flag"),
    (["--stack", "daformer", "--eval-mode", "whole"], "--eval-mode is a --stack hrda flag"),
    (["--stack", "daformer", "--pl-crop", "v2"], "--pl-crop v2 is HRDA's"),
    (["--stack", "hrda", "--mask-ratio", "0.5"], "--mask-ratio is a --mic flag"),
    (["--stack", "hrda", "--mic", "--mask-ratio", "1"], "--mask-ratio 1.0 in \\[0,1\\)"),
    (["--stack", "hrda", "--hr-loss-weight", "2"], "--hr-loss-weight 2.0: expected a value in \\[0,1\\]"),
    (["--mic", "--mix", "intra"], "--mic with --mix intra")])
def test_flag_refusals(argv, message):
    with pytest.raises(common.DataError, match=message):
        dacs.parse_args([*argv, "--init", "none"] if "--stack" in argv else argv)


# ------------------------------------------------------------------ iidm.py: IIDM Table 3

run_iidm = script_runner(iidm, TINY + ["--n-labeled", "2"])


@pytest.mark.parametrize("mic", [[], MIC], ids=["hrda", "mic"])
def test_iidm_two_iterations_and_exact_resume(root, tmp_path, mic):
    _, full = run_iidm(root, tmp_path / "a", "--save-every", "1", "--keep-checkpoints", *mic)
    assert list(full["model"]) == list(common.hrda_segmentor(19, "tiny").state_dict())
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all({"loss_s", "loss_t", "loss_inter", "loss_intra"} <= set(r) for r in log)
    assert all((r.get("loss_mic", 0) > 0) == bool(mic) for r in log)
    _, resumed = run_iidm(root, tmp_path / "c", "--resume", tmp_path / "a" / "checkpoint_1.pth", *mic)
    assert same_state(full["model"], resumed["model"]) and same_state(full["ema_model"], resumed["ema_model"])


def test_iidm_one_pseudo_label_and_one_backward_per_stream(root, tmp_path, monkeypatch):
    """Spec steps 1-8: one teacher pass for the inter, intra and MIC streams; a student pass and a backward per
    stream (source, labeled target, inter, intra, masked), each with its own detail box."""
    calls, backwards = [], []
    head_forward, backward = common.HRDAHead.forward, training.Amp.backward

    def record_head(self, context, detail, box=None, windows=None):
        calls.append(box is not None)
        return head_forward(self, context, detail, box, windows)

    monkeypatch.setattr(common.HRDAHead, "forward", record_head)
    monkeypatch.setattr(training.Amp, "backward", lambda self, loss, **kw: backwards.append(1) or backward(
        self, loss, **kw))
    run_iidm(root, tmp_path / "a", "--iters", "1", "--eval-every", "0", *MIC)
    assert calls[:6] == [True, True, False, True, True, True]   # L_s, L_t, teacher, inter, intra, MIC
    assert len(backwards) == 6                                   # FD has its own backward after L_s


IIDM_FLAGS = [(MIC, ["--mic-on", "labeled"]), (MIC, ["--mic-on", "mixed"]), ([], ["--labeled-loss", "fused"]),
              ([], ["--pl-crop", "none"]), (["--pl-crop", "none"], MIC[:1] + MIC[3:])]


@pytest.mark.parametrize("base, flags", IIDM_FLAGS, ids=lambda f: "_".join(f))
def test_iidm_hrda_flag_changes_training(root, tmp_path, base, flags):
    digest = [weights_digest(run_iidm(root, tmp_path / str(k), "--iters", "1", "--eval-every", "0", *f)[1]["model"])
              for k, f in enumerate((base, base + flags))]
    assert digest[0] != digest[1]


@pytest.mark.parametrize("argv, message", [
    (["--stack", "daformer", "--labeled-loss", "fused"], "--labeled-loss is a --stack hrda flag"),
    (["--stack", "hrda", "--mic-on", "mixed"], "--mic-on is a --mic flag"),
    (["--stack", "hrda", "--mic", "--no-inter", "--no-intra"], "--mic needs the teacher's pseudo-label"),
    (["--stack", "hrda", "--target-size", "512", "256"], "--target-size 512 256: smaller than the HRDA crop")])
def test_iidm_refusals(argv, message):
    with pytest.raises(common.DataError, match=message):
        iidm.parse_args([*argv, "--init", "none"])


def test_iidm_hrda_defaults_and_eval_only_of_an_authors_checkpoint(root, tmp_path):
    args = iidm.parse_args(["--stack", "hrda", "--init", "none"])
    assert (tuple(args.crop_size), args.pl_crop, args.labeled_loss, args.ema_alpha, args.fd_lambda) == (
        (1024, 1024), "v2", "hrda", 0.999, 0.005)
    metrics, ckpt = run_iidm(root, tmp_path / "run", "--iters", "1")
    torch.save({"meta": {}, "state_dict": {f"model.{k}": v for k, v in ckpt["model"].items()}}, tmp_path / "l.pth")
    authors = iidm.main([*TINY, "--n-labeled", "2", "--data-root", str(root), "--out-dir", str(tmp_path / "ev"),
                         "--eval-only", "--checkpoint", str(tmp_path / "l.pth")])
    assert authors["mIoU"] == pytest.approx(metrics["mIoU"])


def test_demo_runs_hrda_and_mic(tmp_path):
    out = tmp_path / "run"
    dacs.main(["--demo", "--stack", "hrda", "--mic", "--mask-block", "8", "--iters", "2", "--data-root",
               str(tmp_path / "data"), "--out-dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["stack"], config["mit"], config["pl_crop"], config["mic"]) == ("hrda", "tiny", "v1", True)
    assert json.loads((out / "demo.json").read_text())["method"]["name"] == "MIC(HRDA)"


def test_iidm_mic_on_the_daformer_stack(root, tmp_path):
    run = script_runner(iidm, DAFORMER + ["--n-labeled", "2"])
    _, with_mic = run(root, tmp_path / "a", "--iters", "1", "--eval-every", "0", *MIC)
    _, without = run(root, tmp_path / "b", "--iters", "1", "--eval-every", "0", *MIC[1:3])
    assert weights_digest(with_mic["model"]) != weights_digest(without["model"])
    assert json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])["loss_mic"] > 0
