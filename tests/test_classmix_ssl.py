"""classmix_ssl.py: short runs, the loop pieces, and one test per flag."""
import json
import math
import types
from pathlib import Path

import pytest
import torch

import classmix_ssl
import common
import training
from conftest import script_runner, weights_after, weights_digest, make_cityscapes

TINY = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--target-size", "64", "32",
        "--n-labeled", "2", "--workers", "0", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    make_cityscapes(r)
    return r


run = script_runner(classmix_ssl, TINY)


def test_two_iterations_outputs(root, tmp_path):
    metrics, ckpt = run(root, tmp_path / "run")
    assert set(ckpt) >= {"model", "ema_model", "optimizer", "iteration", "rng", "args"} and ckpt["iteration"] == 2
    assert list(ckpt["model"]) == list(common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict())
    split = (tmp_path / "run" / "split.txt").read_text().split()
    stems = sorted(common.SegmentationDataset("cityscapes", root / "cityscapes").stems())
    assert split == common.labeled_split(stems, 2, 1)[0] and len(split) == 2   # default split seed 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["iteration"] == 2 and saved["model"] == "student" and saved["num_classes"] == 19
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss_l", "loss_u", "q", "lr"} <= set(log[-1])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_labeled"] == 2


def test_baseline_has_no_teacher_and_full_split_needs_it(root, tmp_path):
    _, ckpt = run(root, tmp_path / "b", "--no-unlabeled")
    assert "ema_model" not in ckpt
    with pytest.raises(common.DataError, match="no unlabeled"):
        run(root, tmp_path / "c", "--n-labeled", "6")
    run(root, tmp_path / "d", "--n-labeled", "6", "--no-unlabeled")       # "full" = baseline only
    with pytest.raises(common.DataError, match="--n-labeled 7"):
        run(root, tmp_path / "e", "--n-labeled", "7")


def test_official_split_and_split_file(root, tmp_path):
    run(root, tmp_path / "a", "--official-split", "1")
    stems = sorted(common.SegmentationDataset("cityscapes", root / "cityscapes").stems())
    assert (tmp_path / "a" / "split.txt").read_text().split() == common.labeled_split(stems, 2, 10)[0]
    (tmp_path / "mine.txt").write_text(stems[5] + "\n" + stems[0] + "\n")
    run(root, tmp_path / "b", "--split-file", tmp_path / "mine.txt")
    assert sorted((tmp_path / "b" / "split.txt").read_text().split()) == [stems[0], stems[5]]


def test_demo_runs_method_and_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    classmix_ssl.main(["--demo", "--iters", "2", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)])
    assert len((out / "split.txt").read_text().split()) == 10
    assert (tmp_path / "run_baseline" / "metrics.json").is_file()
    assert "ClassMix" in capsys.readouterr().out.splitlines()[-1]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["script"] == "classmix_ssl.py" and summary["method"]["name"] == "ClassMix"
    assert summary["iterations"] == 2
    assert [b["name"] for b in summary["baselines"]] == ["supervised (10 labeled)"]
    assert set(summary) == {"script", "method", "baselines", "iterations", "seconds", "torch"}
    assert json.loads((out / "config.json").read_text())["init"] == "demo"
    assert list((tmp_path / "data" / "demo").glob("init_*.pth"))                       # the demo init was built


def test_resume_from_checkpoint_is_exact(root, tmp_path):
    _, full = run(root, tmp_path / "a", "--iters", "3", "--extra-aug")
    run(root, tmp_path / "b", "--iters", "3", "--extra-aug", "--save-every", "1", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "c", "--iters", "3", "--extra-aug",
                     "--resume", tmp_path / "b" / "checkpoint_2.pth")
    for key in ("model", "ema_model"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])


# ------------------------------------------------------------------ the loop pieces

def _args(**kw):
    return types.SimpleNamespace(**{**dict(tau=0.9, pixel_weight="threshold_uniform", mask="class",
                                           mask_rounding="floor", rampup_iters=10000), **kw})


def test_unsupervised_weights():
    conf = torch.tensor([[[0.95, 0.5], [0.9, 0.1]]])
    assert torch.allclose(classmix_ssl.unsupervised_weight(conf, 0, _args()), torch.full_like(conf, 0.5))
    assert torch.equal(classmix_ssl.unsupervised_weight(conf, 0, _args(pixel_weight="threshold")),
                       torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    assert torch.equal(classmix_ssl.unsupervised_weight(conf, 0, _args(pixel_weight="none")), torch.ones_like(conf))
    w = classmix_ssl.unsupervised_weight(conf, 5000, _args(pixel_weight="sigmoid"))
    assert torch.allclose(w, torch.full_like(conf, math.exp(-5 * 0.25)))
    assert classmix_ssl.sigmoid_rampup(0) == pytest.approx(math.exp(-5)) and classmix_ssl.sigmoid_rampup(10000) == 1


def test_masks_come_from_the_teacher_argmax():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 7, (2, 16, 16))
    M = classmix_ssl.mixing_mask(label, g, _args())
    for k in range(2):
        assert len(label[k][M[k].bool()].unique()) == len(label[k].unique()) // 2     # floor(n/2)
        assert all(M[k][label[k] == c].unique().numel() == 1 for c in label[k].unique())
    cut = classmix_ssl.mixing_mask(label, g, _args(mask="cut"))
    assert cut.mean().item() == pytest.approx(0.5, abs=0.05)
    cow = classmix_ssl.mixing_mask(label, g, _args(mask="cow"))
    assert set(cow.unique().tolist()) == {0.0, 1.0} and not torch.equal(cow, cut)   # threshold: next test


def test_cutmix_and_cowmix_masks():
    m = common.cutmix_mask(50, 16, 32, torch.Generator().manual_seed(0))
    zeros = (m == 0).sum((1, 2)).float()
    assert ((zeros - 256).abs() <= 16).all()  # box area = HW/2 up to rounding of the height
    for k in range(5):
        ys, xs = torch.nonzero(m[k] == 0, as_tuple=True)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one rectangle
        assert xs.max() - xs.min() + 1 >= 16
    c = common.cowmix_mask(16, 64, 64, torch.Generator().manual_seed(0))
    assert c.shape == (16, 64, 64) and c.mean().item() == pytest.approx(0.5, abs=0.1)
    assert (c[:, 1:] == c[:, :-1]).float().mean() > 0.9  # smooth blobs, not salt and pepper
    # CowMask's threshold erfinv(2p-1) sqrt(2) std + mean (p = 0.5: the mean), not a per-image quantile
    assert (c.mean((1, 2)) - 0.5).abs().max() > 0.02
    g = torch.Generator().manual_seed(1)
    for p, frac in ((0.5, 0.5), (0.8, 0.2)):
        c = common.cowmix_mask(64, 48, 48, g, sigma_range=(1.0, 1.0), p=p)   # near-white noise
        assert c.mean().item() == pytest.approx(frac, abs=0.02)


def test_class_mix_pastes_pseudo_label_classes_onto_the_next_image_and_mixes_soft_maps():
    P = torch.softmax(torch.randn(3, 19, 10, 10) * 3, 1)
    x_u = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 10, 10)   # image k is filled with the value k
    x_m, P_m = classmix_ssl.class_mix(x_u, P, torch.Generator().manual_seed(0), _args())
    for k in range(3):
        from_k = x_m[k, 0] == k                               # pixels of image k, the rest from image k+1
        assert ((x_m[k, 0] == (k + 1) % 3) | from_k).all()
        a = P[k].argmax(0)
        assert len(a[from_k].unique()) == len(a.unique()) // 2 and all(
            from_k[a == c].unique().numel() == 1 for c in a.unique())         # whole classes of teacher map k
        assert torch.equal(P_m[k], torch.where(from_k, P[k], P[(k + 1) % 3]))  # soft maps, same mask


def test_soft_ce_equals_hard_ce_on_one_hot_targets():
    logits, target = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    w = torch.rand(2, 4, 4)
    assert classmix_ssl.soft_ce_weighted(logits, one_hot, w).item() == pytest.approx(
        common.ce_pixel_weighted(logits, target, w).item(), rel=1e-5)


# ------------------------------------------------------------------ each flag changes what it should

T = ["--tau", "0.01"]  # confident everywhere, so that the pseudo-labels carry weight in 3 iterations
FLAG_CASES = [  # (flags, baseline flags): the flag must change the trained weights after 3 iterations
    (["--no-unlabeled"], []),
    (["--mask", "cut"], []),
    (["--mask", "cow"], []),
    (["--mask-rounding", "ceil", *T], T),
    (["--pixel-weight", "threshold", "--tau", "0.1"], ["--tau", "0.1"]),
    (["--pixel-weight", "sigmoid"], []),
    (["--pixel-weight", "none"], []),
    (["--consistency-loss", "mse", *T], T),
    (["--soft-targets", "--pixel-weight", "none"], ["--pixel-weight", "none"]),
    (["--extra-aug", "--jitter-gate", "0"], []),
    (["--extra-aug", "--jitter-gate", "1"], ["--extra-aug", "--jitter-gate", "0"]),
    (["--crop-size", "16", "16"], []),
    (["--aspp-full"], []),
    (["--teacher-eval-bn", *T], T),
    (["--clean-param-groups"], []),
    (["--sgd-rule", "torch0.4"], []),                  # PyTorch <= 1.4: decay into p.grad, compounding
    (["--tau", "0.01"], []),
    (["--ema-alpha", "0.3", *T], T),
    (["--consistency-weight", "0.5", *T], T),
    (["--split-seed", "3"], []),
    (["--n-labeled", "3"], []),
    (["--amp", "--extra-aug"], ["--extra-aug"]),   # bf16 autocast on the CPU: the AMP code path runs
]


@pytest.fixture(scope="module")
def weights(root, tmp_path_factory):
    return weights_after(run, root, tmp_path_factory)


@pytest.mark.parametrize("flags,base", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_flag_changes_training(weights, flags, base):
    assert weights(flags) != weights(base)


def test_same_flags_same_weights(weights, root, tmp_path):
    assert weights_digest(run(root, tmp_path / "again", "--iters", "3")[1]["model"]) == weights([])


def test_defaults_are_the_table_4_1_configuration():
    """WilhelmT/ClassMix configCityscapes.json + trainSSL.py (augmentations off as in Table 4.1), written out."""
    a = vars(classmix_ssl.parse_args([]))
    expect = {"iters": 40000, "batch_size": 2, "lr": 2.5e-4, "target_size": (1024, 512), "crop_size": (0, 0),
              "eval_res": "half", "init": "coco", "layers": [3, 4, 23, 3], "dataset": "cityscapes",
              "n_labeled": 372, "split_seed": 1, "no_unlabeled": False, "mask": "class", "mask_rounding": "floor",
              "pixel_weight": "threshold_uniform", "tau": 0.968, "ema_alpha": 0.99, "consistency_weight": 1.0,
              "consistency_loss": "ce", "soft_targets": False, "extra_aug": False, "jitter_gate": 0.2,
              "aspp_full": False, "teacher_eval_bn": False, "clean_param_groups": False, "optimizer": "sgd"}
    assert {k: a[k] for k in expect} == expect
    assert classmix_ssl.parse_args(["--official-split", "1"]).split_seed == 10


def test_teacher_is_updated_after_the_step(root, tmp_path):
    """trainSSL.py order: step, then EMA with alpha(0) = 0: after one iteration teacher parameters = student's."""
    _, ckpt = run(root, tmp_path / "a", "--iters", "1")
    s, t = ckpt["model"], ckpt["ema_model"]
    params = [k for k in s if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(s[k], t[k]) for k in params)
    assert not torch.equal(s["bn1.running_mean"], t["bn1.running_mean"])


def test_targets_and_q_come_from_the_mixed_teacher_maps(root, tmp_path, monkeypatch):
    """The pseudo-label, its confidence and q are read off the *mixed* soft maps (CM/trainSSL.py)."""
    seen = {}
    class_mix, weight = classmix_ssl.class_mix, classmix_ssl.unsupervised_weight
    monkeypatch.setattr(classmix_ssl, "class_mix", lambda *a: seen.setdefault("mix", class_mix(*a)))
    monkeypatch.setattr(classmix_ssl, "unsupervised_weight", lambda conf, i, args: seen.setdefault(
        "conf", conf) is not None and weight(conf, i, args))
    run(root, tmp_path / "a", "--iters", "1", "--tau", "0.06")
    P_m = seen["mix"][1]
    assert torch.equal(seen["conf"], P_m.max(1).values)
    q = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])["q"]
    assert q == pytest.approx((P_m.max(1).values >= 0.06).float().mean().item())


def test_cutmix_mask_equals_per_image_slicing():
    g, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    m = common.cutmix_mask(6, 15, 22, g)
    bw = torch.randint(11, 23, (6,), generator=ref)
    bh = (15 * 22 / 2 / bw).round().clamp(max=15).long()
    x0 = (torch.rand(6, generator=ref) * (22 - bw + 1)).long()
    y0 = (torch.rand(6, generator=ref) * (15 - bh + 1)).long()
    expect = torch.ones(6, 15, 22)
    for k in range(6):
        expect[k, y0[k]:y0[k] + bh[k], x0[k]:x0[k] + bw[k]] = 0
    assert torch.equal(m, expect)


def test_mse_consistency_is_scaled_by_q_whatever_the_pixel_weight(root, tmp_path, monkeypatch):
    """Table 5.1 MSE row as CM/trainSSL.py computes it: MSE(softmax(student(x_m)), P_m) x q, q = share of mixed
    confidences >= tau (the weight map does not enter the MSE, so another --pixel-weight is refused)."""
    mse = []
    plain = common.mse_softmax
    monkeypatch.setattr(common, "mse_softmax", lambda logits, target: mse.append(plain(logits, target).item())
                        or plain(logits, target))
    run(root, tmp_path / "a", "--iters", "2", "--tau", "0.12", "--consistency-loss", "mse")
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(mse) == 2 and any(0.05 < r["q"] < 0.95 for r in log)         # q strictly between 0 and 1
    for r, m in zip(log, mse):
        assert r["loss_u"] == pytest.approx(m * r["q"], rel=1e-5)


def test_training_images_carry_the_cityscapes_mean_subtracted_from_bgr(root, tmp_path, monkeypatch):
    """docs/quirks.md C9: ClassMix subtracts the Cityscapes RGB mean (73.16, 82.91, 72.39) from BGR images of
    0..255, no std: every value + that mean is an integer grey level of the resized uint8 image."""
    seen = []
    next_batch = training.next_batch
    monkeypatch.setattr(training, "next_batch",
                        lambda loader, device: seen.append(next_batch(loader, device)) or seen[-1])
    run(root, tmp_path / "a", "--iters", "1")
    mean = torch.tensor([73.15835921, 82.90891754, 72.39239876]).view(1, 3, 1, 1)
    for x, _ in seen:                                  # the labeled and the unlabeled batch
        grey = x + mean
        assert torch.allclose(grey, grey.round(), atol=1e-3) and grey.min() >= -1e-3 and grey.max() <= 255 + 1e-3
        assert not torch.allclose(x + torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1),
                                  grey.round(), atol=1e-3)


def _jitter_spy(monkeypatch, module):
    """Record (input, norm, generator state before the call, output, the unpatched color_jitter) of every
    color_jitter call of a script."""
    calls = []
    jitter = common.color_jitter

    def spy(x, norm, g, **kw):
        state = g.get_state()
        out = jitter(x, norm, g, **kw)
        calls.append((x.clone(), norm, state, out.clone(), jitter))
        return out
    monkeypatch.setattr(module.common, "color_jitter", spy)
    return calls


def _jitter_again(call, **kw):
    x, norm, state, _, jitter = call
    g = torch.Generator()
    g.set_state(state)
    return jitter(x, norm, g, **kw)


def test_extra_aug_jitter_is_kornia_0_3_with_one_op_order_per_call(root, tmp_path, monkeypatch):
    """--extra-aug (CM/trainSSL.py strongTransform): kornia-0.3 ColorJitter with strength 0.25 applied when
    U > 0.2, the four ops in one random order for the whole batch."""
    calls = _jitter_spy(monkeypatch, classmix_ssl)
    run(root, tmp_path / "a", "--iters", "3", "--extra-aug", "--batch-size", "3")
    fired = [c for c in calls if not torch.equal(c[0], c[3])]
    assert len(calls) == 3 and fired
    for call in calls:
        assert torch.equal(call[3], _jitter_again(call, strength=0.25, gate=0.2, per_image_order=False))
    assert any(not torch.equal(c[3], _jitter_again(c, strength=0.25, gate=0.2, per_image_order=True)) for c in fired)


# ------------------------------------------------------------------ flags that other flags would silently drop

REFUSED = [  # (flags, words of the one-line error): each was accepted and then had no effect
    (["--no-unlabeled", "--mask", "cut"], "--no-unlabeled trains without teacher and mixed images: --mask would"),
    (["--no-unlabeled", "--extra-aug", "--tau", "0.5", "--teacher-eval-bn"], ": --tau, --extra-aug, --teacher-eval-bn"),
    (["--no-unlabeled", "--pixel-weight", "none"], ": --pixel-weight would have no effect"),
    (["--batch-size", "1"], "--batch-size 1: ClassMix pastes image k onto image k\\+1"),
    (["--mask", "cut", "--mask-rounding", "ceil"], "--mask-rounding applies to --mask class \\(here --mask cut\\)"),
    (["--mask", "cow", "--mask-rounding", "ceil"], "--mask-rounding applies to --mask class \\(here --mask cow\\)"),
    (["--consistency-loss", "mse", "--soft-targets"], "scaled by q whatever the weight .*: --soft-targets would"),
    (["--consistency-loss", "mse", "--pixel-weight", "sigmoid"], ": --pixel-weight would have no effect"),
    (["--jitter-gate", "0.5"], "--jitter-gate gates the jitter of --extra-aug"),
    (["--rampup-iters", "5000"], "--rampup-iters is the length of --pixel-weight sigmoid \\(here threshold_uniform\\)"),
    (["--official-split", "1", "--split-seed", "5"], "--official-split 1 is --split-seed 10 \\(here --split-seed 5\\)"),
    (["--consistency-weight", "-1"], "--consistency-weight >= 0"),
    (["--pixel-weight", "sigmoid", "--rampup-iters", "0"], "--rampup-iters >= 1"),
    (["--optimizer", "adam", "--clean-param-groups"], "--clean-param-groups with --optimizer adam"),
]


@pytest.mark.parametrize("flags,words", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_flags_without_effect_are_refused(flags, words):
    with pytest.raises(common.DataError, match=words):
        classmix_ssl.parse_args(flags)


def test_combinations_that_take_effect_are_accepted():
    for flags in (["--no-unlabeled", "--crop-size", "512", "512"], ["--no-unlabeled", "--batch-size", "1"],
                  ["--official-split", "1", "--split-seed", "10"], ["--consistency-loss", "mse", "--tau", "0.5"],
                  ["--extra-aug", "--jitter-gate", "0.5"], ["--soft-targets", "--pixel-weight", "none"],
                  ["--mask", "cut"], ["--demo", "--no-unlabeled"],
                  ["--pixel-weight", "sigmoid", "--rampup-iters", "1"]):
        classmix_ssl.parse_args(flags)


def test_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(Path(classmix_ssl.__file__)), "--no-unlabeled", "--mask", "cow",
                          "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: --no-unlabeled trains without teacher and mixed images: --mask would have no effect (drop them)"]
    assert not (tmp_path / "run").exists()


def test_split_file_gives_n_and_excludes_the_seed_flags(root, tmp_path, monkeypatch):
    """--split-file overrides N (common.labeled_split): config.json, the default out dir and the demo's baseline
    name follow the file (they said the --n-labeled default 372); seed flags beside it would be ignored."""
    stems = sorted(common.SegmentationDataset("cityscapes", root / "cityscapes").stems())
    split = tmp_path / "three.txt"
    split.write_text(f"{stems[4]}\n\n{stems[1]}\n{stems[2]}\n")
    assert classmix_ssl.parse_args(["--split-file", str(split)]).n_labeled == 3
    assert classmix_ssl.parse_args(["--split-file", str(split), "--n-labeled", "3"]).n_labeled == 3
    assert classmix_ssl.parse_args(["--demo", "--split-file", str(split)]).n_labeled == 3
    for flags, words in ((["--n-labeled", "5"], "--n-labeled 5 with --split-file .* of 3 stems"),
                         (["--split-seed", "3"], "--split-file gives the labeled list itself"),
                         (["--official-split", "2"], "--split-file gives the labeled list itself")):
        with pytest.raises(common.DataError, match=words):
            classmix_ssl.parse_args(["--split-file", str(split), *flags])
    monkeypatch.chdir(tmp_path)
    k = TINY.index("--n-labeled")
    tiny = TINY[:k] + TINY[k + 2:]
    classmix_ssl.main([*tiny, "--data-root", str(root), "--split-file", str(split)])
    config = json.loads((tmp_path / "runs" / "classmix_ssl_cityscapes_3_s0" / "config.json").read_text())
    assert config["n_labeled"] == 3 and config["split_file"] == str(split)


def test_sigmoid_rampup_length_is_a_flag_and_follows_scale_iters():
    """CM/trainSSL.py ramps over 10000 iterations; --scale-iters (K processes, --iters / K) shortens it with
    --iters, as the poly schedule (it stayed at 10000 and never finished in a 4x shorter run)."""
    conf = torch.tensor([[[0.95, 0.5]]])
    assert classmix_ssl.parse_args([]).rampup_iters == 10000
    w = classmix_ssl.unsupervised_weight(conf, 5000, _args(pixel_weight="sigmoid", rampup_iters=20000))
    assert torch.allclose(w, torch.full_like(conf, math.exp(-5 * 0.75 ** 2)))
    args = classmix_ssl.parse_args(["--pixel-weight", "sigmoid", "--iters", "40000", "--scale-iters"])
    training.apply_world(args, common.Dist(0, 3, 0), torch.device("cpu"), pairs_within_batch=True)
    assert (args.iters, args.rampup_iters) == (13334, 3334)
    args = classmix_ssl.parse_args(["--pixel-weight", "sigmoid"])
    training.apply_world(args, common.Dist(0, 3, 0), torch.device("cpu"), pairs_within_batch=True)
    assert args.rampup_iters == 10000                            # per-rank batch without --scale-iters


def test_reevaluating_a_finished_amp_run_uses_amp(root, tmp_path, monkeypatch):
    """--resume of a finished run evaluates again (the loop does not run): with --amp under autocast, as the
    evaluation that wrote metrics.json at the end of training (it ran in fp32 and could change the digits)."""
    dtypes = []
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda *a, **kw: dtypes.append(kw["amp_dtype"]) or evaluate(*a, **kw))
    run(root, tmp_path / "a", "--amp")
    run(root, tmp_path / "a", "--amp", "--resume")
    assert dtypes == [torch.bfloat16, torch.bfloat16]
