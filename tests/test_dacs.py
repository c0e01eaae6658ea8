"""dacs.py: short runs for every source, the mixing pieces, and one test per flag."""
import json
import types

import pytest
import torch

import common
import dacs
from conftest import script_runner, weights_after, weights_digest

TINY = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32",
        "--target-size", "64", "32", "--crop-size", "32", "32", "--workers", "0", "--log-every", "1",
        "--device", "cpu"]


run = script_runner(dacs, TINY)


@pytest.mark.parametrize("source", ["gta5", "synthia"])
def test_two_iterations_outputs(root, tmp_path, source):
    metrics, ckpt = run(root, tmp_path / "run", "--source", source)
    assert set(ckpt) >= {"model", "ema_model", "optimizer", "iteration", "rng", "args", "scheduler"}
    assert ckpt["iteration"] == 2
    assert list(ckpt["model"]) == list(common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict())
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.dumps(saved) == json.dumps(metrics) and saved["iteration"] == 2 and saved["model"] == "student"
    assert ("mIoU13" in saved) == (source == "synthia") and saved["labels"] == "input"   # DACS: --eval-res half
    assert saved["num_classes"] == (16 if source == "synthia" else 19)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2] and {"loss_l", "loss_u", "q", "lr"} <= set(log[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["source"] == source and config["mask_rounding"] == "ceil"


def test_source_only_has_no_teacher(root, tmp_path):
    _, ckpt = run(root, tmp_path / "run", "--source-only")
    assert "ema_model" not in ckpt
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert "loss_u" not in log


def test_demo_runs_method_and_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    dacs.main(["--demo", "--iters", "2", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)])
    assert (tmp_path / "data" / "demo" / "gta5" / "labels").is_dir()
    assert json.loads((out / "config.json").read_text())["layers"] == [1, 1, 1, 1]
    assert (tmp_path / "run_source_only" / "metrics.json").is_file()
    assert "DACS" in capsys.readouterr().out.splitlines()[-1]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["script"] == "dacs.py" and summary["method"]["name"] == "DACS" and summary["iterations"] == 2
    assert [b["name"] for b in summary["baselines"]] == ["source-only"]
    assert set(summary) == {"script", "method", "baselines", "iterations", "seconds", "torch"}
    assert json.loads((out / "config.json").read_text())["init"] == "demo"
    assert list((tmp_path / "data" / "demo").glob("init_*.pth"))                       # the demo init was built


def test_eval_only_reproduces_final_metrics_and_writes_predictions(root, tmp_path):
    metrics, _ = run(root, tmp_path / "run")
    again = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "ev"), "--eval-only",
                       "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--save-predictions"])
    assert again["mIoU"] == pytest.approx(metrics["mIoU"])
    preds = sorted((tmp_path / "ev" / "predictions").iterdir())
    assert len(preds) == 2 and preds[0].name.endswith("_labelIds.png")
    teacher = dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "evt"), "--eval-only",
                         "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--eval-model", "teacher"])
    assert teacher["model"] == "teacher"
    assert json.loads((tmp_path / "evt" / "metrics.json").read_text())["model"] == "teacher"
    run(root, tmp_path / "so", "--source-only")
    with pytest.raises(common.DataError, match="no 'ema_model'"):
        dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "evs"), "--eval-only",
                   "--checkpoint", str(tmp_path / "so" / "checkpoint.pth"), "--eval-model", "teacher"])


def test_resume_from_checkpoint_is_exact(root, tmp_path):
    _, full = run(root, tmp_path / "a", "--iters", "3")
    run(root, tmp_path / "b", "--iters", "3", "--save-every", "1", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "c", "--iters", "3", "--resume", tmp_path / "b" / "checkpoint_2.pth")
    for key in ("model", "ema_model"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])



def test_resume_from_an_authors_checkpoint(root, tmp_path, capsys):
    """The authors' trainUDA.py saves model/ema_model/optimizer/iteration only: continue at that iteration
    on the poly schedule with the RNGs re-seeded (every draw here follows from seed and iteration anyway)."""
    _, full = run(root, tmp_path / "a", "--iters", "3")
    run(root, tmp_path / "b", "--iters", "3", "--save-every", "1", "--keep-checkpoints")
    ckpt = torch.load(tmp_path / "b" / "checkpoint_2.pth", weights_only=True)
    authors = {k: ckpt[k] for k in ("model", "ema_model", "optimizer", "iteration")}
    torch.save(authors, tmp_path / "authors.pth")
    _, resumed = run(root, tmp_path / "c", "--iters", "3", "--resume", tmp_path / "authors.pth")
    assert "re-seeded from --seed 0" in capsys.readouterr().out
    for key in ("model", "ema_model"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [3] and log[0]["lr"] == pytest.approx(2.5e-4 * (1 - 2 / 3) ** 0.9)
    del authors["ema_model"]
    torch.save(authors, tmp_path / "no_teacher.pth")
    with pytest.raises(common.DataError, match="no 'ema_model'"):
        run(root, tmp_path / "d", "--iters", "3", "--resume", tmp_path / "no_teacher.pth")

# ------------------------------------------------------------------ the mixing pieces

def _args(**kw):
    base = dict(tau=0.968, mask_rounding="ceil", mask_exclude_ignore=False, pixel_weight="threshold_uniform")
    return types.SimpleNamespace(**{**base, **kw})


def test_cross_domain_mix_pastes_source_classes_onto_target():
    g = torch.Generator().manual_seed(0)
    y_s = torch.randint(0, 5, (2, 8, 8))
    y_s[0, :2] = 255
    x_s, x_t = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8) + 5
    logits = torch.zeros(2, 19, 8, 8)
    logits[:, 3] = 10.0                                  # confident everywhere...
    logits[1, :, :4] = 0.0                               # ...except half of target image 1
    x_m, y_m, w, q = dacs.cross_domain_mix(x_s, y_s, x_t, logits, g, _args())
    assert q.item() == pytest.approx(0.75)               # share of confident pixels over both target images
    M = (x_m < 5).all(1)                                  # pixels that came from the source image
    for k in range(2):
        assert torch.equal(x_m[k][:, M[k]], x_s[k][:, M[k]]) and torch.equal(x_m[k][:, ~M[k]], x_t[k][:, ~M[k]])
        pasted, present = set(y_s[k][M[k]].tolist()), set(y_s[k].unique().tolist())
        assert len(pasted) == (len(present) + 1) // 2    # ceil(n/2) whole classes of the source GT, 255 counts
        assert all(M[k][y_s[k] == c].unique().numel() == 1 for c in present)   # whole classes only
        assert torch.equal(y_m[k][M[k]], y_s[k][M[k]]) and torch.equal(y_m[k][~M[k]], logits[k].argmax(0)[~M[k]])
        assert (w[k][M[k]] == 1).all() and torch.allclose(w[k][~M[k]], torch.tensor(0.75))


def test_cross_domain_mix_pixel_weight_options():
    logits = torch.zeros(1, 19, 4, 4)
    logits[0, 2, :2] = 10.0                                # top half confident
    y_s = torch.full((1, 4, 4), 255)                      # only ignore: nothing of the target is covered
    x = torch.zeros(1, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    args = _args(mask_exclude_ignore=True)
    w_pixel = dacs.cross_domain_mix(x, y_s, x, logits, g, _args(mask_exclude_ignore=True, pixel_weight="threshold"))[2]
    assert torch.equal(w_pixel[0], torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4] * 2))
    assert (dacs.cross_domain_mix(x, y_s, x, logits, g, args)[2] == 0.5).all()
    w_none = dacs.cross_domain_mix(x, y_s, x, logits, g, _args(mask_exclude_ignore=True, pixel_weight="none"))[2]
    assert (w_none == 1).all()


def test_intra_domain_mix_uses_teacher_argmax_and_mixed_soft_maps():
    g = torch.Generator().manual_seed(1)
    prob = torch.softmax(torch.randn(2, 19, 8, 8) * 3, 1)
    x_t = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    x_m, y_m, w, q = dacs.intra_domain_mix(x_t, prob, g, _args(mask_rounding="floor", tau=0.5))
    M0 = x_m[0, 0] == 0                                   # classes of target 0 pasted onto target 1
    a0 = prob[0].argmax(0)
    assert len(set(a0[M0].tolist())) == len(a0.unique()) // 2
    mixed = torch.where(M0, prob[0], prob[1])
    assert torch.equal(y_m[0], mixed.argmax(0))
    conf = torch.stack([mixed.max(0).values, torch.where(x_m[1, 0] == 1, prob[1], prob[0]).max(0).values])
    assert q.item() == pytest.approx((conf >= 0.5).float().mean().item()) and torch.allclose(w, q.expand_as(w))


def test_intra_domain_mix_honours_pixel_weight():
    """--pixel-weight with IntraMix (ClassMix trainSSL.py options, on the mixed confidences): q on every pixel,
    1 on the confident pixels only, or 1 everywhere; q (logged) is the confident share in every case."""
    prob = torch.full((2, 19, 2, 2), 0.5 / 18)
    prob[:, 0] = 0.5                                     # unconfident class 0 everywhere...
    prob[0, :, 0, 0] = 0.0
    prob[0, 1, 0, 0] = 1.0                               # ...but for one pixel of image 0, confident class 1
    x_t = torch.zeros(2, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    ws = {}
    for mode in ("threshold_uniform", "threshold", "none"):
        g.manual_seed(0)
        _, y_m, ws[mode], q = dacs.intra_domain_mix(x_t, prob, g, _args(mask_rounding="floor", pixel_weight=mode))
        assert q.item() == pytest.approx(1 / 8)          # class 1 is not pasted (floor(2/2) = 1 class: 0 or 1)
    confident = (y_m == 1).float()                       # the one confident mixed pixel
    assert confident.sum() == 1
    assert torch.equal(ws["threshold"], confident)
    assert torch.equal(ws["none"], torch.ones(2, 2, 2))
    assert torch.allclose(ws["threshold_uniform"], torch.full((2, 2, 2), 1 / 8))


def test_align_distribution():
    prob = torch.softmax(torch.randn(1, 3, 2, 2), 1)
    p_target, p_model = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    out = dacs.align_distribution(prob, p_target, p_model)
    assert torch.allclose(out.sum(1), torch.ones(1, 2, 2))
    ratio = out / prob
    assert torch.allclose(ratio[:, 0] / ratio[:, 2], torch.full((1, 2, 2), 4.0))


# ------------------------------------------------------------------ each flag changes what it should

FLAG_CASES = [  # (flags, baseline flags): the flag must change the trained weights after 3 iterations
    (["--source-only"], []),
    (["--mix", "intra"], []),
    (["--mix", "intra-aligned"], ["--mix", "intra"]),
    (["--mask-exclude-ignore"], []),
    (["--mask-exclude-ignore", "--mask-rounding", "floor"], ["--mask-exclude-ignore"]),
    (["--jitter-gate", "0", "--no-jitter"], ["--jitter-gate", "0"]),
    (["--jitter-gate", "1"], []),
    (["--no-blur"], []),
    (["--aspp-full"], []),
    (["--teacher-eval-bn", "--tau", "0.01"], ["--tau", "0.01"]),   # q > 0 so the pseudo-labels count
    (["--clean-param-groups"], []),
    (["--sgd-rule", "torch0.4"], []),                  # PyTorch <= 1.4: decay into p.grad, compounding
    (["--amp", "--amp-dtype", "fp16"], ["--amp"]),     # fp16 autocast + GradScaler on the CPU: that path runs
    (["--tau", "0.01"], []),
    (["--pixel-weight", "threshold", "--tau", "0.1"], ["--tau", "0.1"]),
    (["--pixel-weight", "none"], []),
    (["--ema-alpha", "0.3", "--tau", "0.01"], ["--tau", "0.01"]),
    (["--consistency-weight", "0.5"], []),
    (["--lr", "1e-3"], []),
    (["--amp"], []),   # bf16 autocast + channels_last on the CPU: the AMP code path runs
]


@pytest.fixture(scope="module")
def weights(root, tmp_path_factory):
    return weights_after(run, root, tmp_path_factory)


@pytest.mark.parametrize("flags,base", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_flag_changes_training(weights, flags, base):
    assert weights(flags) != weights(base)


def test_same_flags_same_weights(weights, root, tmp_path):
    assert weights_digest(run(root, tmp_path / "again", "--iters", "3")[1]["model"]) == weights([])


def test_eval_res_picks_the_label_resolution(root, tmp_path, monkeypatch):
    seen = []
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda model, ds, *a, **k: seen.append(ds[0]["label"].shape)
                        or evaluate(model, ds, *a, **k))
    small = ["--iters", "1", "--target-size", "32", "16", "--crop-size", "16", "16"]  # labels are 64x32
    run(root, tmp_path / "h", *small)
    run(root, tmp_path / "f", *small, "--eval-res", "full")
    assert seen == [(16, 32), (32, 64)]


@pytest.mark.parametrize("flags,needle", [
    (["--jitter-gate", "2"], "--jitter-gate"),
    (["--source", "mars"], "invalid choice"),
    (["--mix", "both"], "invalid choice"),
    (["--crop-size", "0", "0", "--source-size", "64", "40"], "--crop-size 0 0: InterMix"),    # target 64 32
    (["--mix", "intra", "--batch-size", "1"], "--mix intra pairs target image k with k+1"),
    (["--mix", "intra-aligned", "--batch-size", "1"], "--batch-size 1, expected at least 2"),
    (["--consistency-weight", "-1"], "--consistency-weight -1.0: expected >= 0"),
])
def test_bad_flags(root, tmp_path, capsys, flags, needle):
    with pytest.raises((SystemExit, common.DataError)) as exc:
        dacs.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x"), *flags])
    text = str(exc.value) + capsys.readouterr().err
    assert needle in text and not (tmp_path / "x").exists()


def test_defaults_are_the_released_configuration():
    """vikolss/DACS configUDA.json + trainUDA.py, written out here (not read from the script's PAPER dict)."""
    a = vars(dacs.parse_args([]))
    expect = {"iters": 250000, "batch_size": 2, "lr": 2.5e-4, "source_size": (1280, 720), "target_size": (1024, 512),
              "crop_size": (512, 512), "eval_res": "half", "init": "coco", "layers": [3, 4, 23, 3],
              "source": "gta5", "mix": "inter", "pixel_weight": "threshold_uniform", "tau": 0.968,
              "ema_alpha": 0.99, "consistency_weight": 1.0, "mask_rounding": "ceil", "mask_exclude_ignore": False,
              "no_jitter": False, "no_blur": False, "jitter_gate": 0.2, "aspp_full": False,
              "teacher_eval_bn": False, "clean_param_groups": False, "optimizer": "sgd", "amp": False}
    assert {k: a[k] for k in expect} == expect
    assert dacs.parse_args(["--source", "synthia"]).source_size == (1280, 760)
    assert dacs.parse_args(["--mix", "intra"]).mask_rounding == "floor"


def test_teacher_is_updated_after_the_step_without_bn_buffers(root, tmp_path):
    """trainUDA.py order: optimizer step, then EMA with alpha(0) = 0, so after one iteration the teacher's
    parameters equal the updated student's; its BN buffers are its own (train mode, not averaged)."""
    _, ckpt = run(root, tmp_path / "a", "--iters", "1")
    s, t = ckpt["model"], ckpt["ema_model"]
    params = [k for k in s if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(s[k], t[k]) for k in params)
    assert not torch.equal(s["bn1.running_mean"], t["bn1.running_mean"])
    _, ckpt = run(root, tmp_path / "b", "--iters", "1", "--teacher-eval-bn")
    assert torch.equal(ckpt["model"]["bn1.running_mean"], ckpt["ema_model"]["bn1.running_mean"])


def test_distribution_alignment_running_mean_has_momentum_0_99(root, tmp_path, monkeypatch):
    """§2.5.6 (ReMixMatch): p~ <- 0.99 p~ + 0.01 mean of the teacher softmax of the target batch, from uniform;
    the alignment sees the updated p~ and the raw teacher softmax; the checkpoint keeps p~ for resume."""
    seen = []
    align = dacs.align_distribution
    monkeypatch.setattr(dacs, "align_distribution", lambda prob, p_target, p_model: seen.append(
        (prob.clone(), p_model.clone())) or align(prob, p_target, p_model))
    _, ckpt = run(root, tmp_path / "run", "--iters", "2", "--mix", "intra-aligned")
    p = torch.full((19,), 1 / 19)
    for prob, p_model in seen:
        p = 0.99 * p + 0.01 * prob.mean((0, 2, 3))
        assert torch.allclose(p_model, p, rtol=1e-5, atol=1e-7)
    assert len(seen) == 2 and torch.allclose(ckpt["p_model"], p, rtol=1e-5, atol=1e-7)
    assert (seen[0][1] - 1 / 19).abs().max() > 1e-4          # the first update moved p~ measurably


def test_uncropped_runs_need_one_frame_only_where_images_are_mixed_across_domains(root, tmp_path, monkeypatch):
    """--crop-size 0 0: InterMix needs source and target at one size (refused above otherwise); IntraMix and
    the source-only baseline never mix across domains, so different sizes are fine there."""
    shapes = []
    one_mix = common.one_mix
    monkeypatch.setattr(common, "one_mix", lambda M, a, b: shapes.append(tuple(a.shape[-2:])) or one_mix(M, a, b))
    run(root, tmp_path / "a", "--iters", "1", "--crop-size", "0", "0")                 # 64x32 both
    assert shapes and set(shapes) == {(32, 64)}                                         # whole images mixed
    uncropped = ["--crop-size", "0", "0", "--source-size", "64", "40"]
    for flags in (["--source-only"], ["--mix", "intra"]):
        assert dacs.parse_args([*TINY, *uncropped, *flags]).crop_size == [0, 0]
    for flags, frame in ((["--source", "synthia"], "1280 760"), ([], "1280 720"), (["--source", "demo"], "128 64")):
        with pytest.raises(common.DataError, match=f"source {frame}, --target-size 1024 512"):
            dacs.parse_args(["--crop-size", "0", "0", *flags])      # the default sizes of each source
    demo_uncropped = ["--source", "demo", "--crop-size", "0", "0", "--target-size", "128", "64"]
    assert dacs.parse_args(demo_uncropped).crop_size == [0, 0]


def test_resume_intra_aligned_without_p_model_is_refused(root, tmp_path):
    """An authors' checkpoint (model/ema_model/optimizer/iteration) has no distribution-alignment state:
    --mix intra-aligned refuses it with one line, before anything is written."""
    _, ckpt = run(root, tmp_path / "a", "--iters", "1", "--mix", "intra-aligned")
    authors = {k: ckpt[k] for k in ("model", "ema_model", "optimizer", "iteration")}
    torch.save(authors, tmp_path / "authors.pth")
    with pytest.raises(common.DataError, match="no 'p_model'"):
        run(root, tmp_path / "b", "--iters", "2", "--mix", "intra-aligned", "--resume", tmp_path / "authors.pth")
    assert not (tmp_path / "b").exists()
