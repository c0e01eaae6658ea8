"""iidm.py: short runs for every source, the mixing streams, the schedule, and one test per flag."""
import json
import types

import pytest
import torch

import common
import training
import iidm
from conftest import script_runner, weights_after, weights_digest

TINY = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32",
        "--target-size", "64", "32", "--crop-size", "32", "32", "--n-labeled", "2", "--rcs-min-pixels", "40",
        "--workers", "0", "--log-every", "1", "--device", "cpu"]


run = script_runner(iidm, TINY)


@pytest.mark.parametrize("source", ["gta5", "synthia"])
def test_two_iterations_outputs(root, tmp_path, source):
    metrics, ckpt = run(root, tmp_path / "run", "--source", source)
    n = 16 if source == "synthia" else 19
    assert set(ckpt) >= {"model", "ema_model", "optimizer", "iteration", "rng", "args"} and ckpt["iteration"] == 2
    assert ckpt["model"]["layer5.conv2d_list.0.weight"].shape[0] == n
    assert list(ckpt["model"]) == list(common.DeepLabV2(n, layers=(1, 1, 1, 1)).state_dict())
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["num_classes"] == (16 if source == "synthia" else 19) and ("mIoU13" in saved) == (n == 16)
    assert saved["iteration"] == 2 and saved["model"] == "student"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss_s", "loss_t", "loss_inter", "loss_intra", "q", "lr"} <= set(log[-1])
    assert len((tmp_path / "run" / "split.txt").read_text().split()) == 2
    assert (tmp_path / "run" / "rcs_counts_0.json").is_file()          # RCS on the source only (A5)
    assert not (tmp_path / "run" / "rcs_counts_1.json").exists()



def test_two_two_logs_the_q_of_each_stream(root, tmp_path):
    run(root, tmp_path / "run", "--mix-strategy", "two-two")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"q", "q_intra"} <= set(log[-1])
    run(root, tmp_path / "one", "--iters", "1")
    assert "q_intra" not in json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])

def test_demo_runs_iidm_and_both_baselines(tmp_path, capsys):
    out = tmp_path / "run"
    iidm.main(["--demo", "--iters", "2", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)])
    assert json.loads((out / "config.json").read_text())["n_labeled"] == 5
    for suffix in ("_target_only", "_source_target"):
        assert (tmp_path / f"run{suffix}" / "metrics.json").is_file()
    last = capsys.readouterr().out.splitlines()[-1]
    assert "IIDM" in last and "target-only" in last and "source+target" in last
    summary = json.loads((out / "demo.json").read_text())
    assert summary["script"] == "iidm.py" and summary["method"]["name"] == "IIDM" and summary["iterations"] == 2
    assert [b["name"] for b in summary["baselines"]] == ["target-only (L_t)", "source+target (L_s+L_t)"]
    assert set(summary) == {"script", "method", "baselines", "iterations", "seconds", "torch"}
    assert json.loads((out / "config.json").read_text())["init"] == "demo"
    assert list((tmp_path / "data" / "demo").glob("init_*.pth"))                       # the demo init was built


def test_learning_rate_table(root, tmp_path):
    """Warm-up (ratio 1e-6) times poly (power 1), set before each step; the head gets 10x."""
    run(root, tmp_path / "run", "--iters", "4", "--warmup-iters", "2", "--no-inter", "--no-intra",
        "--save-every", "1", "--keep-checkpoints")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    expect = [6e-5 * 1e-6, 6e-5 * 0.75 * (1 - 0.5 * (1 - 1e-6)), 6e-5 * 0.5, 6e-5 * 0.25]
    assert lrs == pytest.approx(expect, rel=1e-9)
    # the optimizer after 2 iterations holds the lr of iteration 3 (poly 0.5): encoder 3e-5, decoder 10x
    groups = torch.load(tmp_path / "run" / "checkpoint_2.pth", weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(3e-5) and groups[1]["lr"] == pytest.approx(3e-4)
    assert groups[0]["weight_decay"] == 0.01
    assert groups[0]["betas"] == (0.9, 0.999)


def test_no_mixing_means_no_teacher(root, tmp_path):
    _, ckpt = run(root, tmp_path / "run", "--no-inter", "--no-intra")
    assert "ema_model" not in ckpt


def test_source_only_row_needs_no_labeled_target(root, tmp_path):
    _, ckpt = run(root, tmp_path / "run", "--n-labeled", "0", "--no-tgt-sup", "--no-inter", "--no-intra")
    assert (tmp_path / "run" / "split.txt").read_text() == ""
    with pytest.raises(common.DataError, match="--n-labeled 0"):
        iidm.parse_args([*TINY, "--n-labeled", "0"])


def test_resume_from_checkpoint_is_exact(root, tmp_path):
    _, full = run(root, tmp_path / "a", "--iters", "3")
    run(root, tmp_path / "b", "--iters", "3", "--save-every", "1", "--keep-checkpoints")
    _, resumed = run(root, tmp_path / "c", "--iters", "3", "--resume", tmp_path / "b" / "checkpoint_2.pth")
    for key in ("model", "ema_model"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])


def test_eval_only_and_wrong_class_count(root, tmp_path, capsys):
    metrics, _ = run(root, tmp_path / "run")
    again = iidm.main([*TINY, "--data-root", str(root), "--out-dir", str(tmp_path / "ev"), "--eval-only",
                       "--checkpoint", str(tmp_path / "run" / "checkpoint.pth")])
    assert again["mIoU"] == pytest.approx(metrics["mIoU"])
    with pytest.raises(common.DataError, match="19 classes, expected 16"):
        iidm.main([*TINY, "--source", "synthia", "--data-root", str(root), "--out-dir", str(tmp_path / "ev2"),
                   "--eval-only", "--checkpoint", str(tmp_path / "run" / "checkpoint.pth")])


# ------------------------------------------------------------------ the mixing streams

def _args(**kw):
    base = dict(classmix_select="image", mix_strategy="one-two", no_inter=False, no_intra=False, lam=1.0, mu=2.0,
                q_everywhere=False)
    return types.SimpleNamespace(**{**base, **kw})


def _batch():
    g = torch.Generator().manual_seed(0)
    y_s = torch.randint(0, 6, (2, 12, 12), generator=g)
    y_s[:, :3] = 255                                       # ignore rows in the source labels
    y_t = torch.randint(6, 12, (2, 12, 12), generator=g)
    y_t[:, -2:] = 255
    y_u = torch.randint(12, 19, (2, 12, 12), generator=g)
    x_s, x_t, x_u = (torch.full((2, 3, 12, 12), v) for v in (1.0, 2.0, 3.0))
    return x_s, y_s, x_t, y_t, x_u, y_u, torch.tensor(0.25)


def test_streams_paste_ground_truth_classes_onto_the_same_unlabeled_image():
    x_s, y_s, x_t, y_t, x_u, y_u, q = _batch()
    streams = iidm.mixed_streams(x_s, y_s, x_t, y_t, (x_u, y_u, q), (x_u, y_u, q), torch.Generator().manual_seed(1),
                                 _args())
    assert [(s[0], s[1]) for s in streams] == [("loss_inter", 1.0), ("loss_intra", 2.0)]
    for (_, _, x, y, w), value, y_gt in zip(streams, (1.0, 2.0), (y_s, y_t)):
        for k in range(2):
            pasted = x[k, 0] == value                      # everything else shows the same x_u
            assert ((x[k, 0] == value) | (x[k, 0] == 3.0)).all()
            assert torch.equal(y[k][pasted], y_gt[k][pasted]) and torch.equal(y[k][~pasted], y_u[k][~pasted])
            classes = set(y_gt[k].unique().tolist()) - {255}
            chosen = set(y_gt[k][pasted].unique().tolist())
            assert 255 not in chosen and len(chosen) == (len(classes) + 1) // 2      # ceil(n/2), no ignore
            assert all(pasted[y_gt[k] == c].unique().numel() == 1 for c in classes)  # whole classes
            assert (w[k][pasted] == 1).all() and (w[k][~pasted] == 0.25).all()       # 1 on GT, shared q


def test_masks_never_come_from_pseudo_labels(monkeypatch):
    x_s, y_s, x_t, y_t, x_u, y_u, q = _batch()
    seen = []
    mask = common.class_mix_mask
    monkeypatch.setattr(common, "class_mix_mask", lambda labels, *a, **k: seen.append(labels) or mask(labels, *a, **k))
    iidm.mixed_streams(x_s, y_s, x_t, y_t, (x_u, y_u, q), (x_u, y_u, q), torch.Generator(), _args())
    assert len(seen) == 2 and seen[0] is y_s and seen[1] is y_t


def test_q_everywhere_batch_selection_and_one_one():
    x_s, y_s, x_t, y_t, x_u, y_u, q = _batch()
    g = torch.Generator().manual_seed(2)
    (_, _, _, _, w), = iidm.mixed_streams(x_s, y_s, x_t, y_t, (x_u, y_u, q), None, g, _args(no_intra=True,
                                                                                             q_everywhere=True))
    assert (w == 0.25).all()
    drawn = set()
    for seed in range(20):                                 # DAFormer's batch union: 255 is a candidate
        (_, _, x, y, _), = iidm.mixed_streams(x_s, y_s, x_t, y_t, (x_u, y_u, q), None,
                                              torch.Generator().manual_seed(seed), _args(no_intra=True,
                                                                                         classmix_select="batch"))
        drawn |= set(y[x[:, 0] == 1.0].unique().tolist())
    assert 255 in drawn
    (name, weight, x, y, w), = iidm.mixed_streams(x_s, y_s, x_t, y_t, (x_u, y_u, q), (x_u, y_u, q), g,
                                                  _args(mix_strategy="one-one"))
    assert name == "loss_mix" and weight == 1.0 and set(x[:, 0].unique().tolist()) == {1.0, 2.0, 3.0}
    src, tgt = x[:, 0] == 1.0, x[:, 0] == 2.0
    assert torch.equal(y[src], y_s[src]) and torch.equal(y[tgt], y_t[tgt])
    assert (w[src | tgt] == 1).all() and (w[~(src | tgt)] == 0.25).all()


# ------------------------------------------------------------------ each flag changes what it should

T = ["--tau", "0.01"]  # confident everywhere, so that pseudo-labels and q matter within 3 iterations
FLAG_CASES = [  # (flags, baseline flags): the flag must change the trained weights after 3 iterations
    (["--no-src-sup"], []),
    (["--no-tgt-sup"], []),
    (["--no-inter"], []),
    (["--no-intra"], []),
    (["--mix-strategy", "two-two"], []),
    (["--mix-strategy", "one-one"], []),
    (["--lambda", "0.1"], []),
    (["--mu", "1"], []),
    (["--tau", "0.01"], []),
    (["--ema-alpha", "0.3", *T], T),
    (["--classmix-select", "batch"], []),
    (["--q-per-image", "--tau", "0.3"], ["--tau", "0.3"]),
    (["--q-everywhere", "--tau", "0.3"], ["--tau", "0.3"]),   # 0 < q < 1
    (["--no-jitter"], []),
    (["--no-blur"], []),
    (["--teacher-eval-bn", *T], T),
    (["--frozen-bn"], []),
    (["--rcs", "both"], []),
    (["--rcs", "none"], []),
    (["--rcs-min-pixels", "110"], []),   # 79-140 pixels per class and image in the generated labels
    (["--head-lr-mult", "1"], []),
    (["--weight-decay", "0", "--warmup-iters", "0"], ["--warmup-iters", "0"]),
    (["--warmup-iters", "0"], []),
    (["--n-labeled", "3"], []),
    (["--split-seed", "4"], []),
    (["--resize", "bilinear"], []),   # the generated images are resized to 64x32
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


@pytest.mark.parametrize("flags,needle", [
    (["--no-src-sup", "--no-tgt-sup"], "no supervised loss"),
    (["--mix-strategy", "two-two", "--no-intra"], "needs both"),
    (["--n-labeled", "9"], "--n-labeled 9"),
])
def test_bad_arguments(root, tmp_path, flags, needle):
    with pytest.raises(common.DataError, match=needle):
        run(root, tmp_path / "x", *flags)
    assert not (tmp_path / "x").exists()


def test_defaults_are_the_papers_and_daformers():
    """IIDM §Implementation Details and DAFormer's configs, written out here."""
    a = vars(iidm.parse_args([]))
    expect = {"iters": 40000, "batch_size": 2, "lr": 6e-5, "head_lr_mult": 10.0, "weight_decay": 0.01,
              "warmup_iters": 1500, "source_size": (1280, 720), "target_size": (1024, 512), "crop_size": (512, 512),
              "eval_res": "full", "init": "imagenet", "layers": [3, 4, 23, 3], "source": "gta5", "n_labeled": 100,
              "mix_strategy": "one-two", "lam": 1.0, "mu": 2.0, "tau": 0.968, "ema_alpha": 0.99, "rcs": "source",
              "rcs_temp": 0.01, "rcs_min_pixels": 3000, "classmix_select": "image", "q_per_image": False,
              "q_everywhere": False, "no_jitter": False, "no_blur": False, "teacher_eval_bn": False,
              "frozen_bn": False, "resize": "cv2"}
    assert {k: a[k] for k in expect} == expect
    assert iidm.parse_args(["--source", "synthia"]).source_size == (1280, 760)


def test_teacher_is_updated_before_the_step(root, tmp_path):
    """DAFormer order: EMA at the start of iteration i > 0, from the student of the end of i - 1, so the
    teacher after iteration 2 is alpha(1) = 0.5 of the teacher after 1 plus 0.5 of the student after 1."""
    run(root, tmp_path / "a", "--iters", "2", "--save-every", "1", "--keep-checkpoints")
    c1 = torch.load(tmp_path / "a" / "checkpoint_1.pth", weights_only=True)
    c2 = torch.load(tmp_path / "a" / "checkpoint_2.pth", weights_only=True)
    params = [k for k in c1["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert not torch.equal(c1["model"]["layer5.conv2d_list.0.weight"], c1["ema_model"]["layer5.conv2d_list.0.weight"])
    for k in params:
        assert torch.allclose(c2["ema_model"][k], 0.5 * c1["ema_model"][k] + 0.5 * c1["model"][k], atol=1e-7), k


def test_supervised_losses_average_over_all_pixels(root, tmp_path, monkeypatch):
    """eq. 9/10 as mmseg computes them: CE over all pixels, ignored ones included (pixel weight 1)."""
    calls = []
    weighted = common.ce_pixel_weighted
    monkeypatch.setattr(common, "ce_pixel_weighted", lambda logits, y, w: calls.append(w) or weighted(logits, y, w))
    monkeypatch.setattr(common, "ce_loss", lambda *a, **k: pytest.fail("ce_loss averages over valid pixels only"))
    run(root, tmp_path / "a", "--iters", "1", "--no-inter", "--no-intra")
    assert calls == [1.0, 1.0]                                      # L_s and L_t


def test_teacher_ema_uses_the_momentum_of_its_iteration(root, tmp_path):
    """eq. 5 with alpha_i = min(1 - 1/(i+1), 0.99) at the start of iteration i > 0 (DAFormer _update_ema(iter)):
    teacher_2 = 1/2 teacher_1 + 1/2 student_1, teacher_3 = 2/3 teacher_2 + 1/3 student_2. No warm-up and a
    larger lr, so that the student moves far enough from the teacher to tell the momenta apart."""
    run(root, tmp_path / "a", "--iters", "3", "--warmup-iters", "0", "--lr", "1e-3", "--save-every", "1",
        "--keep-checkpoints")
    c = {k: torch.load(tmp_path / "a" / f"checkpoint_{k}.pth", weights_only=True) for k in (1, 2, 3)}
    params = [k for k in c[1]["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k, alpha in ((2, 1 / 2), (3, 2 / 3)):
        gap = max((c[k - 1]["ema_model"][p] - c[k - 1]["model"][p]).abs().max().item() for p in params)
        assert gap > 1e-4
        for p in params:
            expect = alpha * c[k - 1]["ema_model"][p] + (1 - alpha) * c[k - 1]["model"][p]
            assert torch.allclose(c[k]["ema_model"][p], expect, rtol=1e-5, atol=1e-8), (k, p)


def test_mixed_images_get_daformers_colour_jitter(root, tmp_path, monkeypatch):
    """A15 / DAFormer strong_transform: colour jitter of strength 0.2 applied when U > 0.2 (color_jitter_p 0.2),
    kornia's per-image op order, on the concatenated mixed batch of both streams."""
    calls, jitter = [], common.color_jitter

    def spy(x, norm, g, **kw):
        state = g.get_state()
        out = jitter(x, norm, g, **kw)
        calls.append((x.clone(), norm, state, out.clone()))
        return out
    monkeypatch.setattr(common, "color_jitter", spy)
    run(root, tmp_path / "a", "--iters", "3")

    def again(call, **kw):
        g = torch.Generator()
        g.set_state(call[2])
        return jitter(call[0], call[1], g, **kw)
    fired = [c for c in calls if not torch.equal(c[0], c[3])]
    assert len(calls) == 3 and fired and all(c[0].shape[0] == 4 for c in calls)     # 2 streams x batch 2
    for call in calls:
        assert torch.equal(call[3], again(call, strength=0.2, gate=0.2, per_image_order=True))
    assert all(not torch.equal(c[3], again(c, strength=0.25, gate=0.2, per_image_order=True)) for c in fired)


def test_each_stream_loss_sees_its_own_augmented_images(root, tmp_path, monkeypatch):
    """Loop order: the student sees x_s, x_t, then the inter stream's and the intra stream's slice of the
    jittered mixed batch, in that order, every iteration."""
    inputs, jittered = [], []

    class Recorder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            inputs.append(x.detach().clone())
            return self.model(x)
    ddp, jitter = training.ddp, common.color_jitter
    monkeypatch.setattr(training, "ddp", lambda model, *a, **k: Recorder(ddp(model, *a, **k)))
    monkeypatch.setattr(common, "color_jitter", lambda *a, **k: jittered.append(jitter(*a, **k)) or jittered[-1])
    run(root, tmp_path / "a", "--iters", "2", "--no-blur")
    assert len(inputs) == 8 and len(jittered) == 2
    for i, x_all in enumerate(jittered):
        assert not torch.equal(x_all[:2], x_all[2:])
        assert torch.equal(inputs[4 * i + 2], x_all[:2]) and torch.equal(inputs[4 * i + 3], x_all[2:])


# ------------------------------------------------------------------ flags with non-default values (review 2)

B_ = "--lambda, --mu, --weight-decay, --rcs-min-pixels >= 0"


@pytest.mark.parametrize("flags,needle,left", [
    (["--lambda", "-1"], B_, []),
    (["--mu", "-0.5"], B_, []),
    (["--weight-decay", "-0.01"], B_, []),                          # was AdamW's ValueError
    (["--rcs-min-pixels", "-1"], B_, []),
    (["--rcs-temp", "0"], "--rcs-temp > 0", []),                    # was NaN class probabilities
    (["--crop-size", "0", "0"], "--crop-size 0 0: the inter-domain mix", []),   # 53x32 source onto 64x32 target
    (["--crop-size", "0", "0", "--no-intra"], "--crop-size 0 0: the inter-domain mix", []),
    (["--init", "/nonexistent/init.pth"], "file not found", []),    # left an empty run folder
    (["--rcs-min-pixels", "100000"], "no image holds more than 100000 pixels", ["rcs_counts_0.json"]),
    (["--rcs", "both", "--rcs-min-pixels", "100000", "--no-src-sup"], "no image holds more than 100000 pixels", []),
])
def test_refused_before_anything_is_written(root, tmp_path, flags, needle, left):
    """Bad values are one DataError (exit 2) raised before the run folder is written: no config.json, split.txt
    or empty folder of a run that never started; only the source's class-count cache, complete and reusable,
    may stay when rare-class sampling refuses its --rcs-min-pixels."""
    with pytest.raises(common.DataError, match=needle):
        run(root, tmp_path / "x", *flags)
    x = tmp_path / "x"
    assert sorted(p.name for p in x.iterdir()) == left if left else not x.exists()


def test_crop_size_0_0_without_the_inter_stream_is_accepted():
    a = iidm.parse_args([*TINY, "--crop-size", "0", "0", "--no-inter"])
    assert tuple(a.crop_size) == (0, 0) and a.no_inter and not a.no_intra
    assert iidm.parse_args([*TINY, "--crop-size", "0", "0", "--no-src-sup"]).no_inter   # implies --no-inter


def test_split_file_not_n_labeled_decides_whether_labeled_images_exist(root, tmp_path):
    """--split-file gives N (common.labeled_split): an empty file is refused like --n-labeled 0 (it crashed in
    the loader), a file with stems trains, and a contradicting explicit --n-labeled is refused."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(common.DataError, match="--split-file .*empty.txt leaves no labeled target image"):
        run(root, tmp_path / "x", "--n-labeled", "0", "--split-file", empty)
    assert not (tmp_path / "x").exists()
    stems = ["aachen_000000_000019", "bochum_000003_000019"]
    two = tmp_path / "two.txt"
    two.write_text("".join(s + "\n" for s in stems))
    with pytest.raises(common.DataError, match="--n-labeled 0 with --split-file .* of 2 stems"):
        run(root, tmp_path / "y", "--n-labeled", "0", "--split-file", two)
    run(root, tmp_path / "run", "--split-file", two, "--iters", "1")
    assert (tmp_path / "run" / "split.txt").read_text().split() == stems
    assert {"loss_s", "loss_t", "loss_inter", "loss_intra"} <= set(
        json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1]))
    _, ckpt = run(root, tmp_path / "src", "--n-labeled", "0", "--split-file", empty, "--no-tgt-sup", "--no-intra",
                  "--iters", "1")                                               # Table 4 row 1 from a file
    assert (tmp_path / "src" / "split.txt").read_text() == "" and "ema_model" in ckpt


def test_rcs_class_counts_follow_the_split_and_the_source(root, tmp_path, monkeypatch):
    """--rcs both: a second run in the same folder with another --split-seed samples the labeled target by the
    class counts of its own labeled images (the cached counts of the first run's split were reused); a source
    count cache of another dataset is refused instead of sampling from its images' indices."""
    seen = {}
    sampler = common.RareClassSampler
    monkeypatch.setattr(common, "RareClassSampler",
                        lambda counts, *a, **k: seen.__setitem__(a[3], counts) or sampler(counts, *a, **k))
    stems = common.SegmentationDataset("cityscapes", root / "cityscapes").stems()
    for split_seed in (0, 1):
        run(root, tmp_path / "run", "--rcs", "both", "--split-seed", split_seed, "--n-labeled", "3",
            "--rcs-min-pixels", "100", "--iters", "1")
        labeled = common.labeled_split(stems, 3, split_seed)[0]
        assert (tmp_path / "run" / "split.txt").read_text().split() == labeled
        data_t = common.SegmentationDataset("cityscapes", root / "cityscapes", stems=labeled)
        assert seen[1] == [common.class_pixel_counts(data_t, i) for i in range(3)]
    assert common.labeled_split(stems, 3, 0)[0] != common.labeled_split(stems, 3, 1)[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "rcs_counts_0.json").write_text(json.dumps([{"0": 500, "2": 460}]))
    with pytest.raises(common.DataError, match="class counts of 1 images, the source has 4"):
        run(root, tmp_path / "other", "--iters", "1")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["rcs_counts_0.json"]


def test_amp_reaches_the_evaluation_of_a_resumed_finished_run(root, tmp_path, monkeypatch):
    """--amp evaluates under bf16 autocast in the loop, and also when --resume finds the run finished."""
    dtypes = []
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda *a, **k: dtypes.append(k["amp_dtype"]) or evaluate(*a, **k))
    run(root, tmp_path / "run", "--amp", "--iters", "1")
    run(root, tmp_path / "run", "--amp", "--iters", "1", "--resume")
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_demo_baselines_resume_their_own_folders(tmp_path):
    """--demo --resume PATH continues IIDM from PATH and each baseline from its own checkpoint (they read
    IIDM's checkpoint and stopped with 'made with other settings')."""
    out = tmp_path / "run"
    flags = ["--demo", "--iters", "1", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)]
    iidm.main(flags)
    iidm.main([*flags, "--resume", str(out / "checkpoint.pth")])
    summary = json.loads((out / "demo.json").read_text())
    assert [b["name"] for b in summary["baselines"]] == ["target-only (L_t)", "source+target (L_s+L_t)"]
    for suffix in ("", "_target_only", "_source_target"):
        assert json.loads((tmp_path / f"run{suffix}" / "metrics.json").read_text())["iteration"] == 1
