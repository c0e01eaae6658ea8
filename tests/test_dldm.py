"""dldm.py: the rounds end to end, exact resume inside a stage, each equation against a hand computation,
the BDL rule, the merge, LAB, ensembles, one test per flag, and bad input."""
import json
import math
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import training
import dldm
from conftest import ROOT, weights_digest

TINY = ["--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32", "--target-size", "64", "32",
        "--n-labeled", "2", "--workers", "0", "--log-every", "1", "--device", "cpu", "--iters", "2",
        "--poly-iters", "10", "--pl-bins", "4096"]


def run(root, out, *flags):
    """dldm.main with the tiny settings; returns its metrics."""
    return dldm.main([*TINY, "--data-root", str(root), "--out-dir", str(out), *map(str, flags)])


def ckpt(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def base(root, tmp_path_factory):
    """A finished 2-round run: every stage of Algorithm 1 (its folders feed the single-stage tests)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(root, out, "--rounds", 2, "--save-every", 1, "--keep-checkpoints")
    return out


# ------------------------------------------------------------------ the whole algorithm

def test_two_rounds_end_to_end(base):
    for r in (1, 2):
        for stage in ("rl", "sl", "student"):
            m = json.loads((base / f"round{r}" / stage / "metrics.json").read_text())
            assert m["iteration"] == 2 and m["model"] == stage and m["num_classes"] == 19
            assert list(ckpt(base / f"round{r}" / stage / "checkpoint.pth")["model"]) == list(
                common.DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1)).state_dict())   # DeeplabMulti keys
    pseudo = base / "round1" / "pseudo"
    assert len(list(pseudo.glob("*.png"))) == 6                          # all of D_U (A16)
    assert json.loads((pseudo / "thresholds.json").read_text())["complete"]
    assert not (base / "round2" / "pseudo").exists()                     # none after the last round
    summary = json.loads((base / "metrics.json").read_text())
    assert [e["round"] for e in summary["rounds"]] == [1, 2]
    assert all({"M_RL", "M_SL", "M_S"} <= set(e) for e in summary["rounds"])
    assert summary["final (M_S^R)"] == summary["rounds"][1]["M_S"] and summary["mIoU"] == summary["rounds"][1]["M_S"]["mIoU"]
    assert summary["best over rounds"]["mIoU"] == max(e["M_S"]["mIoU"] for e in summary["rounds"])
    assert "selection" in summary["best over rounds"]
    assert weights_digest(ckpt(base / "checkpoint.pth")["model"]) == weights_digest(
        ckpt(base / "round2" / "student" / "checkpoint.pth")["model"])
    assert len((base / "split.txt").read_text().split()) == 2
    log = [json.loads(x) for x in (base / "round2" / "student" / "log.jsonl").read_text().splitlines()]
    assert {"loss_kl", "loss_ce", "lr"} <= set(log[-1])


def test_synthia_sixteen_classes(root, tmp_path):
    m = run(root, tmp_path / "run", "--source", "synthia", "--rounds", 1)
    assert m["num_classes"] == 16 and "mIoU13" in m
    assert ckpt(tmp_path / "run" / "round1" / "rl" / "checkpoint.pth")["model"]["layer6.conv2d_list.0.weight"].shape[0] == 16


def test_kill_inside_round_two_student_and_resume_is_exact(root, base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    # the state a kill right after iteration 1 of round 2's student leaves behind
    student = out / "round2" / "student"
    shutil.copyfile(student / "checkpoint_1.pth", student / "checkpoint.pth")
    for f in ("metrics.json", "best_snapshot.json", "checkpoint_2.pth"):
        (student / f).unlink()
    (out / "checkpoint.pth").unlink()
    before = (out / "round1" / "rl" / "checkpoint.pth").stat().st_mtime_ns
    run(root, out, "--rounds", 2, "--save-every", 1, "--resume", "auto")
    assert (out / "round1" / "rl" / "checkpoint.pth").stat().st_mtime_ns == before      # finished stages skipped
    assert weights_digest(ckpt(out / "checkpoint.pth")["model"]) == weights_digest(ckpt(base / "checkpoint.pth")["model"])


def test_stages_one_by_one_equal_all(root, base, tmp_path):
    out = tmp_path / "run"
    for r, stages in ((1, ("rl", "sl", "student", "pseudo")), (2, ("rl", "sl", "student"))):
        for stage in stages:
            run(root, out, "--rounds", 2, "--stage", stage, "--round", r)
    assert weights_digest(ckpt(out / "round2" / "student" / "checkpoint.pth")["model"]) == weights_digest(
        ckpt(base / "round2" / "student" / "checkpoint.pth")["model"])
    assert json.loads((out / "metrics.json").read_text())["final (M_S^R)"]["mIoU"] == pytest.approx(
        json.loads((base / "metrics.json").read_text())["final (M_S^R)"]["mIoU"])


def test_learning_rate_and_optimiser(root, tmp_path):
    """poly 0.9 over --poly-iters set before each step; SGD momentum 0.9, wd 1e-4, classifiers x10."""
    run(root, tmp_path / "run", "--stage", "rl", "--iters", 3, "--poly-iters", 6)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "round1" / "rl" / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2.5e-4 * (1 - i / 6) ** 0.9 for i in range(3)], rel=1e-9)
    groups = ckpt(tmp_path / "run" / "round1" / "rl" / "checkpoint.pth")["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert groups[0]["weight_decay"] == 1e-4 and groups[0]["momentum"] == 0.9


def test_defaults_match_the_paper_and_the_authors_config():
    a = dldm.parse_args([])
    literal = {"iters": 120000, "poly_iters": 250000, "batch_size": 1, "lr": 2.5e-4, "momentum": 0.9,
               "weight_decay": 1e-4, "lambda_kl": 0.5, "lambda_ce": 1.0, "kd_temp": 10.0, "kd_t2": True,
               "pl_portion": 0.5, "pl_cap": 0.9, "aux_weight": 0.1, "target_size": (1024, 512),
               "source_size": (1280, 720), "eval_res": "full", "lab": "on", "lab_mode": "online", "box": "cutmix",
               "src_fit": "crop", "ens": "probs", "merge_sampling": "uniform", "student_ce": "merged",
               "warm_start": False, "exclude_labeled_from_u": False, "n_labeled": 100, "init": "advent",
               "stage": "all", "optimizer": "sgd", "clean_param_groups": False, "crop_size": (0, 0),
               "eval_every": 0, "save_every": 2000, "rounds": None, "round": 1, "pl_bins": 2 ** 20, "amp": False,
               "layers": [3, 4, 23, 3], "width": 64, "teachers": None, "pseudo_dir": None, "seed": 0,
               "split_seed": 0}
    assert {k: getattr(a, k) for k in literal} == literal
    assert tuple(dldm.parse_args(["--source", "synthia"]).source_size) == (1280, 760)


def test_eval_res_is_honoured_and_a_crop_is_refused(root, tmp_path):
    """--eval-res picks the val labels (full: DDM eval.py's 2048x1024; half: at the input size); --crop-size
    has no meaning here (whole images, A18) and is refused instead of silently ignored."""
    flags = [*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x")]
    assert dldm.Run(dldm.parse_args(flags)).val.label_res == "full"
    assert dldm.Run(dldm.parse_args([*flags, "--eval-res", "half"])).val.label_res == "input"
    with pytest.raises(common.DataError, match="--crop-size 16 16"):
        dldm.parse_args([*flags, "--crop-size", "16", "16"])


def test_source_fit_lab_and_unlabeled_flags_build_the_right_data(root, tmp_path):
    """A4: M_RL's source is resized as usual then cut to a target-size window (--src-fit resize: squeezed to
    it); M_SL sees the whole resized source; --lab off gives the plain images; A16: D_U is every train image
    unless --exclude-labeled-from-u."""
    flags = [*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x"), "--source-size", "80", "40"]
    r = dldm.Run(dldm.parse_args(flags))
    rl, sl = r.source_set(True), r.source_set(False)
    assert isinstance(rl, dldm.LabSourceDataset) and (rl.resize, rl.crop) == ((80, 40), (32, 64))
    assert (sl.resize, sl.crop) == ((80, 40), None) and rl[(0, 5, -1)]["image"].shape == (3, 32, 64)
    assert sl[(0, 5, -1)]["image"].shape == (3, 40, 80)
    squeezed = dldm.Run(dldm.parse_args([*flags, "--src-fit", "resize"])).source_set(True)
    assert (squeezed.resize, squeezed.crop) == ((64, 32), None)
    plain = dldm.Run(dldm.parse_args([*flags, "--lab", "off"])).source_set(True)
    assert type(plain) is common.SegmentationDataset and (plain.resize, plain.crop) == ((80, 40), (32, 64))
    assert r.unlabeled == r.train_stems and len(r.train_stems) == 6
    ex = dldm.Run(dldm.parse_args([*flags, "--exclude-labeled-from-u"]))
    assert ex.unlabeled == [s for s in ex.train_stems if s not in ex.labeled] and len(ex.unlabeled) == 4


def test_balanced_sampling_alternates_ground_truth_and_pseudo_labels():
    """--merge-sampling balanced (A14 alternative): even iterations a ground-truth image (indices < n_gt),
    odd ones a pseudo-labeled image; each kind runs through all of its images before repeating."""
    s = common.BalancedSampler(3, 5, 1, seed=0, stream=1)
    drawn = [s.batch(i)[0][0] for i in range(20)]
    assert all(d < 3 for d in drawn[0::2]) and all(3 <= d < 8 for d in drawn[1::2])
    assert sorted(drawn[0:6:2]) == [0, 1, 2] and sorted(drawn[1:10:2]) == [3, 4, 5, 6, 7]


def test_rounds_default(root, tmp_path):
    args = dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x")])
    assert dldm.Run(args).args.rounds == 4                                    # GTA5
    args = dldm.parse_args([*TINY, "--source", "synthia", "--data-root", str(root)])
    assert dldm.Run(args).args.rounds == 3
    args = dldm.parse_args([*TINY, "--n-labeled", "6", "--data-root", str(root)])
    assert dldm.Run(args).args.rounds == 1                                    # every train image labeled


# ------------------------------------------------------------------ equations

def test_box_pastes_source_onto_target_and_mixes_labels_identically():
    x_s, x_t = torch.full((2, 3, 16, 24), 1.0), torch.full((2, 3, 16, 24), 2.0)
    y_s, y_t = torch.full((2, 16, 24), 3), torch.full((2, 16, 24), 7)
    y_s[:, 0, 0] = 255
    for rule in ("cutmix", "french"):
        for seed in range(10):
            mask = dldm.box_mask(2, 16, 24, torch.Generator().manual_seed(seed), rule)
            x, y = dldm.region_mix(mask, x_s, y_s, x_t, y_t)
            from_source = x[:, 0] == 1.0
            assert torch.equal(from_source, mask[:, 0] == 0)                  # 0 in M = the source box
            assert torch.equal(y == 7, ~from_source) and torch.equal(y[from_source] != 7, torch.ones_like(y[from_source], dtype=torch.bool))
            for k in range(2):
                rows, cols = from_source[k].any(1).nonzero(), from_source[k].any(0).nonzero()
                if len(rows):                                                # one axis-aligned rectangle
                    assert from_source[k, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
                    if rule == "french":
                        assert from_source[k].float().mean() == pytest.approx(0.5, abs=0.05)


def test_cutmix_box_rule_by_hand():
    g = torch.Generator().manual_seed(3)
    u = torch.rand(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    mask = dldm.box_mask(1, 20, 40, g, "cutmix")[0, 0]
    cut = (1 - u[0]) ** 0.5
    ch, cw, cy, cx = int(20 * cut), int(40 * cut), int(u[1] * 20), int(u[2] * 40)
    expect = torch.ones(20, 40)
    expect[max(cy - ch // 2, 0):min(cy + ch // 2, 20), max(cx - cw // 2, 0):min(cx + cw // 2, 40)] = 0
    assert torch.equal(mask, expect)


def test_kl_term_by_hand():
    t = 10.0
    z_s = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]).T.reshape(1, 3, 1, 2)
    p_e = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 2)
    q = np.exp(z_s.numpy() / t) / np.exp(z_s.numpy() / t).sum(1, keepdims=True)
    p = p_e.numpy()
    kl = (p * (np.log(p) - np.log(q))).sum(1).mean()
    assert dldm.kd_loss(z_s, p_e, t).item() == pytest.approx(100 * kl, rel=1e-5)        # T^2 = 100
    assert dldm.kd_loss(z_s, p_e, t, t2=False).item() == pytest.approx(kl, rel=1e-5)
    reverse = (q * (np.log(q) - np.log(p))).sum(1).mean()                               # KL(student || teacher)
    assert abs(dldm.kd_loss(z_s, p_e, t, t2=False).item() - reverse) > 1e-3


def test_ensembles_by_hand():
    a = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    b = torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1)
    sm = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    probs = (sm(a.numpy().ravel() / 10) + sm(b.numpy().ravel() / 10)) / 2
    assert dldm.ensemble_probs([a, b], 10.0).ravel().numpy() == pytest.approx(probs, rel=1e-6)
    logits = sm((a.numpy().ravel() + b.numpy().ravel()) / 2 / 10)
    assert dldm.ensemble_probs([a, b], 10.0, "logits").ravel().numpy() == pytest.approx(logits, rel=1e-6)

    class Fixed(torch.nn.Module):
        num_classes = 3

        def __init__(self, z):
            super().__init__()
            self.z = z

        def forward(self, x):
            return None, self.z
    e = dldm.Ensemble([Fixed(a), Fixed(b)])
    assert e(torch.zeros(1)).ravel().numpy() == pytest.approx((sm(a.numpy().ravel()) + sm(b.numpy().ravel())) / 2)


def test_student_step_distils_teachers_on_unlabeled_and_supervises_on_labeled():
    """Loop order of Eq. 4: teachers see x_u only, the KL compares their ensemble with the student on x_u,
    the CE uses x_t and y_t."""
    seen = []

    class Net(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(scale))

        def forward(self, x):
            seen.append((self, x))
            z = torch.cat([x[:, :1] * self.w, -x[:, :1] * self.w, x[:, 1:2]], 1)
            return z * 0.5, z
    student, rl, sl = Net(1.0), Net(2.0), Net(-1.0)
    x_u, x_t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    y_t = torch.randint(0, 3, (1, 4, 4))
    args = types.SimpleNamespace(kd_temp=10.0, ens="probs", kd_t2=True, lambda_kl=0.5, lambda_ce=1.0, aux_weight=0.1)
    r = types.SimpleNamespace(args=args, amp=training.Amp(torch.device("cpu"), False))
    losses = dldm.student_step(student, {"u": (x_u, None), "t": (x_t, y_t)}, None, r, [rl, sl])
    assert [m for m, x in seen if x is x_u] == [rl, sl, student] and [m for m, x in seen if x is x_t] == [student]
    p_e = (F.softmax(rl(x_u)[1] / 10, 1) + F.softmax(sl(x_u)[1] / 10, 1)) / 2
    assert losses["loss_kl"].item() == pytest.approx(dldm.kd_loss(student(x_u)[1], p_e, 10.0).item(), rel=1e-6)
    ce = F.cross_entropy(student(x_t)[1], y_t) + 0.1 * F.cross_entropy(student(x_t)[0], y_t)
    assert losses["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def bdl_reference(prob, portion=0.5, cap=0.9):
    """BDL SSL.py, literally: sort the confidences of each predicted class, index round(n*portion), cap."""
    pred, conf = prob.argmax(1), prob.max(1)
    th = []
    for c in range(prob.shape[1]):
        x = np.sort(conf[pred == c])
        th.append(0 if len(x) == 0 else x[int(np.round(len(x) * portion))])
    th = np.minimum(np.array(th, dtype=np.float64), cap)
    label = pred.copy()
    for c in range(prob.shape[1]):
        label[(conf < th[c]) & (pred == c)] = 255
    return th, label


def test_bdl_rule_on_a_toy_map():
    """Per-class medians, the 0.9 cap, ignore for the rest; class 3 never predicted (threshold 0)."""
    rng = np.random.default_rng(0)
    levels = np.arange(40, 65) / 64                                     # exact in float32 and at 2^12 bins
    n, c, h, w = 3, 4, 5, 7
    prob = np.zeros((n, c, h, w), dtype=np.float32)
    pred = rng.integers(0, 3, (n, h, w))
    conf = rng.choice(levels, (n, h, w)).astype(np.float32)
    conf[pred == 2] = rng.choice(np.arange(59, 65) / 64, (pred == 2).sum())   # class 2: median above 0.9
    for k in range(c):
        prob[:, k] = np.where(pred == k, conf, (1 - conf) / (c - 1))
    th_ref, label_ref = bdl_reference(prob)
    hist = dldm.confidence_histogram(torch.from_numpy(prob), 2 ** 12)
    th = dldm.bdl_thresholds(hist)
    assert th == pytest.approx(th_ref, abs=0) and th[2] == 0.9 and th[3] == 0
    label = dldm.apply_thresholds(torch.from_numpy(prob), torch.from_numpy(th)).numpy()
    assert np.array_equal(label, label_ref)
    assert (label == 255).any() and set(np.unique(label)) <= {0, 1, 2, 255}
    assert ((label == 2) == ((pred == 2) & (conf >= 0.9))).all()


def test_pl_portion_is_the_share_of_most_confident_pixels_kept():
    """DLDM §4.2 / BDL: 'portion' = share of each class's pixels kept, the most confident ones; the threshold
    is the ascending sorted confidence at index round((1 - portion) n_c) (BDL's round(0.5 n_c) at 0.5)."""
    conf = np.arange(33, 41) / 64                                       # 8 pixels of class 0, all below the cap
    prob = np.zeros((1, 2, 1, 8), dtype=np.float32)
    prob[0, 0, 0], prob[0, 1, 0] = conf, 1 - conf
    hist = dldm.confidence_histogram(torch.from_numpy(prob), 2 ** 12)
    for portion, kept in ((0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8)):
        th = dldm.bdl_thresholds(hist, portion, 0.9)
        assert th[0] == conf[round(8 * (1 - portion))] and th[1] == 0
        label = dldm.apply_thresholds(torch.from_numpy(prob), torch.from_numpy(th)).numpy()[0, 0]
        assert (label == 0).sum() == kept and (label[8 - kept:] == 0).all()   # the top `kept` confidences
    assert dldm.bdl_thresholds(hist, 0.25, 0.55)[0] == 0.55              # the cap still wins


def test_pseudo_labels_come_from_the_student_softmax_then_upsampled(root, base):
    """Alg. 1 line 5: M_S^1's softmax at the output stride, upsampled (align_corners) to the target size."""
    args = dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(base), "--rounds", "2"])
    r = dldm.Run(args)
    student = r.load_model(base / "round1" / "student" / "checkpoint.pth")
    data = r.unlabeled_set()
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        prob = F.interpolate(F.softmax(student(x)[1], 1), size=(32, 64), mode="bilinear", align_corners=True)
    th = dldm.bdl_thresholds(dldm.confidence_histogram(prob, 4096))
    saved = json.loads((base / "round1" / "pseudo" / "thresholds.json").read_text())["thresholds"]
    assert saved == pytest.approx(th.tolist())
    label = dldm.apply_thresholds(prob, torch.from_numpy(th)).numpy()
    for i, stem in enumerate(data.stems()):
        assert np.array_equal(np.asarray(Image.open(base / "round1" / "pseudo" / f"{stem}.png")), label[i])


def test_merge_ground_truth_wins(root, base):
    args = dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(base), "--rounds", "2"])
    r = dldm.Run(args)
    data, n_gt, n_pseudo = r.target_set(2)
    assert (n_gt, n_pseudo) == (2, 4) and data.stems()[:2] == r.labeled
    gt = common.SegmentationDataset("cityscapes", r.target_root, resize=(64, 32), stems=r.labeled)
    for i, stem in enumerate(data.stems()):
        label = data.load(i)[1]
        if stem in r.labeled:
            assert np.array_equal(label, gt.load(r.labeled.index(stem))[1])
        else:
            assert np.array_equal(label, np.asarray(Image.open(base / "round1" / "pseudo" / f"{stem}.png")))
    assert r.target_set(1)[2] == 0 and r.target_set(2, gt_only=True)[2] == 0


# ------------------------------------------------------------------ LAB

def test_lab_conversion_matches_skimage_values():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8)
    lab = dldm.rgb_to_lab(rgb)
    assert lab[0, 0] == pytest.approx([100.0, 0.0, 0.0], abs=1e-2)
    assert lab[0, 1] == pytest.approx([53.2408, 80.0925, 67.2032], abs=1e-3)        # skimage rgb2lab of red
    assert lab[0, 2] == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert dldm.lab_to_rgb(dldm.rgb_to_lab(img)) * 255 == pytest.approx(img.astype(float), abs=1e-6)


def test_lab_transfer_matches_the_reference_statistics():
    rng = np.random.default_rng(1)
    src = rng.integers(60, 200, (32, 48, 3), dtype=np.uint8)
    ref = np.clip(rng.normal([90, 110, 150], 20, (40, 40, 3)), 0, 255).astype(np.uint8)
    stats = dldm.lab_stats(ref)
    matched = dldm.lab_match(dldm.rgb_to_lab(src), stats).reshape(-1, 3)
    assert matched.mean(0) == pytest.approx(stats[:3], abs=1e-9) and matched.std(0) == pytest.approx(stats[3:], rel=1e-9)
    out = dldm.lab_stats(dldm.lab_transfer(src, stats))                # after gamut clip and uint8 truncation
    assert out[:3] == pytest.approx(stats[:3], abs=1.0) and out[3:] == pytest.approx(stats[3:], abs=1.0)
    assert dldm.lab_transfer(np.dstack([src, np.full(src.shape[:2], 7, np.uint8)]), stats).shape == src.shape


def test_lab_match_is_the_authors_formula_without_an_epsilon():
    """DDM base_dataset.py divides by the source channel's std itself; the guard only acts on a flat channel."""
    rng = np.random.default_rng(3)
    lab = dldm.rgb_to_lab(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    stats = np.array([55.0, -3.0, 8.0, 0.37, 11.0, 14.0])
    expect = np.stack([(lab[..., i] - lab[..., i].mean()) / lab[..., i].std() * stats[3 + i] + stats[i]
                       for i in range(3)], -1)
    assert np.allclose(dldm.lab_match(lab, stats), expect, rtol=0, atol=1e-11)
    flat = np.dstack([lab[..., :2], np.full(lab.shape[:2], 5.0)])         # b channel constant: std 0
    assert np.isfinite(dldm.lab_match(flat, stats)).all() and (dldm.lab_match(flat, stats)[..., 2] == stats[2]).all()


def test_lab_reference_drawn_per_load_online_and_fixed_offline(root, tmp_path):
    args = dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "r")])
    r = dldm.Run(args)
    online = r.source_set(False)
    refs = {online.reference(0, s) for s in range(12)}
    assert len(refs) > 1 and len(r.train_stems) == len(online.ref_stats) == 6        # all train images (A17)
    args.lab_mode = "offline"
    offline = r.source_set(False)
    a, b = offline[(0, 1, -1)], offline[(0, 2, -1)]
    assert torch.equal(a["image"], b["image"]) and (tmp_path / "r" / "lab_offline" / "00001.png").is_file()


def per_pixel_lab_transfer(rgb, stats):
    """The LAB transfer as dldm.py computed it before it worked per distinct colour (kept here as the reference):
    skimage's rgb2lab/lab2rgb maps on every pixel, NumPy's (pixels x 3) mean(0)/std(0), DDM's affine step."""
    xyz_from_rgb = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]])
    white = np.array([0.95047, 1.0, 1.08883])
    v = np.arange(256) / 255.0
    xyz = (np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)[rgb[..., :3]] @ xyz_from_rgb.T) / white
    f = np.cbrt(xyz)
    low = xyz <= 0.008856
    f[low] = 7.787 * xyz[low] + 16.0 / 116.0
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
    flat = lab.reshape(-1, 3)
    stats = np.asarray(stats, dtype=np.float64)
    lab = (lab - flat.mean(0)) / np.maximum(flat.std(0), 1e-8) * stats[3:] + stats[:3]
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0)], -1)
    xyz = f ** 3
    low = f <= 0.2068966
    xyz[low] = (f[low] - 16.0 / 116.0) / 7.787
    x = (xyz * white) @ np.linalg.inv(xyz_from_rgb).T
    out = 1.055 * np.power(np.maximum(x, 1e-12), 1 / 2.4) - 0.055
    low = x <= 0.0031308
    out[low] = 12.92 * x[low]
    return np.clip(np.clip(out, 0, 1) * 255.0, 0, 255).astype(np.uint8)


def lab_test_images(rng):
    """Random images of many sizes and colour counts, with black, white, primaries, greys, dark pixels (the
    linear branches), a flat channel, a single colour and an alpha channel."""
    edge = np.array(np.meshgrid(*[[0, 1, 254, 255]] * 3)).reshape(3, -1).T.astype(np.uint8)   # 64 corner colours
    out = [np.zeros((1, 1, 3), np.uint8), np.full((3, 5, 3), 255, np.uint8), edge.reshape(8, 8, 3),
           np.dstack([rng.integers(0, 256, (9, 7, 2)), np.full((9, 7), 40)]).astype(np.uint8),   # b flat
           rng.integers(0, 14, (16, 20, 3)).astype(np.uint8),                                     # all dark
           rng.integers(0, 256, (21, 33, 4)).astype(np.uint8),                                     # RGBA
           np.repeat(rng.integers(0, 256, (200, 110, 3)), 3, axis=1).astype(np.uint8)]   # >= 2^16 pixels
    for _ in range(24):
        h, w = rng.integers(1, 90), rng.integers(2, 90)      # width 1: see the test below
        palette = rng.integers(0, 256, (int(rng.integers(1, 300)), 3))
        img = palette[rng.integers(0, len(palette), (h, w))]                        # repeated colours
        img[rng.random((h, w)) < 0.3] = rng.integers(0, 256, 3)
        img[rng.random((h, w)) < 0.1] = edge[rng.integers(0, 64)]
        out.append(img.astype(np.uint8))
    return out


def test_lab_transfer_per_distinct_colour_is_uint8_equal_to_the_per_pixel_transfer():
    """The fast transfer against the per-pixel one: random, extreme (gamut-clipping) and identity statistics,
    whose round trip lands within a few ulps of the input's integers, so any float difference would show."""
    rng = np.random.default_rng(11)
    images = lab_test_images(rng)
    checked = 0
    for img in images:
        ref = images[rng.integers(len(images))]
        for stats in (dldm.lab_stats(ref), dldm.lab_stats(img), np.array([50.0, 0, 0, 40.0, 90.0, 90.0]),
                      np.array([8.0, -30.0, 40.0, 3.0, 2.0, 1e-3]), np.array([97.0, 5.0, -5.0, 1.0, 1.0, 1.0])):
            out = dldm.lab_transfer(img, stats)
            assert out.shape == img.shape[:2] + (3,) and out.dtype == np.uint8
            assert np.array_equal(out, per_pixel_lab_transfer(img, stats)), (img.shape, stats)
            checked += 1
    assert checked == 5 * len(images) and max(img[..., 0].size for img in images) >= 1 << 16


def test_lab_transfer_of_a_one_pixel_wide_image_is_within_one_level_of_the_per_pixel_transfer():
    """The documented bound: on an H x 1 image the per-pixel code's matmul of (1, 3) rows by 3x3 takes NumPy's
    vector path, whose sums round differently in the last ulp from the matrix path of wider images (so that
    transfer depended on the image's shape); the per-colour transfer gives a colour the same values anywhere."""
    rng = np.random.default_rng(13)
    differs = 0
    for _ in range(40):
        img = rng.integers(0, 256, (int(rng.integers(2, 60)), 1, 3)).astype(np.uint8)
        stats = dldm.lab_stats(img)                        # identity statistics: the most sensitive case
        fast, slow = dldm.lab_transfer(img, stats).astype(int), per_pixel_lab_transfer(img, stats).astype(int)
        assert np.abs(fast - slow).max() <= 1
        row = img.reshape(1, -1, 3)                        # the same pixels in the same order, one row
        assert np.array_equal(fast, per_pixel_lab_transfer(row, stats).reshape(img.shape))
        differs += not np.array_equal(fast, slow)
    assert differs > 0


def test_distinct_colours_and_pixel_moments_rebuild_the_whole_image_exactly():
    rng = np.random.default_rng(12)
    images = lab_test_images(rng)
    large = [img for img in images if img[..., 0].size >= 1 << 16]     # the table path of distinct_colours
    assert len(large) == 1
    for img in images[:12] + large:
        img = img[..., :3]
        colours, rows = dldm.distinct_colours(img)
        codes = colours.astype(np.int64) @ [65536, 256, 1]
        assert (np.diff(codes) > 0).all() and np.array_equal(colours[rows].reshape(img.shape), img)
        flat = dldm.rgb_to_lab(img).reshape(-1, 3)
        lab = dldm.rgb_to_lab(colours)
        assert np.array_equal(lab[rows], flat)                       # the per-colour map is shape-independent
        mean, std = dldm.pixel_moments(lab, rows)
        assert np.array_equal(mean, flat.mean(0)) and np.array_equal(std, flat.std(0))   # bit-equal
        assert np.array_equal(dldm.lab_stats(img), np.concatenate([flat.mean(0), flat.std(0)]))


def test_lab_transfer_reusing_colour_tables_is_uint8_equal_to_the_per_pixel_transfer(root):
    """One ColourTables through images of 2^16+ pixels (the table path) with different colour sets, odd sizes
    and 1 to 4 colour blocks: nothing of one image leaks into the next; a pickled dataset carries no tables."""
    rng = np.random.default_rng(15)
    tables = dldm.ColourTables()
    images = [rng.integers(0, 256, (257, 261, 3)),                                      # ~67k colours: 4 blocks
              rng.integers(0, 256, (8, 3))[rng.integers(0, 8, (300, 257))],          # 8 colours: 1 block
              rng.integers(100, 140, (263, 251, 3)), np.full((256, 256, 3), 77),       # one colour
              rng.integers(0, 256, (2, 3, 3)).repeat(129, axis=0).repeat(127, axis=1)]  # small palette, big image
    for img in [im.astype(np.uint8) for im in images] * 2:
        for stats in (dldm.lab_stats(img), np.array([55.0, -8.0, 12.0, 30.0, 20.0, 10.0])):
            out = dldm.lab_transfer(img, stats, tables)
            assert np.array_equal(out, per_pixel_lab_transfer(img, stats)), (img.shape, stats)
        assert not tables.seen.any()
    data = dldm.LabSourceDataset("gta5", root / "gta5", ref_stats=np.array([[50.0, 0, 0, 20.0, 10.0, 10.0]]))
    first = data[(0, 3, -1)]["image"]
    assert isinstance(data.tables, dldm.ColourTables) and pickle.loads(pickle.dumps(data)).tables is None
    assert torch.equal(pickle.loads(pickle.dumps(data))[(0, 3, -1)]["image"], first)


def test_colour_blocks_cover_every_colour_once_and_none_is_a_single_colour():
    for n in [1, 2, 3, 16383, 16384, 16385, 32767, 32768, 32769, 49153, 100000, 1 << 21]:
        blocks = dldm.colour_blocks(n)
        assert blocks[0].start == 0 and blocks[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        sizes = [b.stop - b.start for b in blocks]
        assert (sizes == [n] if n < 16384 else all(16384 <= s < 2 * 16384 for s in sizes)), n


def test_online_lab_run_is_bit_identical_to_the_per_pixel_transfer(root, tmp_path, monkeypatch):
    """A 2-iteration M_RL run with --lab-mode online: the same weights with the per-pixel transfer."""
    args = dldm.parse_args(TINY)
    assert (args.lab, args.lab_mode) == ("on", "online")
    fast = stage_digest(root, tmp_path / "fast", ["--stage", "rl"], "round1/rl/checkpoint.pth")
    monkeypatch.setattr(dldm, "lab_transfer", lambda rgb, stats, tables: per_pixel_lab_transfer(rgb, stats))
    assert stage_digest(root, tmp_path / "slow", ["--stage", "rl"], "round1/rl/checkpoint.pth") == fast
    monkeypatch.setattr(dldm, "lab_transfer",
                        lambda rgb, stats, tables: per_pixel_lab_transfer(rgb, np.asarray(stats) + 1e-3))
    assert stage_digest(root, tmp_path / "other", ["--stage", "rl"], "round1/rl/checkpoint.pth") != fast


def test_lab_speed_benchmark_runs_and_prints_a_row_per_frame(capsys, monkeypatch, tmp_path):
    """Its before/after rows (generated frames and a --frame file), and its `per_pixel_transfer` (the code
    before issue 24) is the tests' reference."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lab_speed
    frame = np.random.default_rng(3).integers(0, 256, (26, 40, 3), dtype=np.uint8)
    Image.fromarray(frame).save(tmp_path / "real 1.png")
    lab_speed.main(["--reps", "1", "--sigmas", "0", "5", "--size", "48", "30", "--resize", "32", "20",
                    "--frame", str(tmp_path / "real 1.png")])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| demo scene + noise sigma 0", "| demo scene + noise sigma 5", "| uniform noise",
                                    "| real frame real 1.png (40x26)"]
    assert all(0 < float(r[1]) <= 1 and r[4].endswith("x") and r[7].endswith("x") and r[8] == "yes |" for r in rows)
    rng = np.random.default_rng(14)
    for img in lab_test_images(rng)[:12]:
        stats = np.array([60.0, 10.0, -20.0, 20.0, 30.0, 25.0])
        assert np.array_equal(lab_speed.per_pixel_transfer(img, stats), per_pixel_lab_transfer(img, stats))


# ------------------------------------------------------------------ each flag changes training

def stage_digest(root, out, flags, path):
    """Digest of a stage checkpoint's weights (or of the pseudo-label PNGs) after a run with `flags`."""
    run(root, out, *flags)
    p = out / path
    if p.is_dir():
        return "".join(sorted(str(np.asarray(Image.open(f)).tobytes()) for f in p.glob("*.png")))
    return weights_digest(ckpt(p)["model"])


def teachers(base, r=1):
    return ["--teachers", base / f"round{r}" / "rl" / "checkpoint.pth", base / f"round{r}" / "sl" / "checkpoint.pth"]


def test_each_flag_changes_training(root, base, tmp_path):
    pseudo = ["--rounds", 2, "--round", 2, "--pseudo-dir", base / "round1" / "pseudo"]
    cases = {  # stage: (checkpoint path, base flags, [flag sets that must change the result])
        "rl": ("round1/rl/checkpoint.pth", ["--stage", "rl", "--source-size", 80, 40],   # a window to crop
               [["--lab", "off"], ["--lab-mode", "offline"], ["--box", "french"], ["--src-fit", "resize"],
                ["--aux-weight", 0], ["--clean-param-groups"], ["--weight-decay", 0.1], ["--optimizer", "adam"],
                ["--poly-iters", 3], ["--amp"], ["--split-seed", 3]]),
        "sl": ("round1/sl/checkpoint.pth", ["--stage", "sl"], [["--lab", "off"]]),
        "student": ("round1/student/checkpoint.pth", ["--stage", "student", *teachers(base)],
                    [["--lambda-kl", 2], ["--lambda-ce", 0.1], ["--kd-temp", 2], ["--no-kd-t2"], ["--ens", "logits"],
                     ["--exclude-labeled-from-u"]]),
        "rl2": ("round2/rl/checkpoint.pth", ["--stage", "rl", *pseudo], [["--merge-sampling", "balanced"]]),
        "student2": ("round2/student/checkpoint.pth", ["--stage", "student", *pseudo, *teachers(base, 2)], []),
    }
    for name, (path, flags, variants) in cases.items():
        ref = stage_digest(root, tmp_path / name, flags, path)
        if name == "rl":
            assert stage_digest(root, tmp_path / f"{name}_again", flags, path) == ref     # deterministic
        for extra in variants:
            assert stage_digest(root, tmp_path / f"{name}_{extra[0]}", [*flags, *extra], path) != ref, extra
    gt_only = ["--stage", "student", *pseudo[:4], *teachers(base, 2), "--student-ce", "gt"]   # reads no pseudo-dir
    assert stage_digest(root, tmp_path / "student2_gt", gt_only, "round2/student/checkpoint.pth") != ref


def test_warm_start_and_pseudo_label_flags(root, base, tmp_path):
    """--warm-start starts round 2 from round 1; --pl-portion / --pl-cap change the pseudo-labels."""
    out = tmp_path / "warm"
    shutil.copytree(base / "round1" / "rl", out / "round1" / "rl")
    pseudo = ["--rounds", 2, "--round", 2, "--pseudo-dir", base / "round1" / "pseudo", "--stage", "rl"]
    cold = stage_digest(root, tmp_path / "cold", pseudo, "round2/rl/checkpoint.pth")
    assert stage_digest(root, out, [*pseudo, "--warm-start"], "round2/rl/checkpoint.pth") != cold
    pl = {}
    for flags in ([], ["--pl-portion", 0.99], ["--pl-cap", 0.01]):    # 0.01: below any max-probability
        out = tmp_path / ("pl" + "".join(map(str, flags)))
        shutil.copytree(base / "round1" / "student", out / "round1" / "student")
        pl[tuple(flags)] = stage_digest(root, out, ["--rounds", 2, "--stage", "pseudo", "--pl-bins", 2 ** 20, *flags],
                                        "round1/pseudo")
    assert len(set(pl.values())) == 3


def test_warm_start_begins_each_model_from_the_previous_round_of_its_own_kind(root, base, tmp_path):
    """--warm-start (A11 alternative): M_SL^2 starts from M_SL^1 (not from M_RL^1 or the student); without
    it from the init. One step at a negligible learning rate leaves the starting weights visible."""
    out = tmp_path / "run"
    shutil.copytree(base / "round1", out / "round1")
    flags = ["--rounds", 2, "--round", 2, "--stage", "sl", "--iters", 1, "--lr", 1e-30,
             "--pseudo-dir", base / "round1" / "pseudo"]
    run(root, out, *flags, "--warm-start")
    got = ckpt(out / "round2" / "sl" / "checkpoint.pth")["model"]
    prev = {kind: ckpt(base / "round1" / kind / "checkpoint.pth")["model"] for kind in ("rl", "sl", "student")}
    weights = [k for k in got if k.endswith("conv1.weight") or k.startswith("layer6")]
    assert all(torch.allclose(got[k], prev["sl"][k], rtol=0, atol=1e-12) for k in weights)
    assert not all(torch.equal(prev["sl"][k], prev[kind][k]) for kind in ("rl", "student") for k in weights)
    run(root, tmp_path / "cold", *flags)
    cold = ckpt(tmp_path / "cold" / "round2" / "sl" / "checkpoint.pth")["model"]
    assert not all(torch.allclose(cold[k], prev["sl"][k]) for k in weights)


# ------------------------------------------------------------------ evaluation, bad input

def test_eval_single_and_ensemble(root, base, tmp_path):
    rl = base / "round1" / "rl" / "checkpoint.pth"
    single = run(root, tmp_path / "one", "--stage", "eval", "--ensemble", rl)
    assert single["mIoU"] == pytest.approx(json.loads((base / "round1" / "rl" / "metrics.json").read_text())["mIoU"])
    pair = run(root, tmp_path / "two", "--stage", "eval", "--ensemble", rl, base / "round1" / "sl" / "checkpoint.pth")
    assert pair["model"].startswith("E(") and (tmp_path / "two" / "metrics.json").is_file()


def test_bad_input_nothing_written(root, base, tmp_path):
    with pytest.raises(common.DataError, match="teacher checkpoint not found"):
        run(root, tmp_path / "a", "--stage", "student")
    other = tmp_path / "c16.pth"
    torch.save({"model": common.DeepLabV2(16, multi_level=True, layers=(1, 1, 1, 1)).state_dict()}, other)
    with pytest.raises(common.DataError, match="different class counts"):
        run(root, tmp_path / "b", "--stage", "eval", "--ensemble", base / "round1" / "rl" / "checkpoint.pth", other)
    partial = tmp_path / "pseudo"
    shutil.copytree(base / "round1" / "pseudo", partial)
    next(partial.glob("*.png")).unlink()
    with pytest.raises(common.DataError, match="does not match the unlabeled list"):
        run(root, tmp_path / "c", "--stage", "rl", "--rounds", 2, "--round", 2, "--pseudo-dir", partial)
    shutil.copytree(base / "round1" / "pseudo", partial, dirs_exist_ok=True)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(partial / "nowhere_000000_000019.png")
    with pytest.raises(common.DataError, match="nowhere_000000_000019.png"):
        run(root, tmp_path / "d", "--stage", "sl", "--rounds", 2, "--round", 2, "--pseudo-dir", partial)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_bad_input_exits_2_with_one_line(root, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "dldm.py"), *TINY, "--data-root", str(root), "--out-dir",
                        str(tmp_path / "x"), "--stage", "student"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()



def test_demo_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "run"
    dldm.main(["--demo", "--iters", "2", "--poly-iters", "2", "--rounds", "1", "--data-root", str(tmp_path / "data"),
               "--out-dir", str(out)])
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary) == {"script", "method", "baselines", "iterations", "seconds", "torch"}
    assert summary["script"] == "dldm.py" and summary["method"]["name"] == "DLDM M_S^1"
    assert [b["name"] for b in summary["baselines"]] == ["supervised (labeled target only)", "M_RL^1", "M_SL^1"]
    assert summary["iterations"] == 2 * (3 + 1)                  # M_RL, M_SL, M_S per round + the baseline
    config = json.loads((out / "config.json").read_text())
    assert (config["n_labeled"], config["width"], config["init"]) == (5, 32, "demo")
    assert "DLDM M_S^1" in capsys.readouterr().out.splitlines()[-1]


def test_demo_samples_the_merged_set_one_to_one():
    """--demo draws ground-truth and pseudo-labeled images 1:1 (A14's balanced stream); the paper default stays
    uniform and an explicit flag wins over the demo value."""
    assert dldm.parse_args(["--demo"]).merge_sampling == "balanced"
    assert dldm.parse_args(["--demo", "--merge-sampling", "uniform"]).merge_sampling == "uniform"
    assert dldm.parse_args([]).merge_sampling == "uniform"


@pytest.mark.parametrize("rule", ["cutmix", "french"])
def test_box_mask_on_device_equals_per_image_slicing(rule):
    for seed in range(8):
        g, ref_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        mask = dldm.box_mask(3, 21, 34, g, rule)
        expect = torch.ones(3, 1, 21, 34)
        for k in range(3):    # the same draws, written into a full-size mask image by image
            u = torch.rand(3, generator=ref_g, dtype=torch.float64).tolist()
            if rule == "cutmix":
                cut = (1 - u[0]) ** 0.5
                ch, cw, cy, cx = int(21 * cut), int(34 * cut), int(u[1] * 21), int(u[2] * 34)
                expect[k, :, max(cy - ch // 2, 0):min(cy + ch // 2, 21), max(cx - cw // 2, 0):min(cx + cw // 2, 34)] = 0
            else:
                hf = math.exp(u[0] * math.log(0.5))
                bh, bw = round(hf * 21), round(0.5 / hf * 34)
                y0, x0 = round((21 - bh) * u[1]), round((34 - bw) * u[2])
                expect[k, :, y0:y0 + bh, x0:x0 + bw] = 0
        assert torch.equal(mask, expect), (rule, seed)


def test_lab_branches_evaluated_where_they_apply_equal_skimages_piecewise_maps():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    rgb[:8] = rng.integers(0, 14, (8, 40, 3))               # dark pixels: the linear branches
    x = rgb.astype(np.float64) / 255.0                         # skimage rgb2lab written with np.where
    x = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = (x @ dldm.XYZ_FROM_RGB.T) / dldm.WHITE_D65
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
    assert (xyz <= 0.008856).any() and np.array_equal(dldm.rgb_to_lab(rgb), lab)
    lab = dldm.lab_match(lab, np.array([20.0, 3.0, -2.0, 15.0, 9.0, 12.0]))   # dark: lab2rgb's low branches
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0)], -1)
    xyz = np.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787) * dldm.WHITE_D65
    x = xyz @ dldm.RGB_FROM_XYZ.T
    x = np.where(x > 0.0031308, 1.055 * np.power(np.maximum(x, 1e-12), 1 / 2.4) - 0.055, 12.92 * x)
    assert (f <= 0.2068966).any() and np.array_equal(dldm.lab_to_rgb(lab), np.clip(x, 0, 1))


def test_resume_with_other_settings_is_refused_before_anything_is_written(root, base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    config = (out / "config.json").read_text()
    with pytest.raises(common.DataError, match=r"made with other settings: --lr 0.00025 \(here 0.001\)"):
        run(root, out, "--rounds", 2, "--save-every", 1, "--keep-checkpoints", "--resume", "auto", "--lr", "0.001")
    assert (out / "config.json").read_text() == config
    m = run(root, out, "--rounds", 2, "--save-every", 1, "--keep-checkpoints", "--resume", "auto",
            "--stage", "student", "--round", 2, "--workers", 1)   # stage/round and run-only flags may differ
    assert m["iteration"] == 2


def test_cutmix_box_sides_follow_sqrt_of_one_minus_lambda_for_many_draws():
    """CutMix [46] rand_bbox over several draws: cut ratio sqrt(1 - lambda), centre uniform, sides halved
    around it and clipped; the box covers about 1 - lambda of the image away from the borders."""
    h, w = 64, 96
    for seed in range(12):
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        mask = dldm.box_mask(1, h, w, torch.Generator().manual_seed(seed), "cutmix")[0, 0]
        cut = (1 - u[0]) ** 0.5
        ch, cw, cy, cx = int(h * cut), int(w * cut), int(u[1] * h), int(u[2] * w)
        expect = torch.ones(h, w)
        expect[max(cy - ch // 2, 0):min(cy + ch // 2, h), max(cx - cw // 2, 0):min(cx + cw // 2, w)] = 0
        assert torch.equal(mask, expect), seed


def test_frozen_models_predict_with_running_statistics(root, base):
    """The teachers of a student stage (and the student that pseudo-labels) are loaded frozen in eval mode:
    BN uses its running statistics, so a prediction does not depend on the rest of the batch."""
    args = dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(base), "--rounds", "2"])
    model = dldm.Run(args).load_model(base / "round1" / "rl" / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone, together = model(x[:1])[1], model(x)[1][:1]
    assert torch.allclose(alone, together, atol=1e-5)
    assert all(not p.requires_grad for p in model.parameters())


def test_student_gradient_weights_kl_and_ce_by_lambda():
    """Eq. 4: the student's gradient is that of lambda_kl L_kl + lambda_ce L_ce (0.5 and 1 by default; 2 and
    0.25 here so that a dropped weight shows)."""
    class Net(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(scale))

        def forward(self, x):
            z = torch.cat([x[:, :1] * self.w, -x[:, :1] * self.w, x[:, 1:2] * self.w ** 2], 1)
            return z * 0.5, z
    g = torch.Generator().manual_seed(0)
    x_u, x_t = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    y_t = torch.randint(0, 3, (1, 4, 4), generator=g)
    student, rl, sl = Net(1.0), Net(2.0), Net(-1.0)
    args = types.SimpleNamespace(kd_temp=2.0, ens="probs", kd_t2=True, lambda_kl=2.0, lambda_ce=0.25, aux_weight=0.1)
    losses = dldm.student_step(student, {"u": (x_u, None), "t": (x_t, y_t)}, None,
                               types.SimpleNamespace(args=args, amp=training.Amp(torch.device("cpu"), False)), [rl, sl])
    got = student.w.grad.clone()
    student.w.grad = None
    p_e = dldm.ensemble_probs([rl(x_u)[1].detach(), sl(x_u)[1].detach()], 2.0)
    kl = dldm.kd_loss(student(x_u)[1], p_e, 2.0)
    assert losses["loss_kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    (2.0 * kl + 0.25 * common.seg_loss(*student(x_t), y_t, 0.1)).backward()
    assert got.item() == pytest.approx(student.w.grad.item(), rel=1e-5) and abs(got.item()) > 1e-3


# ------------------------------------------------------------------ issue 21: selection, refusals, BN affine, README

def test_synthia_selection_uses_the_13_class_miou(tmp_path, monkeypatch):
    """Table 2 reports 13 classes: best_snapshot.json and 'best over rounds' pick by mIoU13 for SYNTHIA (the
    16-class mIoU orders these snapshots and rounds the other way), by mIoU for GTA5."""
    scores = [(50.0, 40.0), (45.0, 48.0), (47.0, 44.0)]                  # (mIoU, mIoU13): orders differ
    evals = iter([{"iteration": i + 1, "mIoU": a, "mIoU13": b} for i, (a, b) in enumerate(scores)])
    monkeypatch.setattr(training, "evaluate_and_write", lambda *a, **k: next(evals))
    run_ = types.SimpleNamespace(val=None, device=None, amp=None, synthia=True, dist=common.Dist())
    best = {}
    for i in range(3):
        dldm.evaluate(run_, None, tmp_path, i + 1, "rl", best)
    assert json.loads((tmp_path / "best_snapshot.json").read_text())["iteration"] == 2 and best["iteration"] == 2
    out = tmp_path / "run"
    for r, (a, b) in enumerate(scores, 1):
        (out / f"round{r}" / "student").mkdir(parents=True)
        (out / f"round{r}" / "student" / "metrics.json").write_text(json.dumps({"mIoU": a, "mIoU13": b}))
    for synthia, round_ in ((True, 2), (False, 1)):
        run_ = types.SimpleNamespace(dist=common.Dist(), args=types.SimpleNamespace(rounds=3), out=out,
                                     synthia=synthia, stage_dir=lambda r, s: out / f"round{r}" / s)
        best = dldm.round_summary(run_)["best over rounds"]
        assert best["round"] == round_ and ("mIoU13" if synthia else "mIoU") in best["selection"]


@pytest.mark.parametrize("flags, needle", [
    (["--eval-model", "teacher", "--stage", "eval", "--ensemble", "a.pth"], "DLDM has no EMA teacher"),
    (["--round", "2", "--rounds", "2"], "--round 2 with --stage all"),
    (["--pseudo-dir", "p"], "--pseudo-dir with --stage all"),
    (["--teachers", "a", "b"], "--teachers with --stage all"),
    (["--stage", "rl", "--teachers", "a", "b"], "--teachers: read by --stage student only"),
    (["--stage", "rl", "--pseudo-dir", "p"], "--pseudo-dir: read by --stage rl|sl|student of --round 2"),
    (["--stage", "pseudo", "--round", "2", "--rounds", "3", "--pseudo-dir", "p"], "--pseudo-dir: read by"),
    (["--stage", "student", "--round", "2", "--rounds", "2", "--student-ce", "gt", "--pseudo-dir", "p"],
     "not with --student-ce gt"),
    (["--stage", "supervised", "--round", "2"], "--stage supervised belongs to no round"),
    (["--stage", "rl", "--ensemble", "a.pth"], "--ensemble: read by --stage eval only"),
])
def test_flags_a_stage_would_ignore_are_refused(root, tmp_path, flags, needle):
    argv = [*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x"), *flags]
    p = subprocess.run([sys.executable, str(ROOT / "dldm.py"), *argv], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert needle in p.stderr and not (tmp_path / "x").exists()


def test_exclude_labeled_with_every_image_labeled_is_refused(root, tmp_path):
    """--exclude-labeled-from-u at N = all train images leaves D_U empty: one line, exit 2, nothing written
    (it used to crash with ZeroDivisionError in the student's sampler)."""
    argv = [*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "x"), "--n-labeled", "6",
            "--exclude-labeled-from-u"]
    with pytest.raises(common.DataError, match="--exclude-labeled-from-u with --n-labeled 6: every train image"):
        dldm.Run(dldm.parse_args(argv))
    p = subprocess.run([sys.executable, str(ROOT / "dldm.py"), *argv], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_checkpoints_of_another_network_convention_are_refused(root, base, tmp_path):
    """--stage eval / --eval-only and --teachers check the checkpoint's --init convention (stride style,
    normalisation) and size as the other scripts' --eval-only do, before anything is written."""
    rl, sl = base / "round1" / "rl" / "checkpoint.pth", base / "round1" / "sl" / "checkpoint.pth"
    other = tmp_path / "imagenet.pth"
    state = ckpt(rl)
    state["args"]["init"] = "imagenet"
    torch.save(state, other)
    for n, flags in enumerate((["--stage", "eval", "--ensemble", other],
                               ["--stage", "eval", "--ensemble", rl, other],
                               ["--eval-only", "--checkpoint", other],
                               ["--stage", "student", "--teachers", rl, other])):
        with pytest.raises(common.DataError, match=r"trained with --init imagenet \(this run: none"):
            run(root, tmp_path / f"o{n}", *flags)
        assert not (tmp_path / f"o{n}").exists()
    with pytest.raises(common.DataError, match=r"trained with --layers \[1, 1, 1, 1\]"):
        run(root, tmp_path / "w", "--stage", "student", "--teachers", rl, sl, "--layers", 1, 1, 2, 1)
    assert run(root, tmp_path / "ok", "--stage", "eval", "--ensemble", rl, sl)["model"].startswith("E(")


def test_bn_affine_frozen_by_default_and_trained_with_the_flag(root, tmp_path):
    """A20: BN gamma/beta stay at their init (AdvEnt, DDM's net default) unless --bn-affine train (DDM config.py
    FREEZE_BN_AFFINE = False), which puts them into the 1x group."""
    def bn_and_groups(flags):
        run(root, tmp_path / "_".join(flags or ["default"]), "--stage", "sl", "--lr", 0.01, *flags)
        c = ckpt(tmp_path / "_".join(flags or ["default"]) / "round1" / "sl" / "checkpoint.pth")
        bn = torch.cat([v for k, v in c["model"].items() if "bn" in k and k.endswith(("weight", "bias"))])
        return bn, [len(g["params"]) for g in c["optimizer"]["param_groups"]]
    frozen, groups_frozen = bn_and_groups([])
    trained, groups_trained = bn_and_groups(["--bn-affine", "train"])
    init = torch.cat([torch.ones(1), torch.zeros(1)])
    assert set(frozen.unique().tolist()) == set(init.tolist()) and len(set(trained.tolist())) > 2
    assert groups_trained[0] > groups_frozen[0] and groups_trained[1] == groups_frozen[1]


def readme_commands(script):
    """Every `python <script> ...` command of the README's method tables, shell-split."""
    import re
    import shlex
    text = (ROOT / "README.md").read_text()
    found = re.findall(rf"`(python {script} [^`]*)`", text) + re.findall(rf"^(python {script} .*)$", text, re.M)
    return [shlex.split(c)[2:] for c in found]


def test_every_readme_dldm_command_runs_as_written(tmp_path):
    """Each README command parses as written: no shell braces (runs/t3_s{0,1} expands to four checkpoints),
    no '...' placeholders, at most two --ensemble checkpoints, and every --stage eval row has its own --out-dir."""
    commands = readme_commands("dldm.py")
    assert len(commands) >= 10
    eval_dirs = []
    for argv in commands:
        assert not any("{" in a or a in ("...", "…") for a in argv), argv
        args = dldm.parse_args(argv)
        if args.stage == "eval":
            assert args.out_dir and len(args.ensemble) <= 2, argv
            eval_dirs.append(args.out_dir)
    assert len(eval_dirs) == len(set(eval_dirs)) == 6          # Table 3: E(RL,RL'), E(SL,SL'), four E(RL,SL)
    folders = {}                                               # one run folder: only --stage/--round may differ
    for argv in commands:
        args = vars(dldm.parse_args(argv))
        folder = args["out_dir"] or str(training.default_out_dir("dldm", args["source"], args["n_labeled"], args["seed"]))
        settings = {k: v for k, v in args.items() if k not in ("stage", "round")}
        assert folders.setdefault(folder, settings) == settings, (folder, argv)
    import asss
    for argv in readme_commands("asss.py"):
        asss.parse_args(argv)


def test_adam_refuses_clean_param_groups():
    """--clean-param-groups changes the SGD groups only; with Adam (one group per tensor, one rate) it is refused."""
    with pytest.raises(common.DataError, match="--clean-param-groups with --optimizer adam"):
        dldm.parse_args(["--optimizer", "adam", "--clean-param-groups"])
    with pytest.raises(common.DataError, match="--clean-param-groups with --optimizer adam"):
        dldm.parse_args(["--demo", "--clean-param-groups"])


def test_lab_reference_is_an_argument_of_the_load_not_a_stored_attribute(root, tmp_path):
    """The reference of one load is computed from (index, item seed) and passed to `load`: the dataset keeps no
    per-item state (a worker or thread reading it between __getitem__ and load would get another item's)."""
    r = dldm.Run(dldm.parse_args([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "r")]))
    online = r.source_set(False)
    seeds = {online.reference(0, s): s for s in range(12)}
    (ref_a, seed_a), (ref_b, _) = list(seeds.items())[:2]
    item = online[(0, seed_a, -1)]
    assert "reference" not in vars(online)
    assert torch.equal(item["image"], common.normalise(online.load(0, ref_a)[0], online.norm))
    assert not np.array_equal(online.load(0, ref_a)[0], online.load(0, ref_b)[0])
