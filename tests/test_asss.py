"""asss.py: short runs of every preset, the loop order, the ASS equations, resume, and one test per flag."""
import json
import types

import pytest
import torch
import torch.nn.functional as F

import asss
import common
import training
from conftest import script_runner, weights_after, weights_digest

TINY = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32",
        "--target-size", "64", "32", "--n-labeled", "2", "--workers", "0", "--log-every", "1", "--device", "cpu",
        "--eval-every", "0"]
NO_LABELS = ["--n-labeled", "0"]


run = script_runner(asss, TINY)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ end-to-end runs of every column

PRESET_CASES = [  # (source, preset flags, discriminators, logged losses, labeled images)
    ("gta5", ["--preset", "ga-csa"], {"D_g1", "D_g2", "D_s"},
     {"loss_seg_s", "loss_seg_tl", "loss_adv1", "loss_adv2", "loss_sadv", "loss_d1", "loss_d2", "loss_ds"}, 2),
    ("gta5", ["--preset", "ga-fcsa"], {"D_g1", "D_g2", "D_s"},
     {"loss_seg_s", "loss_seg_tl", "loss_adv1", "loss_adv2", "loss_sadv", "loss_d1", "loss_d2", "loss_ds"}, 2),
    ("gta5", ["--preset", "ga"], {"D_g1", "D_g2"},
     {"loss_seg_s", "loss_seg_tl", "loss_adv1", "loss_adv2", "loss_d1", "loss_d2"}, 2),
    ("gta5", ["--preset", "oracle"], set(), {"loss_seg_tl"}, 2),
    ("gta5", ["--preset", "adaptsegnet", *NO_LABELS], {"D_g1", "D_g2"},
     {"loss_seg_s", "loss_adv1", "loss_adv2", "loss_d1", "loss_d2"}, 0),
    ("synthia", ["--preset", "ga-csa"], {"D_g1", "D_g2", "D_s"},
     {"loss_seg_s", "loss_seg_tl", "loss_adv1", "loss_adv2", "loss_sadv", "loss_d1", "loss_d2", "loss_ds"}, 2),
    ("synthia", ["--preset", "adaptsegnet", *NO_LABELS], {"D_g1", "D_g2"},
     {"loss_seg_s", "loss_adv1", "loss_adv2", "loss_d1", "loss_d2"}, 0),
]


@pytest.mark.parametrize("source,flags,discs,loss_names,n", PRESET_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in PRESET_CASES])
def test_two_iterations_of_every_column(root, tmp_path, source, flags, discs, loss_names, n):
    out = tmp_path / "run"
    metrics, ckpt = run(root, out, "--source", source, *flags)
    assert ckpt["iteration"] == 2 and set(ckpt) >= {"model", "optimizer", "iteration", "rng", "args", "scheduler",
                                                    "discriminators", "optimizers_d", "schedulers_d", "best"}
    assert list(ckpt["model"]) == list(common.DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1)).state_dict())
    assert set(ckpt["discriminators"]) == set(ckpt["optimizers_d"]) == discs
    assert set(_log(out)[-1]) - {"iteration", "lr", "it_per_s", "eta_s"} == loss_names
    assert len((out / "split.txt").read_text().split()) == n
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["iteration"] == 2 and ("mIoU13" in saved) == (source == "synthia")
    assert ckpt["model"]["layer6.conv2d_list.0.weight"].shape[:2] == (19, 2048)      # main head on layer4
    assert ckpt["model"]["layer5.conv2d_list.0.weight"].shape[:2] == (19, 1024)      # aux head on layer3


def test_defaults_are_the_papers(monkeypatch):
    """Literal values from ASS §4.2 / Tables 1-2 and AdaptSegNet train_gta2cityscapes_multi.py."""
    a = asss.parse_args([])
    assert (a.iters, a.poly_iters, a.batch_size, a.lr, a.lr_d) == (150000, 250000, 1, 2.5e-4, 1e-4)
    assert (a.lambda_seg, a.lambda_adv, a.lambda_gd, a.lambda_sd) == (0.1, [0.0002, 0.001], 0.5, 0.5)
    assert (a.preset, a.sa, a.lambda_sadv, a.ga_direction, a.n_labeled) == ("ga-csa", "csa", 0.01, "s2t", 100)
    assert tuple(a.source_size) == (1280, 720) and tuple(a.target_size) == (1024, 512)
    assert tuple(a.crop_size) == (0, 0) and a.eval_res == "full" and a.init == "adaptsegnet"
    assert (a.eval_every, a.save_every, a.unlabeled, a.nesterov, a.optimizer) == (5000, 5000, "all", False, "sgd")
    assert tuple(asss.parse_args(["--source", "synthia"]).source_size) == (1280, 760)
    fcsa = [asss.parse_args(["--preset", "ga-fcsa", "--n-labeled", str(n)]).lambda_sadv for n in (100, 500, 1000)]
    assert fcsa == [1.0, 0.04, 1.0]                                                     # Table 2(a) best per N
    base = asss.parse_args(["--preset", "adaptsegnet"])
    assert (base.n_labeled, base.ga_direction, base.sa, base.use_source, base.use_ga) == (0, "t2s", "none", True, True)
    oracle = asss.parse_args(["--preset", "oracle"])
    assert (oracle.use_source, oracle.use_ga, oracle.sa) == (False, False, "none")
    assert asss.ADAPTSEGNET_INIT_URL.endswith("/DeepLab_resnet_pretrained_init-f81d91e8.pth")
    assert asss.ADAPTSEGNET_INIT_SHA256_PREFIX == "f81d91e8" and (asss.SOURCE, asss.TARGET) == (0, 1)
    assert (a.aspp_full, a.clean_param_groups, a.lambda_adv) == (False, False, [0.0002, 0.001])   # quirks kept
    csa = [asss.parse_args(["--preset", "ga-csa", "--n-labeled", str(n)]).lambda_sadv for n in (50, 500, 2975)]
    assert csa == [0.01, 0.01, 0.01]                                                     # Table 2(b), every N
    assert (base.lambda_sadv, oracle.lambda_sadv, asss.parse_args(["--preset", "ga"]).lambda_sadv) == (0, 0, 0)
    synthia = asss.parse_args(["--source", "synthia", "--preset", "adaptsegnet"])
    assert tuple(synthia.target_size) == (1024, 512) and synthia.ga_direction == "t2s"


def test_docstring_names_the_papers_authors():
    """ASS is Wang, Wei, Feris, Xiong, Hwu, Huang, Shi (CVPR-W 2020, arXiv 2004.00794)."""
    head = " ".join(asss.__doc__.split("\n\n")[0].split())
    assert "(Wang, Wei, Feris, Xiong, Hwu, Huang, Shi, CVPR-W 2020, arXiv 2004.00794)" in head


def test_fcsa_lambda_follows_the_split_file(tmp_path):
    """Table 2(a)'s N = 500 weight (0.04) also when N comes from --split-file, which wins over --n-labeled."""
    split = tmp_path / "split.txt"
    split.write_text("".join(f"city_{i:06d}\n" for i in range(500)) + "\n")
    assert asss.parse_args(["--preset", "ga-fcsa", "--split-file", str(split)]).lambda_sadv == 0.04
    assert asss.parse_args(["--preset", "ga-csa", "--split-file", str(split)]).lambda_sadv == 0.01
    split.write_text("".join(f"city_{i:06d}\n" for i in range(100)))
    assert asss.parse_args(["--preset", "ga-fcsa", "--split-file", str(split)]).lambda_sadv == 1.0
    with pytest.raises(common.DataError, match="--n-labeled 500 with --split-file .* of 100 stems"):
        asss.parse_args(["--preset", "ga-fcsa", "--n-labeled", "500", "--split-file", str(split)])


def test_optimisers_and_poly_schedule(root, tmp_path):
    """G: SGD 0.9 / 5e-4 with the head at 10x; every D: Adam (0.9, 0.99); poly 0.9 over --poly-iters."""
    _, ckpt = run(root, tmp_path / "run", "--iters", "3", "--poly-iters", "10")
    lrs = [r["lr"] for r in _log(tmp_path / "run")]
    assert lrs == pytest.approx([2.5e-4 * (1 - i / 10) ** 0.9 for i in range(3)], rel=1e-12)
    g = ckpt["optimizer"]["param_groups"]
    assert g[1]["lr"] == pytest.approx(10 * g[0]["lr"]) and g[0]["lr"] == pytest.approx(2.5e-4 * 0.7 ** 0.9)
    assert (g[0]["momentum"], g[0]["weight_decay"]) == (0.9, 5e-4)
    for name in ("D_g1", "D_g2", "D_s"):
        (d,) = ckpt["optimizers_d"][name]["param_groups"]
        assert d["lr"] == pytest.approx(1e-4 * 0.7 ** 0.9) and d["betas"] == (0.9, 0.99) and d["weight_decay"] == 0
    model = common.DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1))
    distinct = [p for m in model.backbone_modules() for p in m.parameters() if p.requires_grad]
    assert len(g[0]["params"]) > len(distinct)          # AdaptSegNet's duplicated 1x group
    assert len(g[1]["params"]) == 16                    # layer5 + layer6: 4 convs x (weight, bias) each


def test_resume_is_exact_for_generator_and_discriminators(root, tmp_path):
    _, full = run(root, tmp_path / "a", "--iters", "3")
    run(root, tmp_path / "b", "--iters", "3", "--save-every", "2", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "c", "--iters", "3", "--resume", tmp_path / "b" / "checkpoint_2.pth")
    assert weights_digest(full["model"]) == weights_digest(resumed["model"])
    for name in ("D_g1", "D_g2", "D_s"):
        assert weights_digest(full["discriminators"][name]) == weights_digest(resumed["discriminators"][name])
        assert all(torch.equal(full["optimizers_d"][name]["state"][k]["exp_avg_sq"],
                               resumed["optimizers_d"][name]["state"][k]["exp_avg_sq"])
                   for k in full["optimizers_d"][name]["state"])


def test_resume_needs_the_discriminator_state(root, tmp_path):
    run(root, tmp_path / "a", "--iters", "1")
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    for key in ("discriminators", "optimizers_d", "schedulers_d"):
        del ckpt[key]
    training.save_checkpoint(tmp_path / "stripped.pth", ckpt)
    with pytest.raises(common.DataError, match="stripped.pth: discriminator state .* needs D_g1, D_g2, D_s"):
        run(root, tmp_path / "b", "--iters", "1", "--resume", tmp_path / "stripped.pth")
    assert not (tmp_path / "b").exists()
    with pytest.raises(common.DataError, match=r"--preset ga-csa \(here ga\)"):   # another preset's checkpoint
        run(root, tmp_path / "c", "--preset", "ga", "--resume", tmp_path / "a" / "checkpoint.pth")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--preset", "oracle", "--n-labeled", "0"], "--preset oracle with --n-labeled 0"),
    (["--preset", "ga-csa", "--n-labeled", "0"], "--preset ga-csa with --n-labeled 0"),
    (["--preset", "adaptsegnet"], "uses no labeled target image"),          # TINY sets --n-labeled 2
    (["--preset", "oracle", "--ga-direction", "s2t"], "has no GA module"),
    (["--preset", "ga", "--lambda-sadv", "0.1"], "no semantic-level module"),
    (["--poly-iters", "1"], "--poly-iters 1: expected >= --iters 2"),
    (["--n-labeled", "99"], "--n-labeled 99"),
    (["--unlabeled", "complement", "--n-labeled", "6"], "leaves no unlabeled image"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov: G's optimiser is --optimizer adam"),
])
def test_bad_arguments(root, tmp_path, flags, needle):
    with pytest.raises(common.DataError, match=needle):
        run(root, tmp_path / "x", *flags)
    assert not (tmp_path / "x").exists()


def test_eval_only_evaluates_the_main_head(root, tmp_path):
    metrics, ckpt = run(root, tmp_path / "run")
    for k in [k for k in ckpt["model"] if k.startswith("layer5.")]:       # scramble the aux head
        ckpt["model"][k] = torch.randn_like(ckpt["model"][k])
    training.save_checkpoint(tmp_path / "aux_scrambled.pth", ckpt)
    again = asss.main([*TINY, "--data-root", str(root),
                       "--out-dir", str(tmp_path / "ev"), "--eval-only", "--checkpoint",
                       str(tmp_path / "aux_scrambled.pth")])
    assert again["mIoU"] == pytest.approx(metrics["mIoU"]) and again["iteration"] == 2


def test_best_of_snapshots_is_labelled_and_separate(root, tmp_path):
    metrics, ckpt = run(root, tmp_path / "run", "--eval-every", "1")
    best = json.loads((tmp_path / "run" / "best_snapshot.json").read_text())
    assert "selected on the evaluation set" in best["selection"] and best["iteration"] in (1, 2)
    assert best["mIoU"] >= metrics["mIoU"] and ckpt["best"]["iteration"] == best["iteration"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iteration"] == 2    # final = primary


def test_demo_runs_ga_csa_oracle_and_source_only(tmp_path):
    out = tmp_path / "run"
    asss.main(["--demo", "--iters", "2", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)])
    summary = json.loads((out / "demo.json").read_text())
    assert summary["method"]["name"] == "GA+CSA" and summary["iterations"] == 2
    assert [b["name"] for b in summary["baselines"]] == ["oracle (5 labeled)", "source-only"]
    assert json.loads((tmp_path / "run_oracle" / "config.json").read_text())["use_source"] is False
    assert json.loads((tmp_path / "run_source_only" / "config.json").read_text())["n_labeled"] == 0


# -------------------------------------------------------------- loop order: which tensor, which label, which parameters

def _setup(direction="s2t", sa="csa", seed=0):
    torch.manual_seed(seed)
    model = common.DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1)).train()
    args = types.SimpleNamespace(use_ga=True, ga_direction=direction, sa=sa, lambda_seg=0.1, width=64,
                                 lambda_adv=[0.0002, 0.001], lambda_sadv=0.01, lambda_gd=0.5, lambda_sd=0.5)
    discs = asss.build_discriminators(args)
    g = torch.Generator().manual_seed(seed + 1)
    x_s, x_l, x_u = (torch.randn(1, 3, 32, 64, generator=g) for _ in range(3))
    y_s = torch.randint(0, 5, (1, 32, 64), generator=g)
    y_s[:, :4] = 255
    y_l = torch.randint(3, 8, (1, 32, 64), generator=g)
    amp = training.Amp(torch.device("cpu"), False)
    return model, discs, args, amp, (x_s, y_s), (x_l, y_l), x_u


@pytest.mark.parametrize("direction", ["s2t", "t2s"])
def test_each_backward_touches_only_its_own_parameters(direction):
    model, discs, args, amp, src, lab, x_u = _setup(direction)
    _, saved = asss.generator_pass(model, discs, args, amp, src, lab, x_u)
    assert all(p.grad is None for p in discs.parameters())                # G's adversarial step leaves D alone
    assert model.layer6.conv2d_list[0].weight.grad is not None and model.conv1.weight.grad is not None
    g_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    asss.discriminator_pass(discs, args, amp, saved)
    assert all(p.grad is not None for p in discs.parameters())
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(g_grads, model.parameters()))


def _bce(logits, label):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(label)))


@pytest.mark.parametrize("direction", ["s2t", "t2s"])
def test_ga_losses_use_the_authors_tensors_and_domain_labels(direction):
    """s2t: source maps labelled target (ASS Eq. 2); t2s: target maps labelled source (AdaptSegNet); D: source 0,
    unlabeled target 1, each half 0.5; D_g sees the softmax of logits upsampled to the input size."""
    model, discs, args, amp, (x_s, y_s), lab, x_u = _setup(direction)
    losses, saved = asss.generator_pass(model, discs, args, amp, (x_s, y_s), lab, x_u)
    with torch.no_grad():
        up = lambda p: F.interpolate(p, size=(32, 64), mode="bilinear", align_corners=True).softmax(1)  # noqa: E731
        s1, s2 = model(x_s)
        u1, u2 = model(x_u)
        D1, D2 = discs["D_g1"], discs["D_g2"]
        if direction == "s2t":
            expect = _bce(D1(up(s1)), 1), _bce(D2(up(s2)), 1)
        else:
            expect = _bce(D1(up(u1)), 0), _bce(D2(up(u2)), 0)
        assert losses["loss_adv1"].item() == pytest.approx(expect[0].item(), rel=1e-5)
        assert losses["loss_adv2"].item() == pytest.approx(expect[1].item(), rel=1e-5)
    d = asss.discriminator_pass(discs, args, amp, saved)
    with torch.no_grad():
        for name, D, s, u in (("loss_d1", D1, s1, u1), ("loss_d2", D2, s2, u2)):
            assert d[name].item() == pytest.approx((0.5 * _bce(D(up(s)), 0) + 0.5 * _bce(D(up(u)), 1)).item(), rel=1e-5)
    assert not saved["P_tu"][0].requires_grad and not saved["P_s"][0].requires_grad


@pytest.mark.parametrize("sa", ["csa", "fcsa"])
def test_sa_losses_use_source_and_labeled_target_features(sa):
    """L_sadv on the source layer4 features toward k + c; D_s on detached source (k) and labeled-target (k + c)
    features with the labels nearest-resized to F's grid; the unlabeled image never reaches D_s."""
    model, discs, args, amp, (x_s, y_s), (x_l, y_l), x_u = _setup("s2t", sa)
    losses, saved = asss.generator_pass(model, discs, args, amp, (x_s, y_s), (x_l, y_l), x_u)
    with torch.no_grad():
        f_s, f_l = asss.segment(model, x_s)[2], asss.segment(model, x_l)[2]
        ys, yl = (F.interpolate(y[:, None].float(), size=f_s.shape[2:], mode="nearest")[:, 0].long()
                  for y in (y_s, y_l))
        assert torch.equal(saved["F_s"][1], ys) and torch.equal(saved["F_tl"][1], yl)
        D = discs["D_s"]
        assert losses["loss_sadv"].item() == pytest.approx(asss.sa_loss(D, sa, f_s, ys, 1).item(), rel=1e-5)
    d = asss.discriminator_pass(discs, args, amp, saved)
    with torch.no_grad():
        expect = 0.5 * asss.sa_loss(D, sa, f_s, ys, 0) + 0.5 * asss.sa_loss(D, sa, f_l, yl, 1)
        assert d["loss_ds"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert f_s.shape[1] == 2048 and not saved["F_s"][0].requires_grad


def test_target_forward_without_graph_still_updates_bn_statistics():
    model, discs, args, amp, src, lab, x_u = _setup("s2t", "none")
    before = model.bn1.running_mean.clone()
    _, saved = asss.generator_pass(model, discs, args, amp, None, None, x_u)
    assert not torch.equal(before, model.bn1.running_mean) and saved["P_tu"][1].grad_fn is None


def test_segment_is_deeplab_multi_plus_layer4_features():
    model = common.DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 128)
    p1, p2, feat = asss.segment(model, x)
    a1, a2 = model(x)
    assert torch.equal(p1, a1) and torch.equal(p2, a2) and feat.shape == (1, 2048, 9, 17) == (1, 2048, *p2.shape[2:])


# ------------------------------------------------------------------ the equations against hand computations

def test_discriminator_output_shapes():
    """D_g: 1/32 of its input (22x40 for GTA5 720x1280, 16x32 for Cityscapes, 23x40 for SYNTHIA 760x1280);
    CSA D_s: 2c = 38 channels on F's grid; FCSA D_s: 38 logits per class vector."""
    D = common.FCDiscriminator(19, ndf=4)                  # the width does not change the output grid
    with torch.no_grad():
        for (h, w), out in (((720, 1280), (22, 40)), ((512, 1024), (16, 32)), ((760, 1280), (23, 40))):
            assert D(torch.zeros(1, 19, h, w)).shape == (1, 1, *out)
        assert asss.semantic_discriminator("csa")(torch.zeros(1, 2048, 7, 9)).shape == (1, 38, 7, 9)
        assert asss.semantic_discriminator("fcsa")(torch.zeros(1, 19, 2048)).shape == (1, 19, 38)
    csa = asss.semantic_discriminator("csa")
    assert [m.kernel_size for m in csa if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (1, 1)]
    convs = [(m.in_channels, m.out_channels) for m in csa if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(2048, 1024), (1024, 38)]
    assert csa[1].negative_slope == 0.2 and asss.semantic_discriminator("fcsa")[1].negative_slope == 0.2


def test_class_vectors_equal_the_naive_per_class_average():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 5, 4, 6, generator=g)
    y = torch.randint(0, 4, (2, 4, 6), generator=g)
    y[0, 0] = 255
    y[1][y[1] == 2] = 3                                    # class 2 absent from image 1
    V, present = asss.class_vectors(feat, y, c=4)
    for b in range(2):
        for k in range(4):
            pixels = [feat[b, :, i, j] for i in range(4) for j in range(6) if y[b, i, j] == k]
            assert present[b, k].item() == bool(pixels)
            naive = torch.stack(pixels).mean(0) if pixels else torch.zeros(5)
            assert torch.allclose(V[b, k], naive, atol=1e-6)


def test_sa_losses_by_hand():
    c = 2
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])           # channels: src k=0, src k=1, tgt k=0, tgt k=1
    logp = logits.log_softmax(0)
    identity = torch.nn.Identity()
    # CSA: a 1x2 map, pixel 0 of class 1, pixel 1 ignored: L_sadv = -log p[1 + c], L_sd(z=0) = -log p[1]
    feat = logits.view(1, 4, 1, 1).expand(1, 4, 1, 2)
    y = torch.tensor([[[1, 255]]])
    assert asss.sa_loss(identity, "csa", feat, y, 1, c).item() == pytest.approx(-logp[3].item())
    assert asss.sa_loss(identity, "csa", feat, y, 0, c).item() == pytest.approx(-logp[1].item())
    # FCSA with D_s = identity on 4-dim vectors: V^0 = mean of two pixels, class 1 absent -> averaged over k = 0 only
    feat = torch.stack([logits, logits + 2.0], 1).view(1, 4, 1, 2)
    y = torch.tensor([[[0, 0]]])
    v = (logits + 1.0).log_softmax(0)
    assert asss.sa_loss(identity, "fcsa", feat, y, 1, c).item() == pytest.approx(-v[2].item(), rel=1e-6)
    assert asss.sa_loss(identity, "fcsa", feat, y, 0, c).item() == pytest.approx(-v[0].item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["csa", "fcsa"])
def test_sa_adversarial_moves_source_features_toward_the_target_half(kind):
    """Eq. 5/7: descending L_sadv raises D_s's probability of channel k + c (target, same class), also relative
    to channel k (source, same class)."""
    torch.manual_seed(0)
    d_s = asss.semantic_discriminator(kind)
    feat = torch.randn(1, 2048, 3, 4).relu().requires_grad_(True)
    y = torch.tensor([[[0, 0, 5, 5], [5, 0, 7, 255], [7, 7, 0, 5]]])

    def probs(f):
        with torch.no_grad():
            if kind == "csa":
                p = d_s(f).softmax(1)[0]
                return torch.stack([p[:, y[0] == k].mean(1) for k in (0, 5, 7)])
            V, _ = asss.class_vectors(f, y)
            return d_s(V).softmax(-1)[0, [0, 5, 7]]
    before = probs(feat)
    asss.sa_loss(d_s, kind, feat, y, asss.TARGET).backward()
    after = probs(feat - 1.0 * feat.grad)
    for row, k in enumerate((0, 5, 7)):                   # up for "class k, target"; relative to "class k, source"
        assert after[row, k + 19] > before[row, k + 19]
        assert after[row, k + 19] / after[row, k] > before[row, k + 19] / before[row, k]


def test_nesterov_legacy_sgd_by_hand():
    """PyTorch-1.5 rule per listing with Nesterov: d = g + wd p, buf = m buf + d, p -= lr (d + m buf)."""
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = common.LegacySGD([{"params": [p, p]}], lr=0.1, nesterov=True)
    p.grad = torch.tensor([2.0])
    opt.step()
    x, buf = 1.0, None
    for _ in range(2):
        d = 2.0 + 5e-4 * x
        buf = d if buf is None else 0.9 * buf + d
        x -= 0.1 * (d + 0.9 * buf)
    assert p.item() == pytest.approx(x, rel=1e-6)


# ------------------------------------------------------------------ each flag changes training

FLAG_CASES = [  # (flags, baseline flags): the flag must change the trained weights after 2 iterations
    (["--preset", "ga-fcsa"], []),
    (["--preset", "ga"], []),
    (["--preset", "oracle"], []),
    (["--preset", "adaptsegnet", *NO_LABELS], ["--preset", "ga"]),
    (["--ga-direction", "t2s"], []),
    (["--lambda-adv", "0.1", "0.1"], []),
    (["--lambda-seg", "0.5"], []),
    (["--lambda-sadv", "1"], []),
    (["--preset", "ga-fcsa", "--lambda-sadv", "0.04"], ["--preset", "ga-fcsa"]),
    (["--lambda-gd", "1"], []),
    (["--lambda-sd", "1"], []),
    (["--lr-d", "1e-3"], []),
    (["--poly-iters", "4"], []),
    (["--nesterov"], []),
    (["--clean-param-groups"], []),
    (["--sgd-rule", "torch1.5"], []),                  # out-of-place decay instead of AdaptSegNet's in-place
    (["--aspp-full"], []),
    (["--unlabeled", "complement"], []),
    (["--n-labeled", "3"], []),
    (["--split-seed", "4"], []),
    (["--amp"], []),
]


@pytest.fixture(scope="module")
def weights(root, tmp_path_factory):
    return weights_after(run, root, tmp_path_factory, iters=2)   # step 2 already sees step 1's discriminators


@pytest.mark.parametrize("flags,base", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_flag_changes_training(weights, flags, base):
    assert weights(flags) != weights(base)


def test_same_flags_same_weights(weights, root, tmp_path):
    assert weights_digest(run(root, tmp_path / "again")[1]["model"]) == weights([])


def test_seg_loss_weights_the_aux_head_by_lambda_seg():
    """Eq. 1 as AdaptSegNet: CE(main = layer6 output) + 0.1 CE(aux = layer5 output), logits upsampled to the
    label size with align_corners=True, ignored pixels left out of each mean."""
    g = torch.Generator().manual_seed(0)
    pred1, pred2 = torch.randn(1, 19, 5, 9, generator=g), torch.randn(1, 19, 5, 9, generator=g) * 3
    y = torch.randint(0, 19, (1, 16, 32), generator=g)
    y[0, :3] = 255
    up = lambda p: F.interpolate(p, size=(16, 32), mode="bilinear", align_corners=True)  # noqa: E731
    expect = F.cross_entropy(up(pred2), y, ignore_index=255) + 0.1 * F.cross_entropy(up(pred1), y, ignore_index=255)
    assert common.seg_loss(pred1, pred2, y, 0.1).item() == pytest.approx(expect.item(), rel=1e-6)


@pytest.mark.parametrize("direction", ["s2t", "t2s"])
def test_ga_gradient_weights_aux_and_main_levels(direction):
    """Eq. 9 with AdaptSegNet's multi-level GA: G's gradient is that of 0.0002 L_adv(aux) + 0.001 L_adv(main)
    (lambda_adv AUX MAIN). The source labels are all ignored, so the segmentation loss adds nothing."""
    model, discs, args, amp, (x_s, y_s), _, x_u = _setup(direction, "none")
    y_s = torch.full_like(y_s, 255)
    x = x_s if direction == "s2t" else x_u
    domain = asss.TARGET if direction == "s2t" else asss.SOURCE
    losses, _ = asss.generator_pass(model, discs, args, amp, (x_s, y_s), None, x_u if direction == "t2s" else None)
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    p1, p2, _ = asss.segment(model, x)
    size = x.shape[2:]
    adv1 = asss.gan_loss(discs["D_g1"](asss.d_input(p1, size)), domain)
    adv2 = asss.gan_loss(discs["D_g2"](asss.d_input(p2, size)), domain)
    (0.0002 * adv1 + 0.001 * adv2).backward()
    expect = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expect) and losses["loss_adv1"].item() == pytest.approx(adv1.item(), rel=1e-5)
    for a, b in zip(got, expect):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-12)
    aux = model.layer5.conv2d_list[0].weight.grad                     # the aux head only feels L_adv(aux)
    assert aux.abs().max() > 0


@pytest.mark.parametrize("sa", ["csa", "fcsa"])
def test_generator_gradient_is_eq9_with_each_weight_from_its_flag(sa):
    """Eq. 9 (s2t): G's gradient is that of seg(S) + seg(T_L) + l_adv1 L_adv(aux, S) + l_adv2 L_adv(main, S)
    + l_sadv L_sadv(F_s), seg = CE(main) + l_seg CE(aux); weights set apart so that a swap or a lost term shows."""
    model, discs, args, amp, (x_s, y_s), (x_l, y_l), x_u = _setup("s2t", sa)
    args.lambda_seg, args.lambda_adv, args.lambda_sadv = 0.3, [0.02, 0.05], 0.7
    asss.generator_pass(model, discs, args, amp, (x_s, y_s), (x_l, y_l), x_u)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ce = lambda p, y: F.cross_entropy(  # noqa: E731
        F.interpolate(p, size=y.shape[1:], mode="bilinear", align_corners=True), y, ignore_index=255)
    soft = lambda p: F.interpolate(p, size=(32, 64), mode="bilinear", align_corners=True).softmax(1)  # noqa: E731
    p1, p2, f_s = asss.segment(model, x_s)
    q1, q2, _ = asss.segment(model, x_l)
    y_f = F.interpolate(y_s[:, None].float(), size=f_s.shape[2:], mode="nearest")[:, 0].long()
    loss = (ce(p2, y_s) + 0.3 * ce(p1, y_s) + ce(q2, y_l) + 0.3 * ce(q1, y_l)
            + 0.02 * _bce(discs["D_g1"](soft(p1)), 1) + 0.05 * _bce(discs["D_g2"](soft(p2)), 1)
            + 0.7 * asss.sa_loss(discs["D_s"], sa, f_s, y_f, 1))
    loss.backward()
    expect = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expect.keys()
    for k in got:
        assert torch.allclose(got[k], expect[k], rtol=1e-4, atol=1e-10), k


@pytest.mark.parametrize("sa", ["csa", "fcsa"])
def test_discriminator_terms_take_their_own_weights(sa):
    """Eq. 10: --lambda-gd weights both D_g terms of each level, --lambda-sd both D_s terms, and nothing else."""
    model, discs, args, amp, src, lab, x_u = _setup("s2t", sa)
    args.lambda_gd, args.lambda_sd = 0.3, 0.7
    _, saved = asss.generator_pass(model, discs, args, amp, src, lab, x_u)
    d = asss.discriminator_pass(discs, args, amp, saved)
    with torch.no_grad():
        for level, name in ((0, "D_g1"), (1, "D_g2")):
            D = discs[name]
            expect = 0.3 * _bce(D(saved["P_s"][level]), 0) + 0.3 * _bce(D(saved["P_tu"][level]), 1)
            assert d[f"loss_d{level + 1}"].item() == pytest.approx(expect.item(), rel=1e-5)
        D = discs["D_s"]
        expect = 0.7 * asss.sa_loss(D, sa, *saved["F_s"], 0) + 0.7 * asss.sa_loss(D, sa, *saved["F_tl"], 1)
        assert d["loss_ds"].item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("clean", [False, True])
def test_backbone_group_lists_each_tensor_as_adaptsegnet(clean):
    """AdaptSegNet deeplab_multi.py get_1x_lr_params_NOscale walks every sub-module's recursive parameters: the
    stem conv once, each bottleneck conv 3 times, each first-block downsample conv 4 times (BN left out); the
    heads' group lists each tensor once. --clean-param-groups lists every tensor once."""
    model = common.DeepLabV2(19, multi_level=True, layers=(2, 1, 1, 1))
    args = types.SimpleNamespace(clean_param_groups=clean, optimizer="sgd", nesterov=False, lr=2.5e-4, lr_d=1e-4,
                                 poly_iters=10, sgd_rule=asss.parse_args([]).sgd_rule)
    opt_g, *_ = asss.build_optimisers(model, torch.nn.ModuleDict(), args)
    assert opt_g.rule == "torch0.4"                    # AdaptSegNet's PyTorch 0.4: decay into p.grad
    backbone, head = opt_g.param_groups
    times = [sum(q is p for q in backbone["params"]) for p in (
        model.conv1.weight, model.layer1[0].conv1.weight, model.layer1[1].conv3.weight,
        model.layer1[0].downsample[0].weight, model.layer4[0].conv2.weight, model.layer4[0].downsample[0].weight)]
    assert times == ([1] * 6 if clean else [1, 3, 3, 4, 3, 4])
    assert len(backbone["params"]) == (1 + 5 * 3 + 4 if clean else 1 + 5 * 3 * 3 + 4 * 4)   # 5 blocks, 4 downsamples
    assert len(head["params"]) == 16 and len({id(p) for p in head["params"]}) == 16
    assert not any(p is model.bn1.weight or p is model.layer1[0].bn1.weight for p in backbone["params"])


def test_adam_refuses_clean_param_groups_and_its_lr_help_says_one_rate(capsys):
    """Adam (the demo's optimiser) lists every tensor once at one rate: --clean-param-groups would do nothing
    there and is refused; the --lr help says the heads get 10x with SGD only."""
    with pytest.raises(common.DataError, match="--clean-param-groups with --optimizer adam"):
        asss.parse_args(["--optimizer", "adam", "--clean-param-groups"])
    assert asss.parse_args(["--clean-param-groups"]).clean_param_groups
    with pytest.raises(SystemExit):
        asss.parse_args(["--help"])
    lr_help = " ".join(capsys.readouterr().out.split("\n  --lr LR", 1)[1].split("\n  --seed")[0].split())
    assert "one rate for every parameter with --optimizer adam" in lr_help


def test_presets_without_ga_record_no_ga_direction():
    """config.json holds the resolved arguments: the oracle and source-only columns have no GA, so no direction."""
    assert asss.parse_args(["--preset", "oracle"]).ga_direction is None
    assert asss.parse_args(["--preset", "source-only"]).ga_direction is None
    assert asss.parse_args(["--preset", "ga"]).ga_direction == "s2t"
    assert asss.parse_args(["--preset", "adaptsegnet"]).ga_direction == "t2s"
