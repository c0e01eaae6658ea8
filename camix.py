"""CAMix: Context-Aware Mixup for Domain Adaptive Semantic Segmentation (Zhou, Feng, Gu, Pang, Cheng, Lu, Shi,
Ma; IEEE TCSVT 2022) — GTA5/SYNTHIA -> Cityscapes, as the authors' code qianyuzqy/CAMix trains it.

    python camix.py --source gta5 --build-prior      # Table 1: 55.2 mIoU (19 classes); Q built once, then reused
    python camix.py --source gta5 --prior PRIOR.npy   # the same with a saved (or the authors') spatial prior
    python camix.py --source synthia --prior P.npy    # Table 3: 59.7 mIoU-13
    python camix.py --demo                            # CAMix, DACS, iDACS and source-only on the demo data, CPU
    python camix.py --source cityscapes --target acdc --build-prior   # Cityscapes -> ACDC (below; assumptions)

What is implemented (defaults = qianyuzqy/CAMix train_ucspa_gtav.py / train_ucspa_syn.py with
configs/configUDA_ucspa_{gtav,syn}.json). train_ucspa_gtav.py does not parse as released (line 633 ends in
a stray " v", a SyntaxError); that line is read without it, as train_ucspa_syn.py line 636 has it (phase A's
mix of image 0 under MixMask0, the twin of line 635). The released code is a fork of DACS (vikolss/DACS) and
trains in two phases:
  phase A, iterations i < W (--warmup-iters: 110k GTA5, 40k SYNTHIA; the paper never mentions it): plain
    DACS — ceil(n/2) classes of the source ground truth (ignore value included) pasted onto the target;
  phase B, i >= W: CAMix — the teacher's target softmax P is modulated by the spatial prior Q cropped with
    the target crop's window, argmax(Q . P) gives the modulated map, ceil(n/2) of its classes plus the
    active meta-class groups form the contextual mask M, and the TARGET is pasted onto the SOURCE
    (oneMix_inverse): images, labels (the RAW teacher argmax inside M), pixel weights and significance masks.
Mixed images get DACS's colour jitter and blur; the student learns from the source crops (L_seg) and the
mixed images (L_con); the teacher is an EMA of the student.

Paper -> code:
    §3.1 spatial prior Q, f^ = Q . f_teacher(X_T)                -> `prior` (built by `build_prior`), `contextual_mask`
    Eq. 1  M = 1 where Y^_T in c (half of the classes + meta-classes) -> `half_of_classes`, `expand_meta_classes`
    Eq. 2  X_M = M X_T + (1 - M) X_S                             -> `mix_target_onto_source` (x)
    Eq. 3  teacher EMA, alpha = min(1 - 1/(i+1), 0.99)           -> common.ema_update, after the step
    Eq. 4  Y_M = M Y^_T + (1 - M) Y_S  (Y^_T = raw teacher argmax) -> `mix_target_onto_source` (y)
    Eq. 5  P^ = mean of N teacher softmaxes on noisy copies        -> `significance_mask` (one batched forward)
    Eq. 6  zeta = -sum_c P^ log P^                                 -> `significance_mask`
    Eq. 7  H(t) = (beta + (1 - beta) e^{gamma (1 - t/t_max)^2}) K_sup -> `significance_threshold`
    §3.3   U_T = 1[zeta < H]                                       -> `significance_mask`
    Eq. 8  U_M = M U_T + (1 - M) U_S, U_S = 1                     -> `mix_target_onto_source` (u)
    Eq. 9  L_con = sum U_M CE / sum U_M (SRC)                      -> `consistency_loss` (--src-impl code|paper)
    Eq. 10 L_seg = CE on the source crops                          -> `loss_seg`
    Eq. 11 L_total = L_seg + lambda_con L_con                      -> `loss`
    Alg. 1 (sample, teacher forward, mixup at three levels, loss, SGD step, EMA) -> the training loop
Ablations: Table 2 -> --mix none|cowmix|cutmix|dacs|idacs|camix; Table 4 -> --mix idacs, --no-context,
--consistency ce|src; Table 5 -> --consistency src|mse|ce; Table 6 -> --mix none [--consistency src
--src-impl paper]; Table 1/3 "Source only" -> --source-only.

Paper vs code (the default follows the code; the flag gives the other):
 1 warm-up: 110k/40k iterations of DACS before CAMix, not in the paper (--warmup-iters 0 = CAMix throughout).
 2 optimiser: paper Adam wd 5e-5; code SGD 0.9, wd 5e-4, 10x head over DACS's duplicated parameter group
   (model/deeplabv2.py optim_parameters: 314 entries for 104 tensors) with the PyTorch-1.5 update
   (--optimizer adam-paper, --clean-param-groups). CAMix pins no torch version: the PyTorch-1.5 rule of its
   DACS base is assumed (--sgd-rule torch0.4: PyTorch <= 1.4, weight decay added into p.grad in place).
 3 target geometry: the code crops 512x512 from the FULL 2048x1024 Cityscapes image (data/augmentations.py
   drops DACS's halving) and cuts Q with the same window; validation at 1024x512 (--target-scale 0.5 = DACS).
 4 Q: "counting the class frequencies" in the paper; the code loads offline files (the CBST GTA5 prior
   prior_array.mat, 19x1024x2048; 19 SYNTHIA maps upsampled to 1024x2048) — `--prior`; `--build-prior`
   recomputes it from the source labels (CBST §4.4 recipe, assumptions A2-A4 below).
 5 Q only picks the classes and the mask: Y_M and the weight use the raw teacher output (paper Eq. 4 agrees).
 6 meta-classes: only two groups are active — {pole, traffic light, traffic sign} (a selected light or sign
   pulls in a present pole; a selected or added pole pulls in present lights and signs) and rider ->
   {bicycle, motorcycle} (one-way); flat, construction and nature groups are commented out.
 7 significance mask noise: the code's helper passes its clamp bounds swapped, so every copy gets the
   constant -0.2 and the N passes are identical (train-mode BN then removes the offset); --src-impl paper
   draws N(0, 0.1^2) clipped to +-0.2 (+-2 std for --sigmask-noise-std). K_sup = ln 19 (the paper: the
   sup of the entropies; it gives no beta, gamma), beta 0.75, gamma -5, t_max 130k (GTA5) / 10k
   (SYNTHIA, so U_T ~ 1 long before phase B starts; the paper: the maximum training step); U_T is
   thresholded at the network's output resolution (65x65) and bilinearly upsampled (soft edges); the
   entropy has no epsilon (a 0 probability gives NaN and U_T = 0 there) — all kept. Paper Eq. 7 typesets
   K_sup on the second term only; the code multiplies the bracket.
 8 SRC: the code multiplies the already averaged weighted CE (a scalar) by U_M and divides by sum U_M, so
   U_M cancels and L_con is DACS's loss (--src-impl code, default; the significance pass is then skipped
   unless --log-sigmask). --src-impl paper computes Eq. 9 per pixel (with the DACS weight inside). A
   --sigmask-* value, --log-sigmask or --src-impl paper that would change nothing is refused.
 9 lambda_con: 1 x DACS's confidence ratio w_t (share of target pixels with teacher max-prob >= 0.968) on
   pasted target pixels, 1 on source pixels; no ramp.
10 evaluation: the code evaluates the STUDENT every 2000 iterations and keeps the best (SYNTHIA by mIoU-16);
   Alg. 1 returns the teacher. metrics.json = final student; best_metrics.json = best of val (assumption A6).

Assumptions (numbered as first filed; A5 and A7 were dropped, A6 is item 10 above): A1 --target-scale 0.5
halves Q bilinearly with the image. A2 a built prior is normalised per
class (each class map sums to 1 over pixels; --prior-norm pixel: each pixel's column sums to 1). A3 the
SYNTHIA prior is counted at 1280x760 and upsampled like the authors' maps. A4 CBST's 70x70 smoothing
kernel is a Gaussian with sigma = 70/6 px at 2048 px width. A8 --mix none (Mean Teacher, Table 2/6) is
the mixing step with M = 1: the jittered target with raw pseudo-labels. A9 CutMix / CowMix use ClassMix's
mask generators (classmix_ssl.py), source pasted onto target. A10 the warm-up is applied to the
target->source mixes (camix, idacs) only. Seeding: python/numpy/torch and every draw follow from --seed
and the iteration (exact resume); the authors seed numpy only (GTA5) or numpy and torch (SYNTHIA). L_seg
is backpropagated right after its forward (the code: one backward of Eq. 11's sum): the same summed gradient
(bit-equal on the CPU), one graph alive at a time.
--demo trains a light network (--layers 1 1 1 1 --width 32) from the demo init with Adam, the warm-up
and t_max scaled to its length; it demonstrates the loop, not the paper's numbers. Beside DACS and
source-only it trains iDACS (Table 4's baseline: the same warm-up, then half of the raw teacher argmax's
classes pasted target onto source), the row CAMix's own components (spatial prior, meta-classes) add to.

Cityscapes as the source, ACDC or Dark Zurich as the target (CAMix reports neither; every setting here is
assumption A11):
    python camix.py --source cityscapes --target acdc --build-prior
    python camix.py --source cityscapes --target dark_zurich --build-prior
--target cityscapes (default), acdc (rgb_anon/<condition>/train; --acdc-conditions) or dark_zurich (train night
images). A11: the Cityscapes source is resized to 1024x512 (DACS's and DAFormer's Cityscapes size) and gets
GTA5's schedule (warm-up 110k, t_max 130k); the target keeps CAMix's full-resolution geometry on its own frame
(1920x1080, 512x512 crops; x --target-scale), val is fit into 960x540 (the 1024x512 of Cityscapes at the same
scale, DAFormer's ACDC/Dark Zurich test resize) and scored at full label resolution (as mmseg does for these
targets). Q is counted from the Cityscapes source labels on the target's 1080x1920 frame; --build-prior writes
<prior>.json beside it (source, target, frame) and a --prior whose .json names another source or target is
refused, as is one of another shape or the authors' GTA5/SYNTHIA per-class folder. A source equal to the target is
refused; metrics.json names the target ("target"; ACDC adds a per-condition block).
--compile (README 'Compiled step'): torch.compile, in place, of the student's training forward and the EMA
teacher (evaluation eager; checkpoints and exact resume unchanged). --optimizer adam-paper / adam are fused on
CUDA, foreach elsewhere; the code's SGD is the per-listing LegacySGD.
"""
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (250000, "CAMix configs/configUDA_ucspa_gtav.json num_iterations"),
    "batch_size": (2, "2 source + 2 target; CAMix configUDA_ucspa_*.json"),
    "lr": (2.5e-4, "CAMix configUDA_ucspa_*.json; head x10"),
    "seed": (1, "CAMix configUDA_ucspa_*.json"),
    "source_size": (None, "GTA5 1280 720, SYNTHIA 1280 760 (CAMix gta5_dataset.py / synthia_dataset.py; paper §4.2)"),
    "target_size": ((2048, 1024), "full resolution: CAMix data/augmentations.py RandomCrop_city without "
                                  "DACS's halving; x --target-scale"),
    "crop_size": ((512, 512), "CAMix configUDA_ucspa_*.json input_size"),
    "eval_res": ("half", "CAMix evaluateUDA.py (labels at 1024x512)"),
    "init": ("coco", "CAMix configUDA_ucspa_*.json 'pretrained: coco'"),
    "sgd_rule": ("torch1.5", "assumption: qianyuzqy/CAMix, a 2021 DACS fork, names no PyTorch version"),
    "eval_every": (2000, "CAMix configUDA_ucspa_*.json val_per_iter"),
    "save_every": (2000, "CAMix configUDA_ucspa_*.json save_checkpoint_every"),
}
PRESETS = {  # per source: warm-up (cfg warm_up_iter), t_max (hard-coded max_iter), source resize
    "gta5": {"warmup_iters": 110000, "sigmask_tmax": 130000, "source_size": (1280, 720)},
    "synthia": {"warmup_iters": 40000, "sigmask_tmax": 10000, "source_size": (1280, 760)},
    "demo": {"warmup_iters": 0.44, "sigmask_tmax": 0.52, "source_size": None},  # GTA5's 110k/130k of 250k, x --iters
    "cityscapes": {"warmup_iters": 110000, "sigmask_tmax": 130000, "source_size": (1024, 512)},  # A11 (assumption)
}
DEMO = {"source": "demo", "iters": 400, "lr": 1e-3, "optimizer": "adam", "layers": [1, 1, 1, 1],
        "width": 32, "init": "demo", "source_size": [128, 64], "target_size": [128, 64], "val_size": [128, 64],
        "crop_size": [64, 64], "build_prior": True, "eval_every": 0, "save_every": 100, "log_every": 25, "workers": 0}
MIXES = ("camix", "idacs", "dacs", "none", "cutmix", "cowmix")
WARMED_MIXES = ("camix", "idacs")  # A10
LN19 = math.log(19)
POLE, LIGHT, SIGN, RIDER, MOTORCYCLE, BICYCLE = 5, 6, 7, 12, 17, 18


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--source", choices=["gta5", "synthia", "cityscapes", "demo"], default="gta5",
                   help="source domain (labeled)")
    training.add_target_arg(p)
    p.add_argument("--source-only", action="store_true",
                   help="baseline: supervised source loss only, no teacher (Table 1/3 'Source only')")
    p.add_argument("--mix", choices=MIXES, default="camix",
                   help="phase-B mixing (Table 2): camix = contextual mask, target onto source (default); idacs = "
                        "raw teacher argmax, target onto source (Table 4 baseline); dacs = source classes onto "
                        "the target throughout; none = Mean Teacher (A8); cutmix / cowmix = boxes / cow masks, "
                        "source onto target (A9)")
    p.add_argument("--warmup-iters", type=int, default=None,
                   help="phase A (DACS) length before the --mix phase (default: 110000 GTA5, 40000 SYNTHIA for "
                        "camix/idacs, CAMix configs warm_up_iter; 0 for the other mixes, A10)")
    p.add_argument("--no-context", action="store_true",
                   help="camix without the meta-class expansion (Table 4 'SP' row)")
    p.add_argument("--no-spatial-prior", action="store_true",
                   help="camix with Q = 1: classes and mask from the raw teacher argmax (not a paper row)")
    p.add_argument("--consistency", choices=["src", "ce", "mse"], default="src",
                   help="L_con: significance-reweighted CE (Eq. 9), confidence-weighted CE, or MSE on softmaxes "
                        "(Table 5; code consistency_loss CE/MSE)")
    p.add_argument("--src-impl", choices=["code", "paper"], default="code",
                   help="SRC as the code computes it (U_M cancels: = the ce row; noise the constant -0.2) or per "
                        "pixel as Eq. 9 defines it (Gaussian noise, --sigmask-noise-std); --consistency src only")
    p.add_argument("--log-sigmask", action="store_true",
                   help="with --consistency src --src-impl code only (refused otherwise): run the significance pass "
                        "anyway (the code's exact arithmetic) and log the share of kept pixels")
    p.add_argument("--sigmask-passes", type=int, default=8,
                   help="N teacher passes of Eq. 5 (paper §4.2; code T=8). This and the other --sigmask-* flags act "
                        "only where the pass runs, --consistency src with --src-impl paper or --log-sigmask; "
                        "another value is refused elsewhere")
    p.add_argument("--sigmask-tmax", type=int, default=None,
                   help="t_max of Eq. 7 (default: 130000 GTA5, 10000 SYNTHIA; hard-coded in train_ucspa_*.py)")
    p.add_argument("--sigmask-beta", type=float, default=0.75,
                   help="beta of Eq. 7 (train_ucspa_*.py, the line computing H)")
    p.add_argument("--sigmask-gamma", type=float, default=-5.0,
                   help="gamma of Eq. 7 (train_ucspa_*.py sigmoid_ramp_up)")
    p.add_argument("--sigmask-noise-std", type=float, default=0.1,
                   help="--src-impl paper only (refused otherwise): std of the Gaussian input noise, clipped to +-2 std "
                        "(code noise_scale 0.1, bounds +-0.2)")
    p.add_argument("--prior", default=None,
                   help="spatial prior: .npy of shape (19,H,W) or (H,W,19) on the target's full-resolution "
                        "frame, or a folder of probarray_cls{0..18}.npy (the authors' SYNTHIA .mat maps, converted); "
                        "written here by --build-prior (default <out-dir>/spatial_prior.npy)")
    p.add_argument("--build-prior", action="store_true",
                   help="count the source label frequencies per pixel, smooth, normalise, save to --prior, train")
    p.add_argument("--prior-norm", choices=["class", "pixel"], default="class",
                   help="--build-prior normalisation: each class map sums to 1 (A2) or each pixel's column")
    p.add_argument("--target-scale", type=float, default=1.0,
                   help="scale of the training target images and Q (1.0 = full resolution, CAMix; 0.5 = DACS)")
    p.add_argument("--val-size", type=int, nargs=2, default=[1024, 512], metavar=("W", "H"),
                   help="resize of target val images (CAMix evaluateUDA.py; "
                        "--target acdc/dark_zurich: 960 540)")
    p.add_argument("--tau", type=float, default=0.968, help="confidence threshold of w_t (train_ucspa_*.py)")
    p.add_argument("--ema-alpha", type=float, default=0.99, help="teacher EMA momentum (train_ucspa_*.py)")
    p.add_argument("--consistency-weight", type=float, default=1.0,
                   help="lambda_con of Eq. 11 (CAMix configs consistency_weight)")
    p.add_argument("--no-jitter", action="store_true", help="no colour jitter on mixed images (config: on)")
    p.add_argument("--no-blur", action="store_true", help="no Gaussian blur on mixed images (config: on)")
    p.add_argument("--aspp-full", action="store_true",
                   help="clean variant: sum all four ASPP branches (the authors' model sums two)")
    p.add_argument("--teacher-eval-bn", action="store_true",
                   help="clean variant: teacher with eval-mode BN and EMA-averaged statistics (code: train mode)")
    p.add_argument("--clean-param-groups", action="store_true",
                   help="clean variant: each tensor once in the 1x group (the authors' group repeats them)")
    p.add_argument("--optimizer", choices=["sgd", "adam-paper", "adam"], default="sgd",
                   help="sgd = the code's SGD 0.9 / wd 5e-4; adam-paper = paper §4.2 Adam wd 5e-5 (head x10); "
                        "adam = the random-init demo's Adam")
    training.set_target_defaults(p, argv, sizes=("target_size", "val_size"))
    args = training.parse_with_demo(p, DEMO, argv)
    training.check_args(args)
    training.check_target(args, args.source, args.target)
    if args.prior is not None and Path(args.prior).is_dir() and args.target != "cityscapes":
        raise common.DataError(f"--prior {args.prior}: the authors' per-class maps are GTA5/SYNTHIA priors on the "
                               f"Cityscapes frame; with --target {args.target} build one (--build-prior)")
    training.check_optimizer_flags(args)
    refuse_idle_sigmask_flags(args, p)
    preset = dict(PRESETS[args.source])
    if args.source == "demo":   # the GTA5 schedule scaled to the demo's length
        preset.update(warmup_iters=round(preset["warmup_iters"] * args.iters),
                      sigmask_tmax=max(1, round(preset["sigmask_tmax"] * args.iters)))
    if args.sigmask_tmax is None:
        args.sigmask_tmax = preset["sigmask_tmax"]
    if args.warmup_iters is None:
        args.warmup_iters = preset["warmup_iters"] if args.mix in WARMED_MIXES and not args.source_only else 0
    if args.source_size is None:
        args.source_size = preset["source_size"]
    if not 0 <= args.warmup_iters <= args.iters:
        raise common.DataError(f"--warmup-iters {args.warmup_iters}: expected 0..--iters ({args.iters}); "
                               f"the default for --source {args.source} is {preset['warmup_iters']}")
    if (args.no_context or args.no_spatial_prior) and args.mix != "camix":
        raise common.DataError("--no-context / --no-spatial-prior change the camix mask: use them with --mix camix")
    if not 0 < args.ema_alpha < 1 or not 0 < args.tau <= 1 or args.sigmask_passes < 1 or args.sigmask_tmax < 1:
        raise common.DataError("--ema-alpha in (0,1), --tau in (0,1], --sigmask-passes >= 1, --sigmask-tmax >= 1 "
                               "expected")
    if not 0 < args.target_scale <= 1:
        raise common.DataError(f"--target-scale {args.target_scale}: expected a value in (0, 1]")
    if min(args.val_size) < 1:
        raise common.DataError(f"--val-size {args.val_size[0]} {args.val_size[1]}: expected positive W H")
    args.target_size = [max(1, round(s * args.target_scale)) for s in args.target_size]
    if needs_prior(args) and args.prior is None and not args.build_prior and not args.eval_only:
        raise common.DataError("--mix camix needs the spatial prior: --prior PATH or --build-prior "
                               "(or --no-spatial-prior)")
    if needs_prior(args) and args.prior is not None and not args.build_prior and not Path(args.prior).exists():
        raise common.DataError(f"--prior {args.prior}: file not found (expected a .npy of shape (19,H,W) or a "
                               f"folder of probarray_cls{{0..18}}.npy; --build-prior writes one)")
    return args


def refuse_idle_sigmask_flags(args, parser):
    """DataError for a significance-mask flag that would change nothing: the pass runs only with a teacher and
    --consistency src, and then only for --src-impl paper or --log-sigmask; only --src-impl paper draws noise."""
    no_src = ("--source-only trains no teacher" if args.source_only else
              f"--consistency {args.consistency} has no significance mask" if args.consistency != "src" else None)
    if args.src_impl != parser.get_default("src_impl") and no_src:
        raise common.DataError(f"--src-impl {args.src_impl}: no effect, {no_src}")
    if args.log_sigmask and (no_src or args.src_impl == "paper"):
        raise common.DataError(f"--log-sigmask: no effect, {no_src or '--src-impl paper runs the pass anyway'} "
                               f"(it adds the pass to --consistency src --src-impl code)")
    given = [name for name in ("passes", "tmax", "beta", "gamma", "noise_std")
             if getattr(args, "sigmask_" + name) != parser.get_default("sigmask_" + name)]
    skipped = no_src or (None if args.src_impl == "paper" or args.log_sigmask else
                         "--src-impl code skips the significance pass (U_M cancels) unless --log-sigmask")
    if given and skipped:
        flag = given[0]
        raise common.DataError(f"--sigmask-{flag.replace('_', '-')} {getattr(args, 'sigmask_' + flag)}: no effect, "
                               f"{skipped}")
    if "noise_std" in given and args.src_impl == "code":   # the code's swapped clamp bounds
        raise common.DataError(f"--sigmask-noise-std {args.sigmask_noise_std}: no effect, --src-impl code adds the "
                               f"constant -0.2 to every copy (Gaussian noise: --src-impl paper)")


def needs_prior(args):
    """Whether any iteration builds the contextual mask from Q (camix phase B with the spatial prior)."""
    return (args.mix == "camix" and not args.no_spatial_prior and not args.source_only
            and args.warmup_iters < args.iters)


# ---------------------------------------------------------------------------------- spatial prior Q

def build_prior(source, frame, norm="class", sigma_at_2048=70 / 6):
    """Q (§3.1; CBST §4.4): per-pixel class counts of the source labels on `frame` (H, W), Gaussian-smoothed
    (sigma 70/6 px at 2048 px width, A4), each class map normalised to sum 1 (A2) or each pixel to sum 1."""
    h, w = frame
    down = 4 if min(h, w) >= 256 else 1   # count at 1/4 resolution; Q is smooth
    hc, wc = h // down, w // down
    counts = np.zeros(19 * hc * wc, dtype=np.int64)
    for index in range(len(source)):
        label = common.read_label(source.pairs[index][1], source.kind)
        label = np.asarray(Image.fromarray(label).resize((wc, hc), Image.NEAREST))
        flat = label.ravel().astype(np.int64)
        valid = flat < 19
        counts += np.bincount(flat[valid] * hc * wc + np.flatnonzero(valid), minlength=19 * hc * wc)
    q = torch.from_numpy(counts.reshape(1, 19, hc, wc)).double()
    sigma = sigma_at_2048 * wc / 2048
    kernel = min(2 * round(3 * sigma) + 1, 2 * ((min(hc, wc) - 1) // 2) + 1)   # reflect padding needs k//2 < side
    if sigma > 0 and kernel > 1:
        q = common.blur_batch(q, torch.full((1,), sigma, dtype=torch.float64), (kernel, kernel))
    q = F.interpolate(q, size=(h, w), mode="bilinear", align_corners=True)[0] if down > 1 else q[0]
    return normalise_prior(q, norm).float().numpy()


def normalise_prior(q, norm):
    """Each class map to sum 1 over pixels ('class', absent classes stay 0) or each pixel to sum 1 ('pixel')."""
    total = q.sum((1, 2), keepdim=True) if norm == "class" else q.sum(0, keepdim=True)
    return q / total.clamp(min=1e-30)


def load_prior(path, frame):
    """A (19, H, W) float32 prior on `frame` from .npy ((19,H,W) or (H,W,19)) or a folder of 19 per-class
    .npy maps (upsampled bilinearly with align_corners=True, as CAMix cityscapes_loader.py does)."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"probarray_cls{k}.npy" for k in range(19)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise common.DataError(f"--prior {path}: missing {', '.join(missing[:3])} (expected 19 maps "
                                   f"probarray_cls0.npy ... probarray_cls18.npy)")
        maps = [_read_npy(f) for f in files]
        if any(m.ndim != 2 or m.shape != maps[0].shape for m in maps):
            raise common.DataError(f"--prior {path}: expected 19 two-dimensional maps of one size")
        q = torch.from_numpy(np.stack(maps).astype(np.float32))[None]
        prior = F.interpolate(q, size=frame, mode="bilinear", align_corners=True)[0].numpy()
    else:
        prior = _read_npy(path)
        if prior.ndim == 3 and prior.shape[-1] == 19 and prior.shape[0] != 19:
            prior = prior.transpose(2, 0, 1)   # CAMix's loader layout H x W x C
        if prior.ndim != 3 or prior.shape != (19, *frame):
            raise common.DataError(f"--prior {path}: shape {tuple(prior.shape)}, expected (19, {frame[0]}, "
                                   f"{frame[1]}) (19 classes on the target's full-resolution frame)")
    prior = np.ascontiguousarray(prior, dtype=np.float32)
    if not np.isfinite(prior).all() or (prior < 0).any():
        raise common.DataError(f"--prior {path}: expected finite, non-negative values")
    return prior


def _read_npy(path):
    """np.load with a one-line error for unreadable files (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise common.DataError(f"--prior {path}: not a readable .npy array ({exc})") from None


class TargetWithWindow(common.SegmentationDataset):
    """Cityscapes train crops with the crop's top-left corner, to cut Q from the same window (the 6th item of
    CAMix data/cityscapes_loader.py is Q's crop; here Q stays on the device and `prior_crops` cuts it)."""

    def __getitem__(self, item):
        index, seed, _ = item
        rgb = self.load(index)[0]
        h, w = rgb.shape[:2]
        ch, cw = self.crop if self.crop is not None and tuple(self.crop) != (0, 0) else (h, w)
        rng = np.random.default_rng(seed)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return {"image": common.normalise(rgb[y0:y0 + ch, x0:x0 + cw], self.norm), "window": torch.tensor([y0, x0])}


def prior_crops(prior, window, size):
    """Q (19, H, W) on the device cut at each image's window (N, 2) host tensor of (y0, x0): (N, 19, h, w)."""
    h, w = size
    return torch.stack([prior[:, y0:y0 + h, x0:x0 + w] for y0, x0 in window.tolist()])


# ---------------------------------------------------------------------------------- masks and mixing

def half_of_classes(labels, generator):
    """(present, chosen) per map, (N,256) bool: ceil(n/2) of the n present classes drawn uniformly without
    replacement (the code's np.random.choice(n, (n + n % 2) / 2))."""
    n_img = labels.shape[0]
    present = torch.zeros(n_img, 256, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.reshape(n_img, -1).long(), True)
    k = (present.sum(1) + 1) // 2
    scores = torch.rand(n_img, 256, generator=generator).to(labels.device, non_blocking=True)
    rank = scores.masked_fill(~present, 2.0).argsort(1).argsort(1)
    return present, present & (rank < k[:, None])


def expand_meta_classes(present, chosen):
    """The two active meta-class groups of train_ucspa_*.py, in the code's order; only present classes are added."""
    chosen = chosen.clone()
    chosen[:, POLE] |= (chosen[:, LIGHT] | chosen[:, SIGN]) & present[:, POLE]   # light or sign -> pole
    chosen[:, LIGHT] |= chosen[:, POLE] & present[:, LIGHT]                     # pole -> light and sign
    chosen[:, SIGN] |= chosen[:, POLE] & present[:, SIGN]
    chosen[:, BICYCLE] |= chosen[:, RIDER] & present[:, BICYCLE]                # rider -> bicycle, motorcycle
    chosen[:, MOTORCYCLE] |= chosen[:, RIDER] & present[:, MOTORCYCLE]          # (one-way)
    return chosen


def contextual_mask(prob_t, prior, generator, context=True):
    """Eq. 1 with §3.1: (M, modulated map) — M = 1 where argmax(Q . P) is one of half of its classes plus
    the meta-class expansion; prior None = Q of ones."""
    modulated = (prob_t if prior is None else prior * prob_t).argmax(1)
    present, chosen = half_of_classes(modulated, generator)
    if context:
        chosen = expand_meta_classes(present, chosen)
    return common.class_mask(modulated, chosen), modulated


def target_pixels(mix, y_s, y_raw, prob_t, prior, generator, args):
    """1 on the pixels of the mixed image that come from the target image, for one phase's mixing rule."""
    n, h, w = y_raw.shape
    if mix == "dacs":     # phase A and --mix dacs: ceil(n/2) source GT classes incl. 255 pasted onto the target
        return 1 - common.class_mix_mask(y_s, generator, rule="ceil", drop_ignore=False)
    if mix == "idacs":    # Table 4 baseline: raw teacher argmax, target onto source
        return common.class_mix_mask(y_raw, generator, rule="ceil", drop_ignore=False)
    if mix == "camix":
        return contextual_mask(prob_t, None if args.no_spatial_prior else prior, generator, not args.no_context)[0]
    if mix == "none":     # Mean Teacher (A8)
        return torch.ones_like(prob_t[:, 0])
    box = (common.cutmix_mask if mix == "cutmix" else common.cowmix_mask)(n, h, w, generator, y_raw.device)
    return 1 - box        # 1 = pixel of the source image in the ClassMix generators (A9)


def mix_target_onto_source(T, x_s, y_s, x_t, y_raw, w_t, u_t=None):
    """Eq. 2, 4, 8 (oneMix_inverse): T x_T + (1 - T) x_S for images, labels (raw teacher argmax in T),
    the pixel weight (w_t on target pixels, 1 on source ones) and the significance mask (U_T vs U_S = 1)."""
    ones = torch.ones_like(T)
    return (common.one_mix(T, x_t, x_s), common.one_mix(T, y_raw, y_s), common.one_mix(T, w_t, ones),
            None if u_t is None else common.one_mix(T, u_t, ones))


# ---------------------------------------------------------------------------------- significance mask, losses

def significance_threshold(i, t_max, beta=0.75, gamma=-5.0, k_sup=LN19):
    """Eq. 7 as the code computes it: (beta + (1 - beta) exp(gamma (1 - i/t_max)^2)) K_sup; ramp = 1 from t_max."""
    ramp = 1.0 if i >= t_max else math.exp(gamma * (1 - i / t_max) ** 2)
    return (beta + (1 - beta) * ramp) * k_sup


@torch.no_grad()
def significance_mask(teacher, x_t, threshold, passes, noise, size, amp):
    """Eq. 5-7 and U_T: N noisy copies in ONE teacher forward (train-mode BN sees all N*B images, as the
    code), mean softmax, entropy without epsilon, 1[zeta < H] at output resolution, bilinearly upsampled.
    `noise(x)` returns the input perturbation."""
    b = x_t.shape[0]
    copies = x_t.repeat(passes, 1, 1, 1)            # [img1, img2, img1, img2, ...] as images.repeat((T,1,1,1))
    copies = copies + noise(copies)
    with amp.autocast():
        prob = teacher(copies).float().softmax(1)
    mean = prob.view(passes, b, *prob.shape[1:]).mean(0)
    entropy = -(mean * mean.log()).sum(1, keepdim=True)   # NaN where a probability is 0: U_T = 0 there
    return common.upsample((entropy < threshold).float(), size)[:, 0]


def sigmask_noise(impl, std, generator):
    """The input perturbation of the N passes: the code's constant -0.2 (clamp bounds swapped) or the
    intended N(0, std^2) clipped to +-2 std (the code's 0.1 / +-0.2; --src-impl paper), drawn on the device
    from a seeded generator."""
    if impl == "code":
        return lambda x: torch.full_like(x, -0.2)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))

    def draw(x):
        g = torch.Generator(x.device).manual_seed(seed)
        return (torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * std).clamp(-2 * std, 2 * std)
    return draw


def consistency_loss(logits_m, y_m, weight, u_m, kind, impl):
    """L_con (Eq. 9 / Table 5) on the mixed batch; CE rows: per-pixel CE x weight.

    ce: mean over all pixels (ignored ones count in the denominator; CrossEntropyLoss2dPixelWiseWeighted).
    src/code: that scalar s times U_M, summed, over sum U_M (= s; 0 when U_M = 0), as train_ucspa_*.py.
    src/paper: sum U_M w CE / sum U_M per pixel. u_m None (code mode without the pass) = s.
    """
    ce = F.cross_entropy(logits_m.float(), y_m, ignore_index=common.IGNORE, reduction="none") * weight
    if kind == "ce" or u_m is None:
        return ce.mean()
    total = u_m.sum()
    numerator = (ce.mean() * u_m).sum() if impl == "code" else (u_m * ce).sum()
    return numerator / torch.where(total == 0, torch.ones_like(total), total)


def mse_consistency(logits_m, prob_t, w_t):
    """Table 5 MSE row: w_t x mean (softmax(student on X_M) - P)^2 with P the teacher softmax of the UN-mixed
    target (the DACS/CAMix code compares mixed regions with the wrong image; kept)."""
    return w_t * common.mse_softmax(logits_m, prob_t)


def build_optimizer(student, args):
    """The code's LegacySGD over the duplicated groups, the paper's Adam (wd 5e-5, head x10) or the demo's Adam."""
    if args.optimizer == "adam-paper":
        return torch.optim.Adam(common.param_groups(student, args.lr, official_duplicates=False), lr=args.lr,
                                betas=(0.9, 0.999), weight_decay=5e-5,
                                **common.adam_kernels(next(student.parameters()).device))
    return common.deeplab_optimizer(student, args.lr, args.optimizer, not args.clean_param_groups, args.sgd_rule)


def prior_for_run(args, source, target_kind, target_root, out_dir):
    """Q on the training frame: loaded (--prior) or built from the source labels on the target's full-resolution
    frame (--build-prior) and saved with a <prior>.json naming its source, target and frame; a prior whose .json
    names another source or target is refused (a file without one is checked by its shape only)."""
    frame_w, frame_h = common.image_size(common.dataset_files(target_kind, target_root)[0][0][0])
    frame = (frame_h, frame_w)
    record = {"source": args.source, "target": args.target, "frame": list(frame)}
    sidecar = Path(args.prior).with_suffix(".json") if args.prior is not None else None
    if not args.build_prior and sidecar is not None and sidecar.is_file():
        built = json.loads(sidecar.read_text())
        if {k: built.get(k) for k in record} != record:
            raise common.DataError(f"--prior {args.prior}: built for --source {built.get('source')} --target "
                                   f"{built.get('target')} on {built.get('frame')} ({sidecar}); this run: --source "
                                   f"{args.source} --target {args.target} on {list(frame)} (use --build-prior)")
    if args.build_prior:
        count_frame = frame if args.source != "synthia" else tuple(args.source_size[::-1])   # A3
        prior = build_prior(source, count_frame, args.prior_norm)
        if count_frame != frame:   # as the authors' SYNTHIA maps are upsampled to the Cityscapes frame
            prior = F.interpolate(torch.from_numpy(prior)[None], size=frame, mode="bilinear",
                                  align_corners=True)[0].numpy()
        path = Path(args.prior or Path(out_dir) / "spatial_prior.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        with common.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, prior)
        common.atomic_write_text(path.with_suffix(".json"), json.dumps(record))
        args.prior = str(path)
    prior = load_prior(args.prior, frame)
    train_frame = (args.target_size[1], args.target_size[0])
    if train_frame != frame:   # --target-scale / --target-size: Q resized with the image (A1)
        prior = F.interpolate(torch.from_numpy(prior)[None], size=train_frame, mode="bilinear",
                              align_corners=True)[0].numpy()
    return prior


def train(args):
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    training.apply_world(args, dist, device)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    style, norm = common.init_convention(args.init)
    common.seed_everything(args.seed)
    out_dir = Path(args.out_dir or training.default_out_dir(
        "camix", args.source + ("_source_only" if args.source_only else "" if args.mix == "camix" else "_" + args.mix),
        None, args.seed, args.target))
    synthia = args.source == "synthia"   # 19-way head; mIoU-16 and mIoU-13 read off the 19x19 matrix
    # ---------------------------------------------------------------- data
    source_kind, source_root, target_kind, target_root = training.data_roots(args, args.source, args.target)
    val = training.target_val(target_kind, target_root, args.val_size, args.eval_res, norm,
                              conditions=args.acdc_conditions)
    build = lambda: common.DeepLabV2(19, aspp_full=args.aspp_full, style=style, layers=args.layers,  # noqa: E731
                                     width=args.width)
    student = training.prepare_model(build(), device, amp)
    if args.eval_only:
        return training.eval_only(args, student, val, device, out_dir, synthia, dist=dist)
    crop = args.crop_size if min(args.crop_size) > 0 else None
    source = common.SegmentationDataset(source_kind, source_root, resize=args.source_size, interp="bicubic",
                                        crop=crop, norm=norm)
    target_resize = tuple(args.target_size)
    if needs_prior(args):
        if crop is not None and (crop[0] > target_resize[1] or crop[1] > target_resize[0]):
            raise common.DataError(f"--crop-size {crop[0]} {crop[1]} exceeds the target frame "
                                   f"{target_resize[0]}x{target_resize[1]} (Q is cut with the crop window)")
        with training.main_first(dist):   # rank 0 builds and saves Q, the other ranks load that file
            if dist.main or not args.build_prior:
                prior = prior_for_run(args, source, target_kind, target_root, out_dir)
            else:
                args.prior = str(Path(args.prior or Path(out_dir) / "spatial_prior.npy"))   # as rank 0 sets it
                load_only = copy.copy(args)
                load_only.build_prior = False
                prior = prior_for_run(load_only, source, target_kind, target_root, out_dir)
        target = TargetWithWindow(target_kind, target_root, resize=target_resize, crop=crop, norm=norm,
                                  conditions=args.acdc_conditions)
    else:
        prior = None
        target = common.SegmentationDataset(target_kind, target_root, resize=target_resize, crop=crop, norm=norm,
                                            conditions=args.acdc_conditions)
    Q = None if prior is None else torch.from_numpy(prior).to(device)   # on the device once, cut per batch
    # ---------------------------------------------------------------- models, optimiser
    training.initialise(student, args.init, norm, args.data_root)
    teacher = None if args.source_only else training.prepare_model(      # train-mode BN as the authors'
        common.ema_teacher(student, build, train_bn=not args.teacher_eval_bn), device, amp)
    optimizer = build_optimizer(student, args)
    scheduler = common.lr_scheduler(optimizer, lambda i: common.poly_factor(i, args.iters))
    start = 0
    ckpt = training.resume_state(args, out_dir, 19)
    if ckpt is not None:
        start = training.restore_training(ckpt, student, optimizer, scheduler, teacher, args.seed, dist)
    training.write_run_files(out_dir, args, dist=dist)
    model = training.ddp(student, dist, device, args.sync_bn)   # training forwards; `student` for the rest
    training.compile_networks(args, model, teacher)               # --compile: in place, checkpoints unchanged
    loader_s = training.shuffled_loader(source, args, 0, start, dist=dist)
    loader_t = None if args.source_only else training.shuffled_loader(target, args, 1, start, dist=dist)
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    use_sigmask = args.consistency == "src" and (args.src_impl == "paper" or args.log_sigmask)
    best = json.loads((out_dir / "best_metrics.json").read_text()) if (
        out_dir / "best_metrics.json").is_file() and start > 0 else None
    metrics = None  # the last evaluation
    # ---------------------------------------------------------------- training loop (train_ucspa_*.py order)
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        student.train()
        g = common.step_generator(args.seed, i, dist.rank)
        optimizer.zero_grad(set_to_none=True)
        x_s, y_s = training.next_batch(loader_s, device)
        with training.cast_once(amp):                                   # the weights cast once for both passes
            with training.grad_sync(model, last=teacher is None):
                with amp.autocast():
                    loss_seg = common.ce_loss(common.upsample(model(x_s), y_s.shape[1:]), y_s)       # Eq. 10
                amp.backward(loss_seg)    # before the mixed forward: one graph alive; the gradients add up (Eq. 11)
            losses = {"loss_seg": loss_seg.detach()}
            if teacher is not None:
                batch = next(loader_t)
                x_t = training.batch_images(batch, device)
                prior = None if Q is None else prior_crops(Q, batch["window"], x_t.shape[2:])   # Q cut like X_T
                with torch.no_grad(), amp.autocast():
                    logits_t = common.upsample(teacher(x_t).float(), x_t.shape[2:])
                prob_t = logits_t.float().softmax(1)                                   # P, no grad
                y_raw, w_t, _ = common.pseudo_label(logits_t, args.tau, "uniform")    # raw argmax; w_t over the batch
                u_t = None
                if use_sigmask:                                                        # Eq. 5-7
                    threshold = significance_threshold(i, args.sigmask_tmax, args.sigmask_beta, args.sigmask_gamma)
                    u_t = significance_mask(teacher, x_t, threshold, args.sigmask_passes,
                                            sigmask_noise(args.src_impl, args.sigmask_noise_std, g), y_raw.shape[1:],
                                            amp)
                phase = "dacs" if i < args.warmup_iters else args.mix                  # phase A / phase B
                T = target_pixels(phase, y_s, y_raw, prob_t, prior, g, args)           # Eq. 1 (1 = target pixel)
                x_m, y_m, w_m, u_m = mix_target_onto_source(T, x_s, y_s, x_t, y_raw, w_t, u_t)   # Eq. 2, 4, 8
                if not args.no_jitter:   # one gate per iteration, own factors and op order per image (as dacs.py)
                    x_m = common.color_jitter(x_m, norm, g, gate=0.2, per_image_order=True)
                if not args.no_blur:
                    x_m = common.gaussian_blur(x_m, g, per_image=True)
                with amp.autocast():
                    logits_m = common.upsample(model(x_m), y_m.shape[1:])
                if args.consistency == "mse":
                    loss_con = mse_consistency(logits_m, prob_t, w_t.mean())
                else:
                    loss_con = consistency_loss(logits_m, y_m, w_m, u_m, args.consistency, args.src_impl)   # Eq. 9
                loss_con = args.consistency_weight * loss_con
                losses.update(loss_con=loss_con, q=w_t.mean(), target_share=T.mean())
                if u_m is not None:
                    losses["sigmask_kept"] = u_t.mean()
                if phase == "camix" and prior is not None:   # how often Q changes the teacher's argmax
                    losses["prior_changed"] = ((prior * prob_t).argmax(1) != y_raw).float().mean()
                amp.backward(loss_con)                                             # Eq. 11: L_seg + L_con
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if teacher is not None:                                                    # Eq. 3, after the step
            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)
        log.log(i, losses, lr)
        # ------------------------------------------------------------ checkpoints, evaluation (student)
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            training.write_checkpoints(out_dir, training.training_state(i + 1, student, optimizer, scheduler, args,
                                                                    teacher), args.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, out_dir)
        if training.is_due(i, args.eval_every, args.iters):
            metrics = training.evaluate_and_write(student, val, device, out_dir, i + 1, synthia, amp, dist=dist)
            if args.eval_every > 0 and (best is None or metrics["mIoU"] > best["mIoU"]):   # SYNTHIA: mIoU-16
                best = metrics
                if dist.main:
                    common.atomic_write_text(out_dir / "best_metrics.json", json.dumps(best, indent=1))
    stop.restore()
    return metrics or training.evaluate_and_write(student, val, device, out_dir, start, synthia, amp,
                                                dist=dist)  # a finished run


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    metrics = train(args)
    if args.demo and not args.source_only and not args.eval_only and args.mix == "camix":
        base_dir = args.out_dir or str(training.default_out_dir("camix", args.source, None, args.seed))
        baselines = []
        for name, changes in (("DACS", {"mix": "dacs", "warmup_iters": 0, "build_prior": False}),
                              ("iDACS", {"mix": "idacs", "build_prior": False}),   # Table 4 baseline, same warm-up
                              ("source-only", {"source_only": True, "warmup_iters": 0, "build_prior": False})):
            baseline = copy.copy(args)
            vars(baseline).update(changes, out_dir=base_dir + "_" + name.lower().replace("-", "_"))
            baselines.append((name, train(baseline)))
        training.write_demo_summary(base_dir, "camix.py", ("CAMix", metrics), baselines, args.iters,
                                  time.time() - started)
    return metrics


if __name__ == "__main__":
    training.run_script(main)
