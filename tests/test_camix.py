"""camix.py: short runs for both sources across the phase boundary, exact resume, the paper's equations
against hand computations, the released code's constants, and one test per ablation flag."""
import json
import math
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

import camix
import common
import training
from conftest import script_runner, weights_after, weights_digest

TINY = ["--iters", "2", "--warmup-iters", "1", "--layers", "1", "1", "1", "1", "--init", "none",
        "--source-size", "64", "32", "--target-size", "64", "32", "--val-size", "64", "32", "--crop-size", "32", "32",
        "--workers", "0", "--log-every", "1", "--device", "cpu", "--eval-every", "0"]


_run = script_runner(camix, TINY)


def run(root, out, *flags):
    """A tiny run; the spatial prior is built from the tiny source unless --prior is given."""
    return _run(root, out, *([] if "--prior" in map(str, flags) else ["--build-prior"]), *flags)


# ------------------------------------------------------------------ runs

@pytest.mark.parametrize("source", ["gta5", "synthia"])
def test_two_iterations_enter_phase_b(root, tmp_path, source):
    metrics, ckpt = run(root, tmp_path / "run", "--source", source)
    assert set(ckpt) >= {"model", "ema_model", "optimizer", "iteration", "rng", "args", "scheduler"}
    assert ckpt["iteration"] == 2
    assert list(ckpt["model"]) == list(common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict())
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model"] == "student" and saved["iteration"] == 2
    assert saved["num_classes"] == (16 if source == "synthia" else 19) and ("mIoU13" in saved) == (source == "synthia")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "prior_changed" not in log[0] and "prior_changed" in log[1]    # iteration 0 = DACS, 1 = CAMix
    assert {"loss_seg", "loss_con", "q", "target_share", "lr"} <= set(log[0])
    prior = np.load(tmp_path / "run" / "spatial_prior.npy")
    assert prior.shape == (19, 32, 64)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prior"] == str(tmp_path / "run" / "spatial_prior.npy") and config["sigmask_tmax"] == (
        10000 if source == "synthia" else 130000)


def test_resume_across_the_phase_boundary_is_exact(root, tmp_path):
    flags = ["--iters", "3", "--src-impl", "paper", "--tau", "0.01"]     # every random draw is in play
    _, full = run(root, tmp_path / "b", *flags, "--save-every", "1", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "c", *flags, "--resume", tmp_path / "b" / "checkpoint_1.pth")  # phase B next
    for key in ("model", "ema_model"):
        assert weights_digest(full[key]) == weights_digest(resumed[key])


def test_phase_a_is_dacs_py_exactly(root, tmp_path):
    """A run that never leaves the warm-up trains exactly as dacs.py (same draws, same order, same loss)."""
    import dacs
    common_flags = ["--iters", "2", "--seed", "1", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size",
                    "64", "32", "--target-size", "64", "32", "--crop-size", "32", "32", "--workers", "0",
                    "--device", "cpu", "--data-root", str(root), "--tau", "0.01"]
    dacs.main([*common_flags, "--out-dir", str(tmp_path / "dacs")])
    camix.main([*common_flags, "--warmup-iters", "2", "--val-size", "64", "32", "--out-dir", str(tmp_path / "camix")])
    for key in ("model", "ema_model"):
        a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)[key] for d in ("dacs", "camix"))
        assert weights_digest(a) == weights_digest(b)


def test_teacher_is_updated_after_the_step(root, tmp_path):
    """alpha_0 = 0 after step 0: the teacher equals the student of iteration 1 (EMA after the update)."""
    _, ckpt = run(root, tmp_path / "r", "--iters", "1", "--warmup-iters", "0")
    assert all(torch.equal(ckpt["ema_model"][k], ckpt["model"][k]) for k in dict(common.DeepLabV2(
        19, layers=(1, 1, 1, 1)).named_parameters()))


def test_demo_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "run"
    camix.main(["--demo", "--iters", "2", "--val-size", "32", "16", "--data-root", str(tmp_path / "data"),
                "--out-dir", str(out)])
    summary = json.loads((out / "demo.json").read_text())
    assert summary["method"]["name"] == "CAMix" and [b["name"] for b in summary["baselines"]] == [
        "DACS", "iDACS", "source-only"]
    assert json.loads((out / "config.json").read_text())["warmup_iters"] == 1      # 0.44 x 2 iterations
    idacs = json.loads((tmp_path / "run_idacs" / "config.json").read_text())   # the Table 4 baseline: CAMix's
    assert (idacs["mix"], idacs["warmup_iters"], idacs["source_only"]) == ("idacs", 1, False)   # warm-up, then iDACS
    assert (tmp_path / "run_dacs" / "metrics.json").is_file() and "iDACS" in capsys.readouterr().out


# ------------------------------------------------------------------ the released code's values

def test_defaults_are_the_released_configuration():
    a = camix.parse_args(["--build-prior"])   # a camix run needs a prior
    expected = dict(iters=250000, batch_size=2, lr=2.5e-4, seed=1, crop_size=(512, 512), target_size=[2048, 1024],
                    val_size=[1024, 512], source_size=(1280, 720), init="coco", eval_res="half", eval_every=2000,
                    save_every=2000, mix="camix", warmup_iters=110000, consistency="src", src_impl="code",
                    sigmask_passes=8, sigmask_tmax=130000, sigmask_beta=0.75, sigmask_gamma=-5.0,
                    sigmask_noise_std=0.1, tau=0.968, ema_alpha=0.99, consistency_weight=1.0, optimizer="sgd",
                    prior_norm="class", clean_param_groups=False, aspp_full=False, teacher_eval_bn=False)
    assert {k: getattr(a, k) for k in expected} == expected
    s = camix.parse_args(["--source", "synthia", "--build-prior"])
    assert (s.warmup_iters, s.sigmask_tmax, tuple(s.source_size)) == (40000, 10000, (1280, 760))
    assert camix.parse_args(["--mix", "dacs"]).warmup_iters == 0
    assert camix.parse_args(["--build-prior", "--target-scale", "0.5"]).target_size == [1024, 512]


@pytest.mark.parametrize("i,t_max,fraction", [
    (0, 130000, 0.75 + 0.25 * math.exp(-5)), (50000, 130000, 0.788), (100000, 130000, 0.942),
    (110000, 130000, 0.972), (130000, 130000, 1.0), (200000, 130000, 1.0), (5000, 10000, 0.822)])
def test_threshold_is_eq7_with_the_code_constants(i, t_max, fraction):
    assert camix.significance_threshold(i, t_max) == pytest.approx(fraction * math.log(19), abs=1e-3 * math.log(19))
    assert camix.significance_threshold(i, t_max) == pytest.approx(
        (0.75 + 0.25 * (1.0 if i >= t_max else math.exp(-5 * (1 - i / t_max) ** 2))) * 2.944438979, rel=1e-6)


# ------------------------------------------------------------------ spatial prior

def _source(tmp_path, labels):
    """A GTA5-layout dataset whose label maps are `labels` (train ids, written as Cityscapes label ids)."""
    to_id = np.zeros(256, np.uint8)
    to_id[[0, 10, 13]] = [7, 23, 26]
    for sub in ("images", "labels"):
        (tmp_path / "gta5" / sub).mkdir(parents=True, exist_ok=True)
    for k, lab in enumerate(labels, 1):
        Image.fromarray(np.zeros((*lab.shape, 3), np.uint8)).save(tmp_path / "gta5" / "images" / f"{k:05d}.png")
        Image.fromarray(to_id[lab], mode="L").save(tmp_path / "gta5" / "labels" / f"{k:05d}.png")
    return common.SegmentationDataset("gta5", tmp_path / "gta5")


def test_built_prior_counts_smooths_and_normalises(tmp_path):
    top_road = np.full((16, 32), 10)
    top_road[:8] = 0                      # road above, sky below (upside down on purpose)
    other = top_road.copy()
    other[8:, :16] = 13                   # a car in one map only
    q = camix.build_prior(_source(tmp_path, [top_road, other]), (16, 32))
    assert q.shape == (19, 16, 32) and q.dtype == np.float32
    sums = q.reshape(19, -1).sum(1)
    absent = [c for c in range(19) if c not in (0, 10, 13)]
    assert np.allclose(sums[[0, 10, 13]], 1, atol=1e-5) and np.all(sums[absent] == 0)
    assert q[0, :8].sum() > 0.9 and q[10, 8:].sum() > 0.9 and q[13, 8:, :16].sum() > 0.9
    assert q[0, 3, 5] > q[0, 12, 5]       # counts where the class is
    pixel = camix.build_prior(_source(tmp_path, [top_road, other]), (16, 32), norm="pixel")
    assert np.allclose(pixel.sum(0), 1, atol=1e-5)


def test_target_crop_and_prior_share_the_window(root):
    prior = np.arange(19 * 32 * 64, dtype=np.float32).reshape(19, 32, 64)
    data = camix.TargetWithWindow("cityscapes", root / "cityscapes", resize=(64, 32), crop=(16, 24),
                                  norm="imagenet_bgr")
    full = common.normalise(data.load(0)[0], "imagenet_bgr")
    items = [data[(0, seed, -1)] for seed in range(6)]
    windows = torch.stack([item["window"] for item in items])
    crops = camix.prior_crops(torch.from_numpy(prior), windows, (16, 24))
    assert crops.shape == (6, 19, 16, 24)
    for item, crop in zip(items, crops):
        y0, x0 = item["window"].tolist()
        assert torch.equal(crop, torch.from_numpy(prior[:, y0:y0 + 16, x0:x0 + 24]))
        assert torch.equal(item["image"], full[:, y0:y0 + 16, x0:x0 + 24])
    assert len(set(map(tuple, windows.tolist()))) > 1


def test_load_prior_layouts(tmp_path):
    q = np.random.default_rng(0).random((19, 8, 16)).astype(np.float32)
    np.save(tmp_path / "chw.npy", q)
    np.save(tmp_path / "hwc.npy", q.transpose(1, 2, 0))
    assert np.array_equal(camix.load_prior(tmp_path / "chw.npy", (8, 16)), q)
    assert np.array_equal(camix.load_prior(tmp_path / "hwc.npy", (8, 16)), q)
    (tmp_path / "syn").mkdir()
    for k in range(19):
        np.save(tmp_path / "syn" / f"probarray_cls{k}.npy", np.full((4, 8), float(k)))
    stacked = camix.load_prior(tmp_path / "syn", (8, 16))
    assert stacked.shape == (19, 8, 16) and np.allclose(stacked[:, 3, 7], np.arange(19))


# ------------------------------------------------------------------ masks and mixing

def test_meta_class_expansion_adds_present_classes_in_the_codes_directions():
    def expand(present, chosen):
        p, c = torch.zeros(1, 256, dtype=torch.bool), torch.zeros(1, 256, dtype=torch.bool)
        p[0, present] = True
        c[0, chosen] = True
        return set(torch.nonzero(camix.expand_meta_classes(p, c)[0]).flatten().tolist())
    assert expand([0, 5, 6, 7], [6]) == {5, 6, 7}          # light -> pole -> sign
    assert expand([0, 5, 7], [7]) == {5, 7}                # sign -> pole; light absent stays out
    assert expand([0, 6, 7], [6]) == {6}                   # no pole: light and sign are not linked
    assert expand([5, 6, 7], [5]) == {5, 6, 7}             # pole -> light, sign
    assert expand([12, 17, 18], [12]) == {12, 17, 18}      # rider -> motorcycle, bicycle
    assert expand([12, 18], [12]) == {12, 18}
    assert expand([12, 17, 18], [18]) == {18}              # one-way: bicycle does not pull the rider
    assert expand([0, 1, 2, 3, 4, 8, 9], [0, 3, 8]) == {0, 3, 8}   # flat/construction/nature groups inactive


def test_half_of_the_classes_is_ceil():
    labels = torch.tensor([[[0, 1, 2, 3, 4]], [[0, 0, 1, 1, 1]]])
    present, chosen = camix.half_of_classes(labels, torch.Generator().manual_seed(0))
    assert chosen.sum(1).tolist() == [3, 1] and bool((chosen <= present).all())


def test_contextual_mask_uses_the_prior_modulated_map():
    prob = torch.zeros(1, 19, 1, 4)
    prob[0, 0] = torch.tensor([0.6, 0.6, 0.1, 0.1])
    prob[0, 10] = torch.tensor([0.4, 0.4, 0.9, 0.9])
    prior = torch.ones(1, 19, 1, 4)
    prior[0, 0, :, :2] = 0.1                                  # the prior says: no road on the left
    M, modulated = camix.contextual_mask(prob, prior, torch.Generator().manual_seed(0))
    assert modulated.tolist() == [[[10, 10, 10, 10]]] and M.tolist() == [[[1.0] * 4]]
    M_raw, raw = camix.contextual_mask(prob, None, torch.Generator().manual_seed(0))
    assert raw.tolist() == [[[0, 0, 10, 10]]] and M_raw.sum() == 2


def test_mixing_pastes_target_onto_source_with_raw_labels():
    T = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    x_s, x_t = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    y_s, y_raw = torch.tensor([[[1, 255], [2, 3]]]), torch.tensor([[[7, 8], [9, 4]]])
    w_t, u_t = torch.full((1, 2, 2), 0.25), torch.tensor([[[0.0, 0.5], [0.5, 0.5]]])
    x_m, y_m, w_m, u_m = camix.mix_target_onto_source(T, x_s, y_s, x_t, y_raw, w_t, u_t)
    assert torch.equal(x_m[0, 0], T[0]) and y_m.tolist() == [[[7, 255], [2, 4]]] and y_m.dtype == torch.long
    assert w_m.tolist() == [[[0.25, 1.0], [1.0, 0.25]]] and u_m.tolist() == [[[0.0, 1.0], [1.0, 0.5]]]


def test_phase_a_pastes_source_classes_onto_the_target():
    y_s = torch.tensor([[[1, 1, 2, 255]]])
    args = types.SimpleNamespace(no_spatial_prior=False, no_context=False)
    T = camix.target_pixels("dacs", y_s, torch.zeros(1, 1, 4, dtype=torch.long), torch.rand(1, 19, 1, 4), None,
                            torch.Generator().manual_seed(3), args)
    source_pixels = 1 - T[0, 0]
    assert int(sum(source_pixels[y_s[0, 0] == c].unique().numel() == 1 for c in (1, 2, 255))) == 3   # whole classes
    assert len(set(y_s[0, 0][source_pixels.bool()].tolist())) == 2   # ceil(3/2), the ignore value is a candidate


# ------------------------------------------------------------------ significance mask and losses

class Spy(torch.nn.Module):
    """A 'teacher' whose logits are a fixed function of the input; counts calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        logits = torch.zeros(x.shape[0], 19, 2, 2)
        logits[:, 0] = x[:, 0, ::2, ::2] * 20        # confident where the image is bright, uniform elsewhere
        return logits


def test_significance_mask_is_one_batched_pass_of_eq_5_to_7():
    teacher, amp = Spy(), training.Amp(torch.device("cpu"), False)
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, :2] = 1.0                                  # image 0, top half bright
    threshold = camix.significance_threshold(0, 130000)
    u = camix.significance_mask(teacher, x, threshold, 8, lambda c: torch.zeros_like(c), (4, 4), amp)
    assert teacher.calls == [16]                       # N * B images in one forward
    p = torch.softmax(teacher(x), 1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    assert torch.equal(u, common.upsample((entropy < threshold).float(), (4, 4))[:, 0])
    assert u[0, 0, 0] == 1 and u[1].max() == 0 and 0 < u[0, 2, 0] < 1    # soft at the upsampled edge


def test_entropy_without_epsilon_masks_zero_probabilities():
    class Certain(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((x.shape[0], 19, 1, 1), -1e4)
            logits[:, 3] = 1e4
            return logits
    u = camix.significance_mask(Certain(), torch.zeros(1, 3, 1, 1), 2.0, 2, torch.zeros_like, (1, 1),
                                training.Amp(torch.device("cpu"), False))
    assert u.item() == 0.0                             # 0 * log 0 = NaN, NaN < H is False


def test_code_noise_is_the_constant_of_the_swapped_clamp():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(camix.sigmask_noise("code", 0.1, torch.Generator())(x), torch.full_like(x, -0.2))
    noise = camix.sigmask_noise("paper", 0.1, torch.Generator().manual_seed(0))(torch.zeros(64, 3, 8, 8))
    assert noise.abs().max() <= 0.2 and 0.08 < noise.std() < 0.1 and noise.mean().abs() < 0.01


def test_src_code_cancels_u_m_and_paper_does_not():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 19, 4, 4), torch.randint(0, 19, (2, 4, 4))
    y[0, 0, 0] = 255
    w = torch.rand(2, 4, 4)
    u = (torch.rand(2, 4, 4) > 0.5).float()
    ce = torch.nn.functional.cross_entropy(logits, y, ignore_index=255, reduction="none") * w
    plain = ce.mean()                                                   # DACS: ignored pixels in the denominator
    assert camix.consistency_loss(logits, y, w, None, "ce", "code") == pytest.approx(plain.item())
    code = camix.consistency_loss(logits, y, w, u, "src", "code")
    paper = camix.consistency_loss(logits, y, w, u, "src", "paper")
    assert code.item() == pytest.approx(plain.item(), rel=1e-6)        # (s U).sum() / U.sum() = s
    assert paper.item() == pytest.approx(((u * ce).sum() / u.sum()).item()) and abs(paper - code) > 1e-3
    ones = torch.ones_like(u)
    assert camix.consistency_loss(logits, y, w, ones, "src", "paper").item() == pytest.approx(
        ones.numel() / ones.sum().item() * plain.item())                # U = 1: both are the mean
    assert camix.consistency_loss(logits, y, w, ones, "src", "code").item() == pytest.approx(plain.item())
    zero = torch.zeros_like(u)
    assert camix.consistency_loss(logits, y, w, zero, "src", "code").item() == 0.0


def test_mse_row_compares_with_the_unmixed_teacher_softmax():
    logits, prob = torch.randn(1, 19, 2, 2), torch.softmax(torch.randn(1, 19, 2, 2), 1)
    expected = 0.5 * ((torch.softmax(logits, 1) - prob) ** 2).mean()
    assert camix.mse_consistency(logits, prob, torch.tensor(0.5)).item() == pytest.approx(expected.item())


# ------------------------------------------------------------------ each flag changes training

PAPER_SRC = ["--src-impl", "paper", "--sigmask-beta", "0.95"]   # H high enough that U_T is partly 1 (random net)
FLAG_CASES = [  # (flags, baseline flags): the flag must change the trained weights (iteration 1 is phase B)
    (["--mix", "idacs"], []),
    (["--mix", "dacs"], []),
    (["--mix", "none"], []),
    (["--mix", "cutmix"], []),
    (["--mix", "cowmix"], []),
    (["--prior", "META_PRIOR", "--no-context"], ["--prior", "META_PRIOR"]),
    (["--no-spatial-prior"], []),
    (["--prior-norm", "pixel"], []),
    (["--warmup-iters", "0"], []),
    (["--consistency", "mse"], []),
    (["--src-impl", "paper"], []),
    ([*PAPER_SRC, "--sigmask-noise-std", "10", "--sigmask-passes", "2"], [*PAPER_SRC, "--sigmask-noise-std", "10"]),
    (["--src-impl", "paper", "--sigmask-tmax", "1"], ["--src-impl", "paper"]),
    (["--src-impl", "paper", "--sigmask-beta", "0.9"], ["--src-impl", "paper"]),
    ([*PAPER_SRC, "--sigmask-gamma", "-1"], PAPER_SRC),
    ([*PAPER_SRC, "--sigmask-noise-std", "10"], PAPER_SRC),
    (["--source-only"], []),
    (["--tau", "0.01"], []),
    (["--teacher-eval-bn"], []),
    (["--consistency-weight", "0.5"], []),
    (["--no-jitter"], []),
    (["--no-blur"], []),
    (["--aspp-full"], []),
    (["--clean-param-groups"], []),
    (["--sgd-rule", "torch0.4"], []),                  # PyTorch <= 1.4: decay into p.grad, compounding
    (["--optimizer", "adam-paper"], []),
    (["--target-scale", "0.5", "--crop-size", "16", "16"], ["--crop-size", "16", "16"]),
    (["--amp"], []),
]


@pytest.fixture(scope="module")
def weights(root, tmp_path_factory):
    return weights_after(run, root, tmp_path_factory, iters=2)


@pytest.fixture(scope="module")
def meta_prior(tmp_path_factory):
    """A prior that allows only pole, light, sign, rider, motorcycle and bicycle: the meta-classes are present."""
    q = np.zeros((19, 32, 64), np.float32)
    q[[5, 6, 7, 12, 17, 18]] = 1.0
    path = tmp_path_factory.mktemp("prior") / "meta.npy"
    np.save(path, q)
    return str(path)


@pytest.mark.parametrize("flags,base", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_flag_changes_training(weights, meta_prior, flags, base):
    sub = lambda fl: [meta_prior if f == "META_PRIOR" else f for f in fl]  # noqa: E731
    assert weights(sub(flags)) != weights(sub(base))


def test_passes_do_not_matter_at_the_codes_noise_scale(weights):
    """Measured: N(0, 0.1^2) clipped to +-0.2 on the 0-255 scale leaves the N predictions (nearly) identical,
    so 2 or 8 passes give the same U_T and the same weights; with larger noise (above) N matters."""
    assert weights([*PAPER_SRC, "--sigmask-passes", "2"]) == weights(PAPER_SRC)


def test_ema_alpha_changes_the_teacher(root, tmp_path_factory):
    """alpha_i = min(1 - 1/(i+1), alpha): 0.3 instead of 0.99 acts from iteration 1; the student sees it at 2."""
    weights3 = weights_after(run, root, tmp_path_factory, iters=3)
    assert weights3(["--ema-alpha", "0.3", "--tau", "0.01"]) != weights3(["--tau", "0.01"])


def test_same_flags_same_weights(weights, root, tmp_path):
    assert weights_digest(run(root, tmp_path / "again", "--iters", "2")[1]["model"]) == weights([])


def test_src_and_ce_rows_coincide_under_the_code(weights, root, tmp_path):
    """Table 4 'SP+CR' / Table 5 'CE' vs the full model under --src-impl code: bit-identical weights without
    the significance pass; with it (--log-sigmask, the code's arithmetic) equal up to rounding."""
    assert weights(["--consistency", "ce"]) == weights([])
    _, logged = run(root, tmp_path / "log", "--iters", "2", "--log-sigmask")
    _, plain = run(root, tmp_path / "plain", "--iters", "2")
    log = json.loads((tmp_path / "log" / "log.jsonl").read_text().splitlines()[-1])
    assert 0 <= log["sigmask_kept"] < 1                # U_M is not all ones ...
    for k in plain["model"]:                           # ... yet it does not change the update
        assert torch.allclose(logged["model"][k], plain["model"][k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written

def _bad_prior(tmp_path, shape):
    path = tmp_path / f"prior_{'x'.join(map(str, shape))}.npy"
    np.save(path, np.ones(shape, np.float32))
    return path


@pytest.mark.parametrize("make,needle", [
    (lambda p: ["--prior", _bad_prior(p, (18, 32, 64))], "expected (19, 32, 64)"),
    (lambda p: ["--prior", _bad_prior(p, (19, 16, 64))], "expected (19, 32, 64)"),
    (lambda p: ["--prior", p / "missing.npy"], "file not found"),
    (lambda p: ["--iters", "3", "--warmup-iters", "5"], "--warmup-iters 5"),
    (lambda p: ["--mix", "idacs", "--no-context"], "--no-context"),
    (lambda p: ["--mix", "spread"], "invalid choice"),
])
def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, capsys, make, needle):
    with pytest.raises((SystemExit, common.DataError)) as exc:
        camix.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x"), *map(str, make(tmp_path))])
    assert needle in str(exc.value) + capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--sigmask-passes", "4"], "--sigmask-passes 4: no effect, --src-impl code skips"),
    (["--sigmask-tmax", "5"], "--sigmask-tmax 5: no effect, --src-impl code skips"),
    (["--sigmask-beta", "0.5"], "--sigmask-beta 0.5: no effect"),
    (["--sigmask-gamma", "-1"], "--sigmask-gamma -1.0: no effect"),
    (["--sigmask-noise-std", "0.3"], "--sigmask-noise-std 0.3: no effect"),
    (["--sigmask-noise-std", "0.3", "--log-sigmask"], "adds the constant -0.2"),
    (["--sigmask-passes", "4", "--src-impl", "paper", "--consistency", "ce"], "--src-impl paper: no effect"),
    (["--sigmask-tmax", "5", "--consistency", "mse"], "--consistency mse has no significance mask"),
    (["--sigmask-beta", "0.5", "--source-only"], "--source-only trains no teacher"),
    (["--log-sigmask", "--consistency", "ce"], "--log-sigmask: no effect, --consistency ce"),
    (["--log-sigmask", "--src-impl", "paper"], "--log-sigmask: no effect, --src-impl paper runs the pass"),
    (["--log-sigmask", "--source-only"], "--log-sigmask: no effect, --source-only"),
    (["--src-impl", "paper", "--consistency", "mse"], "--src-impl paper: no effect"),
])
def test_significance_flags_without_effect_are_refused(flags, needle):
    """The pass runs only for a teacher's --consistency src with --src-impl paper or --log-sigmask, and only
    --src-impl paper draws noise: any other use of these flags would be silently ignored."""
    with pytest.raises(common.DataError, match=re.escape(needle)):
        camix.parse_args([*TINY, "--build-prior", *flags])


@pytest.mark.parametrize("flags", [
    ["--log-sigmask", "--sigmask-passes", "4", "--sigmask-tmax", "5", "--sigmask-beta", "0.5", "--sigmask-gamma", "-1"],
    ["--src-impl", "paper", "--sigmask-passes", "4", "--sigmask-noise-std", "0.3"],
    ["--mix", "none", "--src-impl", "paper", "--sigmask-tmax", "5"],
    ["--sigmask-passes", "8", "--consistency", "ce"],          # the default value changes nothing either way
])
def test_significance_flags_with_effect_are_accepted(flags):
    args = camix.parse_args([*TINY, "--build-prior", *flags])
    assert args.consistency in ("src", "ce")


def test_camix_without_a_prior_is_refused(root, tmp_path):
    with pytest.raises(common.DataError, match="--prior PATH or --build-prior"):
        camix.parse_args(TINY)


# ------------------------------------------------------------------ the training step's wiring (pinned values)

def test_training_step_feeds_each_stage_the_codes_tensors(root, tmp_path, monkeypatch):
    """One run across the phase boundary with spies on the stages of train_ucspa_*.py's step: which map the
    mask, the labels and the weight come from, the threshold's arguments, what is jittered and blurred, in order."""
    seen, order = [], []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append((name, args, out))
            order.append(name)
            return out
        return wrapped
    for name in ("target_pixels", "mix_target_onto_source", "significance_mask", "consistency_loss"):
        monkeypatch.setattr(camix, name, spy(name, getattr(camix, name)))
    for name in ("color_jitter", "gaussian_blur"):
        monkeypatch.setattr(common, name, spy(name, getattr(common, name)))
    flags = ["--src-impl", "paper", "--tau", "0.12", "--sigmask-tmax", "7", "--sigmask-beta", "0.6",
             "--sigmask-gamma", "-2"]
    run(root, tmp_path / "r", *flags)
    step = ["significance_mask", "target_pixels", "mix_target_onto_source", "color_jitter", "gaussian_blur",
            "consistency_loss"]
    assert order == step * 2
    for i in range(2):
        calls = {name: (args, out) for name, args, out in seen[6 * i:6 * i + 6]}
        (phase, y_s, y_raw, prob_t, prior, _, _), T = calls["target_pixels"]
        (T2, x_s, y_s2, x_t, y_raw2, w_t, u_t), (x_m, y_m, w_m, u_m) = calls["mix_target_onto_source"]
        (_, x_sig, threshold, passes, _, size, _), u_sig = calls["significance_mask"]
        assert phase == ("dacs", "camix")[i] and T2 is T and y_s2 is y_s and y_raw2 is y_raw
        assert torch.equal(y_raw, prob_t.argmax(1))                          # labels: the RAW teacher argmax
        share = (prob_t.max(1).values >= 0.12).float().mean().item()           # w_t: one share for the batch
        assert 0 < share < 1 and torch.equal(w_t, torch.full_like(w_t, share))
        assert x_sig is x_t and u_t is u_sig and passes == 8 and tuple(size) == tuple(y_raw.shape[1:])
        assert threshold == pytest.approx((0.6 + 0.4 * math.exp(-2 * (1 - i / 7) ** 2)) * math.log(19))
        mask_map = y_s if i == 0 else (prior * prob_t).argmax(1)             # DACS: source GT; CAMix: argmax(Q.P)
        if i == 1:
            assert not torch.equal(mask_map, y_raw)                          # Q changes the map, so the check bites
        for b in range(T.shape[0]):
            for c in mask_map[b].unique():
                assert T[b][mask_map[b] == c].unique().numel() == 1          # whole classes of that map
        (x_j, *_), jittered = calls["color_jitter"]
        (x_b, *_), _ = calls["gaussian_blur"]
        assert x_j is x_m and x_b is jittered                                # mix -> jitter -> blur
        (_, y_c, w_c, u_c, kind, impl), _ = calls["consistency_loss"]
        assert y_c is y_m and w_c is w_m and u_c is u_m and (kind, impl) == ("src", "paper")


def test_ema_is_eq3_with_the_capped_alpha(root, tmp_path):
    """theta'_i = a_i theta'_{i-1} + (1 - a_i) theta_i after step i, a_i = min(1 - 1/(i+1), --ema-alpha):
    0.5 at i = 1 (uncapped), 0.6 at i = 2 (capped), parameters only."""
    _, last = run(root, tmp_path / "r", "--iters", "3", "--ema-alpha", "0.6", "--save-every", "1",
                  "--keep-checkpoints")
    ckpts = [torch.load(tmp_path / "r" / f"checkpoint_{k}.pth", weights_only=True) for k in (1, 2, 3)]
    names = dict(common.DeepLabV2(19, layers=(1, 1, 1, 1)).named_parameters())
    for (before, after), alpha in zip(zip(ckpts, ckpts[1:]), (0.5, 0.6)):
        for k in names:
            expected = alpha * before["ema_model"][k] + (1 - alpha) * after["model"][k]
            assert torch.allclose(after["ema_model"][k], expected, rtol=1e-5, atol=1e-7), k
    moved = [k for k in names if not torch.equal(ckpts[1]["ema_model"][k], ckpts[0]["ema_model"][k])]
    assert moved                                                         # the check is not vacuous


def test_consistency_weight_scales_l_con(root, tmp_path):
    """Eq. 11: lambda_con multiplies L_con (first iteration: same draws, so exactly half the loss)."""
    logs = []
    for name, flags in (("one", []), ("half", ["--consistency-weight", "0.5"])):
        run(root, tmp_path / name, "--iters", "1", "--tau", "0.01", *flags)
        logs.append(json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0]))
    assert logs[0]["loss_con"] > 0 and logs[1]["loss_con"] == pytest.approx(0.5 * logs[0]["loss_con"], rel=1e-6)
    assert logs[1]["loss_seg"] == logs[0]["loss_seg"]


def test_no_context_keeps_only_the_drawn_classes():
    """Table 4 'SP': without the meta-classes the mask is ceil(n/2) classes; with them, a drawn pole or light
    pulls in the other (both present)."""
    prob = torch.zeros(1, 19, 1, 4)
    prob[0, 5, 0, :2] = 1.0                                   # pole on the left, traffic light on the right
    prob[0, 6, 0, 2:] = 1.0
    for seed in range(4):
        M, _ = camix.contextual_mask(prob, None, torch.Generator().manual_seed(seed), context=False)
        assert M.sum() == 2 and M[0, 0, 0] != M[0, 0, 2]      # one of the two classes
        M, _ = camix.contextual_mask(prob, None, torch.Generator().manual_seed(seed), context=True)
        assert M.sum() == 4


def test_remaining_defaults_and_the_optimisers():
    """The switches' defaults, the warm-up per mix (A10), and the optimiser values: the code's SGD (momentum 0.9,
    wd 5e-4, head x10; configUDA_ucspa_*.json, optim_parameters) and the paper's Adam (§4.2: wd 5e-5, 0.9)."""
    a = camix.parse_args(["--build-prior"])
    expected = dict(target_scale=1.0, no_jitter=False, no_blur=False, no_context=False, no_spatial_prior=False,
                    log_sigmask=False, source_only=False, build_prior=True, prior=None, amp=False)
    assert {k: getattr(a, k) for k in expected} == expected
    warmups = {(src, mix): camix.parse_args(["--source", src, "--mix", mix, "--build-prior"]).warmup_iters
               for src in ("gta5", "synthia") for mix in camix.MIXES}
    assert warmups == {**{(s, m): 0 for s in ("gta5", "synthia") for m in ("dacs", "none", "cutmix", "cowmix")},
                       ("gta5", "camix"): 110000, ("gta5", "idacs"): 110000,
                       ("synthia", "camix"): 40000, ("synthia", "idacs"): 40000}
    assert camix.parse_args(["--source-only"]).warmup_iters == 0
    model = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    sgd = camix.build_optimizer(model, a)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in sgd.param_groups] == [
        (2.5e-4, 0.9, 5e-4), (2.5e-3, 0.9, 5e-4)]
    adam = camix.build_optimizer(model, camix.parse_args(["--build-prior", "--optimizer", "adam-paper"]))
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in adam.param_groups] == [
        (2.5e-4, (0.9, 0.999), 5e-5), (2.5e-3, (0.9, 0.999), 5e-5)]
