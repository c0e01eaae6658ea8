"""DLDM: Semi-supervised Domain Adaptation based on Dual-level Domain Mixing for Semantic Segmentation
(Chen, Jia, He, Shi, Liu, CVPR 2021; the authors call it DDM) — GTA5/SYNTHIA + N labeled Cityscapes -> Cityscapes.

    python dldm.py --source gta5 --n-labeled 100       # Table 1: 61.2 mIoU (200: 60.5, 500: 64.3, 1000: 66.6)
    python dldm.py --source synthia --n-labeled 100    # Table 2: 68.4 13-class mIoU
    python dldm.py --demo                               # two short rounds + the supervised baseline, CPU

Algorithm 1, for R rounds (4 for GTA5, 3 for SYNTHIA, 1 when every train image is labeled): a region-level
teacher M_RL learns from labeled target images with a CutMix box of a labeled source image pasted in; a
sample-level teacher M_SL learns from one source and one target image per iteration; a student M_S learns
to match the averaged teacher predictions on the unlabeled target images (KL) and the labeled target
images (CE). The student then labels the unlabeled images with BDL's per-class confidence rule, and the
next round's teachers and student train on the labeled target images plus these pseudo-labels.
Source images are colour-translated to a random Cityscapes image in LAB space first (He et al. [14]).

The authors released inference code only (mindspore-ai/models research/cv/DDM: README.md, config.py,
dataset/base_dataset.py, eval.py); its config.py still holds the training defaults, which builds on
AdvEnt (valeoai/ADVENT advent/domain_adaptation/config.py, advent/model/deeplabv2.py). The pseudo-label
rule is BDL's (liyunsheng13/BDL SSL.py), which the paper follows ("following [23]").

Paper -> code:
    Eq. 1  x_rl = M x_t + (1 - M) x_s, y_rl likewise    -> `region_mix` (M from `box_mask`: 0 in the box = source)
    Eq. 2  L_RL = CE(M_RL(x_rl), y_rl)                   -> `loss_rl` in `rl_step` (common.seg_loss: +0.1 aux, A1)
    Eq. 3  L_SL = CE(M_SL(x_s), y_s) + CE(M_SL(x_t), y_t) -> `loss_sl_s`, `loss_sl_t` (a sum, one step)
    Eq. 4  L_S = l_kl KL(E(M_RL(x_u), M_SL(x_u)) || M_S(x_u)) + l_ce CE(M_S(x_t), y_t)
                                                          -> `ensemble_probs`, `kd_loss`, `student_step`
    Alg. 1 lines 1-8 (rounds, stages, return M_S^R)      -> `run_all`; each stage in `train_model`/`pseudo_stage`
    Alg. 1 line 5 pseudo-labels "following [23]" (BDL)    -> `pseudo_stage`, `bdl_thresholds`, `apply_thresholds`
    Alg. 1 line 6 merge into D_T                          -> `target_set` (ground truth wins, A13)
    §4.2 LAB translation "following [14]"                 -> `LabSourceDataset`, `lab_transfer` (--lab, --lab-mode)
    §4.2 SGD 2.5e-4, momentum 0.9, wd 1e-4, poly 0.9     -> common.deeplab_optimizer, common.poly_factor
    §4.2 l_kl 0.5, l_ce 1, portion 0.5, threshold 0.9    -> --lambda-kl, --lambda-ce, --pl-portion, --pl-cap
    Table 3 (test-time ensembles E(a, b))                  -> --stage eval --ensemble A B
    Table 4 (M_RL^r, M_SL^r, M_S^r of every round)        -> round<r>/{rl,sl,student}/metrics.json, "rounds" in
                                                             metrics.json
    Table 5 (round 1, with/without LAB)                    -> --rounds 1 --lab on|off
    Tables 1-2 "Supervised DeeplabV2"                      -> --stage supervised (recipe assumed, A19)

Assumptions (the paper is silent; each alternative is a flag):
    A1  The network is AdvEnt's multi-level DeepLabv2 (aux classifier on layer3, main on layer4, as DDM's
        net and config): every CE term adds 0.1 x CE of the aux head (--aux-weight); KD, pseudo-labels and
        evaluation use the main head only.
    A2  The classifiers learn 10x faster than the backbone (DeepLab/AdvEnt/BDL convention).
    A3  Every model of every round trains 120k iterations of a poly schedule whose horizon is 250k, one
        source + one target image per iteration (AdvEnt's EARLY_STOP / MAX_ITERS kept in DDM's config.py):
        --iters / --poly-iters.
    A4  For the region-level mix the resized source (1280x720) is cut to a random target-size window
        (1024x512), so the box keeps the source's scale (--src-fit resize: squeeze it to 1024x512).
    A5  Every M_RL iteration sees one mixed image and nothing else (Eq. 2 has no unmixed term).
    A6  The box follows CutMix [46]: lambda ~ U(0,1), sides W*sqrt(1-lambda) x H*sqrt(1-lambda), centre uniform,
        clipped to the image (--box french: French et al.'s box of half the area, random aspect ratio).
    A7  From round 2 the student's CE term also draws from the merged set (Alg. 1 literally;
        --student-ce gt keeps it on the ground-truth images).
    A8  Logits are bilinearly upsampled (align_corners=True) to the input size before CE and KL.
    A9  KD temperature 10 (DDM config.py KL_T) with the usual T^2 factor, KL summed over classes and averaged
        over pixels (--kd-temp, --no-kd-t2).
    A10 "Averaging the outputs" = averaging the teachers' softened probabilities (--ens logits: averaging
        logits); the test-time ensemble E(a, b) of Table 3 averages probabilities at T = 1 (or logits with
        --ens logits, as AdvEnt's eval_UDA.py sums the members' upsampled logits).
    A11 Every model of every round restarts from the ImageNet weights, as Alg. 1's M^0 inputs and BDL's
        self-training do (--warm-start: M^r starts from M^(r-1) of the same kind).
    A12 BDL sorts every confidence of the unlabeled set in memory; here per-class histograms of 2^20 bins over
        [0, 1] give the median's bin, and its lower edge is the threshold (--pl-bins). Pixels within one
        bin (width < 1e-6) below the exact median are kept where BDL would drop them.
    A13 A labeled image keeps its ground truth; pseudo-labels only cover D_U minus the labeled images.
    A14 Teachers sample the merged set uniformly, ground-truth and pseudo-labeled alike
        (--merge-sampling balanced: alternate ground-truth and pseudo-labeled images 1:1).
    A15 Every stage keeps its last iteration; no selection on val. With --eval-every the best snapshot is
        also logged (best_snapshot.json), labelled as selection on val (DDM's README evaluates a
        best_model checkpoint and AdvEnt's test mode 'best' scans snapshots every 2000 iterations).
        Snapshots and rounds are ranked by the reported mIoU: mIoU13 for SYNTHIA (Table 2), else mIoU.
    A16 D_U = all 2975 train images, labeled ones included (DDM's DEL_XL=False; Table 4 distils at N=2975)
        (--exclude-labeled-from-u).
    A17 The LAB reference is a fresh uniformly drawn Cityscapes train image at every load, from all train
        images (DDM dataset/base_dataset.py) (--lab-mode offline: one fixed reference per source image,
        translated once and cached as PNG in the run folder).
    A18 No crop, flip or scale augmentation beyond the fixed resize and the mixes (AdvEnt/BDL/DDM loaders).
    A19 "Supervised DeeplabV2" (Tables 1-2) has no recipe in the paper: the same network, init, optimiser and
        schedule (A1-A3), CE on the N labeled target images only, one per iteration, last iteration.
    A20 BN gamma/beta are frozen, as AdvEnt's deeplabv2.py and the default of DDM's get_deeplab_v2
        (freeze_bn_affine=True, the net its eval.py builds); DDM config.py holds TRAIN.FREEZE_BN_AFFINE =
        False, a key nothing in the release reads (--bn-affine train).

Other decisions: SYNTHIA-RAND-CITYSCAPES images are used at their native 1280x760 (BDL's loader size); §4.1's
"1280x960" is taken for a typo. AdvEnt's train_UDA.py loops over range(EARLY_STOP + 1), i.e. its 120000
snapshot has seen 120001 updates; --iters 120001 reproduces that (A3 keeps 120000).
The paper's weight decay 1e-4 is used (DDM config.py has AdvEnt's 5e-4: --weight-decay);
the ASPP classifier sums all four branches as AdvEnt's does (not AdaptSegNet's two); BN layers use
batch statistics in training (AdvEnt; A20 for their affine parameters); the 1x parameter group repeats tensors as
AdvEnt's `optim_parameters` does, with the per-entry SGD update of AdvEnt's PyTorch 0.4.1 (common.LegacySGD,
weight decay added into p.grad in place; --sgd-rule torch1.5: out of place; --clean-param-groups lists each
tensor once). The paper has LAB on "in most experiments" (all but
Table 5's F column) while DDM's config.py ships SOURCE_TRANS = False: the default here follows the paper.
Init: --init advent (default) is AdvEnt's caffe-style ImageNet DeepLab file
DeepLab_resnet_pretrained_imagenet.pth from the ADVENT v0.1 release, which DDM's BGR-mean normalisation
implies; no digest is published, so its sha256 is written to <out-dir>/init_sha256.txt and checked against
--init-sha256 when given. --init imagenet is torchvision's ResNet-101 (pytorch style, RGB mean/std).
--demo trains a light network (--layers 1 1 1 1 --width 32) from the demo init with Adam (SGD 2.5e-4
needs the ImageNet weights), 5 labeled images, 2 rounds of 150 iterations per model, --merge-sampling balanced.

--target acdc (an assumption; the paper uses Cityscapes only): the labeled split is drawn from ACDC's sorted train
list as from Cityscapes' (--split-seed, nested; --acdc-conditions picks conditions), the Cityscapes resizes are
scaled to ACDC's 1920x1080 frame (1024x512 -> 960x540) and val is scored at full label resolution (mmseg's protocol
for ACDC, DAFormer/HRDA); --target dark_zurich is refused (Dark Zurich train has no labels).
--compile (README 'Compiled step'): torch.compile, in place, of each stage's network and, in the student stage,
of the two frozen teachers (evaluation and pseudo-labelling eager; checkpoints and resume unchanged). The demo's
Adam is fused on CUDA, foreach elsewhere; the SGD is the authors' per-listing LegacySGD.
"""
import argparse
import copy
import hashlib
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (120000, "iterations of every teacher/student stage: DDM config.py EARLY_STOP (AdvEnt; A3)"),
    "batch_size": (1, "1 source + 1 target image: DDM config.py BATCH_SIZE_SOURCE / BATCH_SIZE_TARGET"),
    "lr": (2.5e-4, "DLDM §4.2; classifiers x10 with SGD (A2), one rate for every parameter with --optimizer adam"),
    "source_size": (None, "GTA5 1280 720 (DDM config.py), SYNTHIA 1280 760 (BDL data/__init__.py)"),
    "target_size": ((1024, 512), "DDM config.py INPUT_SIZE_TARGET"),
    "crop_size": ((0, 0), "no random crop (A18); M_RL's source window is --src-fit"),
    "eval_res": ("full", "DDM eval.py: main logits upsampled to 2048x1024"),
    "init": ("advent", "AdvEnt's caffe-style ImageNet DeepLab (ADVENT release v0.1); imagenet = torchvision"),
    "sgd_rule": ("torch0.4", "assumption: AdvEnt's PyTorch 0.4.1 (valeoai/ADVENT README); DLDM released no "
                 "training code"),
    "eval_every": (0, "0 = evaluate at the end of each stage; 2000 = AdvEnt's snapshot step (A15)"),
    "save_every": (2000, "AdvEnt SAVE_PRED_EVERY"),
}
# --demo: 5 labeled of 120 train images, 150 iterations per model. The paper gives no merge sampling (A14). Its
# round 2 (120k iterations over 2975 images) still shows each of the 100 labeled images ~40 times; the demo's
# 150 uniform draws over 120 images would show each of 5 ~1.25 times, so round 2 would fit pseudo-labels alone.
# The 1:1 stream shows each ~15 times (at a 50 % share of updates, where uniform keeps the paper's ~3-4 %).
DEMO = {"source": "demo", "n_labeled": 5, "rounds": 2, "iters": 150, "poly_iters": 150, "lr": 1e-3,
        "optimizer": "adam", "layers": [1, 1, 1, 1], "width": 32, "init": "demo", "source_size": [128, 64],
        "target_size": [128, 64], "eval_res": "full", "save_every": 40, "log_every": 40, "workers": 0,
        "pl_batch_size": 8, "merge_sampling": "balanced"}
SOURCE_SIZE = {"gta5": (1280, 720), "synthia": (1280, 760), "demo": None}
ADVENT_INIT_URL = "https://github.com/valeoai/ADVENT/releases/download/v0.1/DeepLab_resnet_pretrained_imagenet.pth"
STAGE_IDS = {"rl": 0, "sl": 1, "student": 2, "supervised": 4}   # seeds of the trained stages
TRAINED = ("rl", "sl", "student", "supervised")


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--source", choices=["gta5", "synthia", "demo"], default="gta5", help="source domain")
    training.add_target_arg(p, labeled=True)
    training.add_split_args(p, 100, "DLDM Tables 1-2: 100/200/500/1000/2975")
    p.add_argument("--stage", choices=["all", "rl", "sl", "student", "pseudo", "eval", "supervised"],
                   default="all", help="Algorithm 1 in full, or one stage of round --round (rl/sl: teachers, "
                   "student: distillation, pseudo: pseudo-labels from the student, eval: --ensemble, "
                   "supervised: CE on the labeled target only, the 'Supervised DeeplabV2' row)")
    p.add_argument("--rounds", type=int, default=None,
                   help="R: 4 for GTA5, 3 for SYNTHIA (DLDM §4.2), 1 when every train image is labeled (Table 4)")
    p.add_argument("--round", type=int, default=1, help="the round a single --stage belongs to")
    p.add_argument("--poly-iters", type=int, default=250000,
                   help="poly schedule horizon: DDM config.py MAX_ITERS (AdvEnt; A3)")
    p.add_argument("--lab", choices=["on", "off"], default="on",
                   help="LAB colour translation of source images (DLDM §4.2 'in most experiments'; Table 5 F = off; "
                        "DDM config.py ships SOURCE_TRANS = False)")
    p.add_argument("--lab-mode", choices=["online", "offline"], default="online",
                   help="online: a fresh random Cityscapes reference at every load (DDM base_dataset.py; A17); "
                        "offline: one fixed reference per source image, cached")
    p.add_argument("--lambda-kl", type=float, default=0.5, help="weight of the KL term of Eq. 4 (DLDM §4.2)")
    p.add_argument("--lambda-ce", type=float, default=1.0, help="weight of the CE term of Eq. 4 (DLDM §4.2)")
    p.add_argument("--kd-temp", type=float, default=10.0, help="KD temperature T (DDM config.py KL_T; A9)")
    p.add_argument("--kd-t2", action=argparse.BooleanOptionalAction, default=True,
                   help="scale the KL term by T^2 (A9; --no-kd-t2 drops it)")
    p.add_argument("--ens", choices=["probs", "logits"], default="probs",
                   help="ensemble E of Eq. 4 (at T) and of --stage eval (at T = 1): mean of softmax maps or of "
                        "logits (A10)")
    p.add_argument("--box", choices=["cutmix", "french"], default="cutmix",
                   help="region-level box: CutMix's rule [46] or French et al.'s 50%%-area box [10] (A6)")
    p.add_argument("--src-fit", choices=["crop", "resize"], default="crop",
                   help="fit the source to the target canvas for M_RL: random window or resize (A4)")
    p.add_argument("--aux-weight", type=float, default=0.1,
                   help="CE weight of the aux (layer3) head: DDM/AdvEnt config LAMBDA_SEG_AUX (A1)")
    p.add_argument("--pl-portion", type=float, default=0.5,
                   help="per-class portion of kept pseudo-labels, the most confident ones (BDL SSL.py; DLDM §4.2)")
    p.add_argument("--pl-cap", type=float, default=0.9,
                   help="cap of the per-class confidence threshold (BDL SSL.py; DLDM §4.2)")
    p.add_argument("--pl-bins", type=int, default=2 ** 20, help="histogram bins over [0, 1] for the median (A12)")
    p.add_argument("--pl-batch-size", type=int, default=4, help="images per batch when pseudo-labelling")
    p.add_argument("--pseudo-dir", default=None,
                   help="pseudo-label folder (<stem>.png) for round --round >= 2 (default: the previous round's)")
    p.add_argument("--merge-sampling", choices=["uniform", "balanced"], default="uniform",
                   help="draw from GT + pseudo-labeled images uniformly or 1:1 (A14)")
    p.add_argument("--student-ce", choices=["merged", "gt"], default="merged",
                   help="labeled images of the student's CE from round 2: merged set or ground truth only (A7)")
    p.add_argument("--warm-start", action="store_true",
                   help="start M^r from M^(r-1) of the same kind instead of the ImageNet weights (A11)")
    p.add_argument("--exclude-labeled-from-u", action="store_true",
                   help="D_U without the labeled images (default: all train images, DDM DEL_XL=False; A16)")
    p.add_argument("--teachers", nargs=2, metavar=("RL", "SL"), default=None,
                   help="teacher checkpoints for --stage student (default: round<r>/rl and round<r>/sl)")
    p.add_argument("--ensemble", nargs="+", metavar="CKPT", default=None,
                   help="--stage eval: one checkpoint, or two averaged at T = 1 (Table 3 E(a, b))")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (DLDM §4.2; DDM config 5e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (DLDM §4.2)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd = the paper's; adam is for the random-init demo")
    p.add_argument("--clean-param-groups", action="store_true",
                   help="each tensor once in the 1x group (AdvEnt's optim_parameters repeats them)")
    p.add_argument("--init-sha256", default=None, help="expected sha256 of the --init advent file")
    p.add_argument("--bn-affine", choices=["frozen", "train"], default="frozen",
                   help="BN gamma/beta: frozen (AdvEnt's net, DDM's net default used by its eval.py; A20) or trained "
                        "(DDM config.py FREEZE_BN_AFFINE = False)")
    training.set_target_defaults(p, argv)
    args = training.parse_with_demo(p, DEMO, argv)
    training.check_args(args)
    training.check_target(args, args.source, args.target, labeled=True)
    training.check_optimizer_flags(args)
    check_stage_flags(args)
    if args.resume not in (None, "auto"):
        raise common.DataError(f"--resume {args.resume}: dldm.py resumes every stage from its own folder; "
                               f"use --resume auto")
    if args.poly_iters < args.iters:
        raise common.DataError(f"--poly-iters {args.poly_iters}: expected >= --iters {args.iters}")
    if not (args.kd_temp > 0 and 0 < args.pl_portion <= 1 and 0 < args.pl_cap <= 1 and args.pl_bins >= 2
            and args.pl_batch_size >= 1 and args.aux_weight >= 0):
        raise common.DataError("expected --kd-temp > 0, --pl-portion and --pl-cap in (0, 1], --pl-bins >= 2, "
                               "--pl-batch-size >= 1, --aux-weight >= 0")
    if tuple(args.crop_size) != (0, 0):
        raise common.DataError(f"--crop-size {args.crop_size[0]} {args.crop_size[1]}: dldm.py trains on whole resized "
                               f"images (A18); only 0 0 is accepted")
    if args.stage == "eval" and not (args.ensemble and len(args.ensemble) <= 2):
        raise common.DataError("--stage eval needs --ensemble CKPT [CKPT] (one or two checkpoints)")
    if args.source_size is None:
        args.source_size = SOURCE_SIZE[args.source]
    return args


def check_stage_flags(args):
    """Refuse the flags the chosen --stage would ignore or apply to every round (DataError = exit 2)."""
    single = "--stage all runs every round with its own teachers and pseudo-labels; run one --stage to set it"
    if args.eval_model == "teacher":
        raise common.DataError("--eval-model teacher: DLDM has no EMA teacher (a checkpoint holds `model` only); "
                               "drop it, or pass the teachers to --stage eval --ensemble RL SL")
    if args.stage == "all" and (args.round != 1 or args.pseudo_dir or args.teachers):
        flag = f"--round {args.round}" if args.round != 1 else "--pseudo-dir" if args.pseudo_dir else "--teachers"
        raise common.DataError(f"{flag} with --stage all: {single}")
    if args.round != 1 and args.stage in ("eval", "supervised"):
        raise common.DataError(f"--round {args.round}: --stage {args.stage} belongs to no round "
                               f"(--round is for --stage rl|sl|student|pseudo)")
    if args.teachers and args.stage != "student":
        raise common.DataError(f"--teachers: read by --stage student only (this is --stage {args.stage})")
    if args.pseudo_dir and (args.stage not in ("rl", "sl", "student") or args.round == 1
                            or (args.stage == "student" and args.student_ce == "gt")):
        raise common.DataError(f"--pseudo-dir: read by --stage rl|sl|student of --round 2 or later, not with "
                               f"--student-ce gt (this is --stage {args.stage} --round {args.round})")
    if args.ensemble and args.stage != "eval":
        raise common.DataError(f"--ensemble: read by --stage eval only (this is --stage {args.stage})")


# ======================================================================================
# LAB colour translation (He et al. [14]; DDM dataset/base_dataset.py), skimage's conventions
# ======================================================================================

XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


SRGB_TO_LINEAR = np.where(np.arange(256) / 255.0 > 0.04045, ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4,
                          np.arange(256) / 255.0 / 12.92)   # skimage's gamma for each uint8 value, same float64s


def rgb_to_lab(rgb):
    """uint8 HxWx3 sRGB -> float64 CIELAB (D65, 2 degree observer; skimage.color.rgb2lab).

    Each branch of skimage's piecewise maps is evaluated only where it applies (same values, less work).
    """
    xyz = (SRGB_TO_LINEAR[rgb] @ XYZ_FROM_RGB.T) / WHITE_D65
    f = np.cbrt(xyz)
    low = xyz <= 0.008856
    f[low] = 7.787 * xyz[low] + 16.0 / 116.0
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab):
    """float CIELAB -> float RGB in [0, 1], gamut-clipped (skimage.color.lab2rgb)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0)], -1)
    xyz = f ** 3
    low = f <= 0.2068966
    xyz[low] = (f[low] - 16.0 / 116.0) / 7.787
    x = (xyz * WHITE_D65) @ RGB_FROM_XYZ.T
    out = 1.055 * np.power(np.maximum(x, 1e-12), 1 / 2.4) - 0.055
    low = x <= 0.0031308
    out[low] = 12.92 * x[low]
    return np.clip(out, 0, 1)


def lab_stats(rgb):
    """Whole-image mean and population std of L, a, b: the 6 numbers a reference contributes."""
    colours, rows = distinct_colours(rgb[..., :3])
    return np.concatenate(pixel_moments(rgb_to_lab(colours), rows))


def lab_match(lab, stats, eps=1e-8, moments=None):
    """Per-channel affine map of a LAB image onto a reference's mean/std (step 4 of the transfer); `eps`
    only replaces a zero std (a flat channel), so any other image gets DDM base_dataset.py's exact values.
    `moments`: the source's (mean, std) when `lab` is not the whole image (default: those of `lab`)."""
    flat = lab.reshape(-1, 3)
    mean, std = moments if moments is not None else (flat.mean(0), flat.std(0))
    scale = np.maximum(std, eps)
    return np.stack([(lab[..., c] - mean[c]) / scale[c] * stats[3 + c] + stats[c] for c in range(3)], -1)


class ColourTables:
    """The two 2^24-entry tables `distinct_colours` indexes by colour code (80 MB), kept between images by
    each data worker instead of allocated per image; `seen` is all False between calls."""

    def __init__(self):
        self.seen = np.zeros(1 << 24, bool)
        self.row_of_code = np.empty(1 << 24, np.int32)


def distinct_colours(rgb, tables=None):
    """The distinct colours of a uint8 HxWx3 image (U x 3, ascending) and each pixel's row among them (flat).
    `tables`: a ColourTables to reuse (default: fresh ones for images of 2^16+ pixels)."""
    code = ((rgb[..., 0].astype(np.intp) << 16) | (rgb[..., 1].astype(np.intp) << 8) | rgb[..., 2]).ravel()
    if code.size < 1 << 16:   # small image: sorting beats scanning the two 2^24-entry tables below
        codes, rows = np.unique(code, return_inverse=True)
    else:   # intp codes: NumPy indexes with them as they are
        tables = tables or ColourTables()
        tables.seen[code] = True
        codes = np.flatnonzero(tables.seen)
        tables.seen[codes] = False
        tables.row_of_code[codes] = np.arange(len(codes), dtype=np.int32)
        rows = tables.row_of_code.take(code)
    return np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8), rows.ravel()


def pixel_moments(lab, rows):
    """Mean and population std of L, a, b over the pixels `lab[rows]`, as the same float64s as NumPy's
    `mean(0)`/`std(0)` of the whole (pixels x 3) LAB image: those add pixel by pixel in image order, and so
    does torch.cumsum of a 1-D CPU tensor (one sequential float64 loop, ~4x faster than np.add.accumulate;
    pinned by tests/test_dldm.py against NumPy and the per-pixel transfer)."""
    mean, std = np.empty(3), np.empty(3)
    rows = torch.from_numpy(rows)
    x, running = torch.empty(len(rows), dtype=torch.float64), torch.empty(len(rows), dtype=torch.float64)
    for c, channel in enumerate(np.ascontiguousarray(lab.T)):
        torch.index_select(torch.from_numpy(channel), 0, rows, out=x)
        mean[c] = torch.cumsum(x, 0, out=running)[-1].item() / len(rows)
        x.sub_(float(mean[c]))
        std[c] = np.sqrt(torch.cumsum(x.mul_(x), 0, out=running)[-1].item() / len(rows))
    return mean, std


def colour_blocks(n, size=16384):
    """Slices cutting n colours into blocks of `size` to 2 x `size` (one block if fewer): the per-colour maps run
    block by block so their temporaries stay in a core's cache (~1.4x faster than whole arrays), and no block
    is a single colour (whose matmul would take NumPy's vector path, see lab_transfer)."""
    bounds = np.linspace(0, n, max(n // size, 1) + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def lab_transfer(rgb, stats, tables=None):
    """Source uint8 RGB -> uint8 RGB with the reference's LAB statistics (truncated, as the authors' cast).

    Each step but the source's whole-image mean/std maps one colour to one colour, so it runs once per
    distinct colour and the result is gathered back to the pixels; uint8-equal to the per-pixel transfer
    for images 2+ pixels wide (on a 1-pixel-wide one NumPy's per-pixel matmul rounded differently: <= 1 level).
    `tables`: a ColourTables to reuse (see distinct_colours)."""
    colours, rows = distinct_colours(rgb[..., :3], tables)
    blocks = colour_blocks(len(colours))
    lab = np.concatenate([rgb_to_lab(colours[block]) for block in blocks])
    stats, moments = np.asarray(stats, dtype=np.float64), pixel_moments(lab, rows)
    out = np.concatenate([(lab_to_rgb(lab_match(lab[block], stats, moments=moments)) * 255.0).astype(np.uint8)
                          for block in blocks])   # lab_to_rgb is within [0, 1]: no second clip
    return torch.from_numpy(out).index_select(0, torch.from_numpy(rows)).numpy().reshape(*rgb.shape[:2], 3)


def reference_stats(target, cache, workers=0):
    """LAB mean/std of every target train image (`target`: the unpipelined dataset; the reference pool of A17),
    cached as JSON."""
    if cache is not None and Path(cache).is_file():
        return np.asarray(json.loads(Path(cache).read_text()))
    paths = [img for img, _ in target.pairs]
    if workers > 0:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            stats = pool.map(_stats_of_file, paths, chunksize=16)
    else:
        stats = [_stats_of_file(p) for p in paths]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        common.atomic_write_text(cache, json.dumps([list(map(float, s)) for s in stats]))
    return np.asarray(stats)


def _stats_of_file(path):
    """lab_stats of one image file (a picklable worker function)."""
    return lab_stats(common.read_rgb(path))


class LabSourceDataset(common.SegmentationDataset):
    """Source images LAB-translated at their original resolution before the resize (DDM base_dataset.py).

    online: the reference is drawn uniformly from `ref_stats` with the item's seed (a fresh draw at every
    load); offline: one reference per image from (run seed, index), translated once and cached as PNG.
    Each process (data worker) makes its own ColourTables at its first transfer; they are not pickled.
    """

    def __init__(self, *a, ref_stats, mode="online", seed=0, cache_dir=None, **kw):
        super().__init__(*a, **kw)
        self.ref_stats, self.mode, self.seed, self.cache_dir = ref_stats, mode, seed, cache_dir
        self.tables = None

    def __getstate__(self):
        return {**self.__dict__, "tables": None}

    def transfer(self, rgb, reference):
        """lab_transfer onto reference `reference`, with this process's tables."""
        self.tables = self.tables or ColourTables()
        return lab_transfer(rgb, self.ref_stats[reference], self.tables)

    def reference(self, index, item_seed):
        """The reference image (an index into `ref_stats`) of one load of source image `index` (A17)."""
        rng = np.random.default_rng([self.seed, index] if self.mode == "offline" else [item_seed, 7])
        return int(rng.integers(len(self.ref_stats)))

    def translated(self, index, reference):
        """The source image at its original size with the reference's LAB statistics (offline: cached)."""
        img_path = self.pairs[index][0]
        if self.mode == "online":
            return self.transfer(common.read_rgb(img_path), reference)
        cached = Path(self.cache_dir) / f"{common.stem_of(img_path)}.png"
        if cached.is_file():
            return common.read_rgb(cached)
        rgb = self.transfer(common.read_rgb(img_path), reference)
        cached.parent.mkdir(parents=True, exist_ok=True)
        common.save_png(cached, rgb)
        return rgb

    def load(self, index, reference):
        """The translated image resized, its label, and the label at its original size."""
        label = self.map_label(common.read_label(self.pairs[index][1], self.kind))
        return (*self.resized(self.translated(index, reference), label), label)

    def __getitem__(self, item):
        index, seed, required_class = (item, 0, -1) if isinstance(item, int) else item
        return self.sample(index, seed, required_class, *self.load(index, self.reference(index, seed)))


class TargetDataset(common.SegmentationDataset):
    """Labeled target images: Cityscapes ground truth, or a pseudo-label PNG (train ids) for listed stems."""

    def __init__(self, *a, pseudo=None, **kw):
        super().__init__(*a, **kw)
        self.pseudo = pseudo or {}  # stem -> PNG path

    def load(self, index):
        stem = common.stem_of(self.pairs[index][0])
        if stem not in self.pseudo:
            return super().load(index)
        label = np.asarray(Image.open(self.pseudo[stem]))   # already in the model's label space
        rgb, label = self.resized(common.read_rgb(self.pairs[index][0]), label)
        return rgb, label, label


# ======================================================================================
# The method's pieces: region-level mix, losses, ensemble, BDL pseudo-labels
# ======================================================================================

def box_mask(n, h, w, generator, rule="cutmix", device="cpu"):
    """M (n,1,h,w): 0 inside one random box per image (where the source shows), 1 elsewhere (A6)."""
    boxes = []
    for _ in range(n):
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()   # CPU draws: no device sync
        if rule == "cutmix":  # Yun et al. [46] rand_bbox, lambda ~ Beta(1,1)
            cut = math.sqrt(1.0 - u[0])
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(u[1] * h), int(u[2] * w)
            boxes.append((max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)))
        else:  # French et al. [10] BoxMaskGenerator, area 0.5, random aspect ratio, fully inside
            hf = math.exp(u[0] * math.log(0.5))
            bh, bw = round(hf * h), round(0.5 / hf * w)
            y0, x0 = round((h - bh) * u[1]), round((w - bw) * u[2])
            boxes.append((y0, y0 + bh, x0, x0 + bw))
    return common.outside_boxes(torch.tensor(boxes), h, w, device)[:, None]   # built on the device


def region_mix(mask, x_s, y_s, x_t, y_t):
    """Eq. 1: x_rl = M x_t + (1 - M) x_s and y_rl = M y_t + (1 - M) y_s (a source box at the same place)."""
    x_rl = mask * x_t + (1 - mask) * x_s
    y_rl = torch.where(mask[:, 0].bool(), y_t, y_s)
    return x_rl, y_rl


def ensemble_probs(logits, temperature=1.0, mode="probs"):
    """E(.): mean of softmax(z/T) over the members (A10), or softmax of their mean logits (--ens logits)."""
    if mode == "logits":
        return F.softmax(torch.stack([z.float() for z in logits]).mean(0) / temperature, 1)
    return torch.stack([F.softmax(z.float() / temperature, 1) for z in logits]).mean(0)


def kd_loss(student_logits, teacher_probs, temperature, t2=True):
    """KL(p_E || softmax(z_S/T)) summed over classes, averaged over pixels, times T^2 (A9)."""
    log_q = F.log_softmax(student_logits.float() / temperature, 1)
    kl = (torch.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(1).mean()
    return kl * temperature ** 2 if t2 else kl


class Ensemble(nn.Module):
    """Test-time ensemble E(a, b) (Table 3): the members' main-head softmax maps averaged at T = 1."""

    def __init__(self, members, mode="probs"):
        super().__init__()
        self.members, self.mode = nn.ModuleList(members), mode
        self.num_classes = members[0].num_classes

    def forward(self, x):
        return ensemble_probs([m(x)[1] for m in self.members], 1.0, self.mode)


def bdl_thresholds(hist, keep=0.5, cap=0.9):
    """Per-class thresholds of BDL SSL.py from per-class confidence histograms (C, bins) over [0, 1]:
    the value at ascending sorted index round((1 - keep) * n_c), so that the share `keep` of each class's
    pixels, the most confident ones, is kept (BDL hard-codes index round(0.5 n_c), the same at 0.5); its
    bin's lower edge (A12), 0 for a class never predicted, capped at `cap`. Returns float64 (C,)."""
    portion = 1 - keep                                   # position of the threshold in the ascending order
    hist = hist.cpu().long()
    bins = hist.shape[1]
    cum = hist.cumsum(1)
    th = np.zeros(hist.shape[0])
    for c in range(hist.shape[0]):
        n = int(cum[c, -1])
        if n == 0:
            continue
        k = min(int(np.round(n * portion)), n - 1)       # numpy rounds halves to even, as BDL's np.round
        th[c] = int(torch.searchsorted(cum[c], k, right=True)) / bins
    return np.minimum(th, cap)


def confidence_histogram(prob, bins, hist=None):
    """(C, bins) counts of max-probability per predicted class of a batch of probability maps, added to
    `hist` in place when given (no copy of the probabilities is kept)."""
    conf, pred = prob.max(1)
    index = (pred * bins + (conf * bins).long().clamp(max=bins - 1)).view(-1)
    if hist is None:
        hist = torch.zeros(prob.shape[1], bins, dtype=torch.long, device=prob.device)
    hist.view(-1).index_add_(0, index, torch.ones_like(index))
    return hist


def apply_thresholds(prob, th):
    """BDL's rule: keep argmax where its max-probability >= the class threshold, else ignore (uint8)."""
    conf, pred = prob.max(1)
    keep = conf.double() >= th.to(prob.device)[pred]       # float64 compare, as BDL's float64 arrays
    return torch.where(keep, pred, torch.full_like(pred, common.IGNORE)).to(torch.uint8)


# ======================================================================================
# Run context: data, models, stage folders
# ======================================================================================

class Run:
    """Everything the stages share: arguments, device, datasets, splits and the run folder."""

    def __init__(self, args):
        self.args = args
        self.dist, self.device = training.distributed(args.device)
        training.apply_world(args, self.dist, self.device)
        self.amp = training.Amp(self.device, args.amp, args.amp_dtype)
        self.style, self.norm = common.init_convention(args.init, default=("caffe", "imagenet_bgr"))
        self.num_classes = 16 if args.source == "synthia" else 19
        self.synthia = self.num_classes == 16
        self.out = Path(args.out_dir or training.default_out_dir("dldm", args.source, args.n_labeled, args.seed,
                                                                     args.target))
        self.source_kind, self.source_root, self.target_kind, self.target_root = training.data_roots(
            args, args.source, args.target)
        self.train_set = common.SegmentationDataset(self.target_kind, self.target_root, conditions=args.acdc_conditions)
        self.train_stems = sorted(self.train_set.stems())
        self.labeled, rest = common.labeled_split(self.train_stems, args.n_labeled, args.split_seed,
                                                  args.split_file)
        if not self.labeled:
            raise common.DataError(f"--n-labeled {args.n_labeled}: DLDM needs labeled target images")
        if args.exclude_labeled_from_u and not rest:
            raise common.DataError(f"--exclude-labeled-from-u with --n-labeled {len(self.labeled)}: every train "
                                   f"image is labeled, so D_U would be empty (drop the flag)")
        self.unlabeled = rest if args.exclude_labeled_from_u else list(self.train_stems)      # D_U (A16)
        if args.rounds is None:
            args.rounds = {"gta5": 4, "synthia": 3, "demo": 2}[args.source] if rest else 1
        if args.rounds < 1 or not 1 <= args.round <= args.rounds:
            raise common.DataError(f"--round {args.round}: expected 1..--rounds ({args.rounds})")
        size = tuple(args.target_size)
        self.val = training.target_val(self.target_kind, self.target_root, size, args.eval_res, self.norm,
                                       self.num_classes, "bicubic", args.acdc_conditions)
        self.init_path = None

    def stage_dir(self, r, stage):
        return self.out / f"round{r}" / stage

    def seed(self, r, stage):
        """The seed of one stage: model init, data order and boxes follow from (run seed, round, stage)."""
        return common.item_seed(self.args.seed, 2000 + r, STAGE_IDS[stage], 0)

    def resolve_init(self):
        """Fetch --init advent once (hub cache), check --init-sha256, record the digest; else pass through."""
        if self.args.init != "advent":
            return self.args.init
        if self.init_path is None:
            path = common.download_init("advent", ADVENT_INIT_URL)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if self.args.init_sha256 and digest != self.args.init_sha256.lower():
                raise common.DataError(f"{path}: sha256 {digest} differs from --init-sha256 {self.args.init_sha256}")
            self.init_path, self.init_digest = str(path), digest
        return self.init_path

    def network(self):
        """AdvEnt's multi-level DeepLabv2 (four ASPP branches summed), BN affine frozen unless --bn-affine train."""
        return common.DeepLabV2(self.num_classes, multi_level=True, aspp_full=True, style=self.style,
                                layers=self.args.layers, width=self.args.width,
                                freeze_bn_affine=self.args.bn_affine == "frozen")

    def new_model(self, seed, warm_from=None):
        """A fresh network from the ImageNet init, or a warm start from a checkpoint."""
        common.seed_everything(seed)
        model = self.network()
        if warm_from is not None:
            model.load_state_dict(training.load_checkpoint(warm_from, self.num_classes)["model"])
        else:
            training.initialise(model, self.resolve_init(), self.norm, self.args.data_root)
        return training.prepare_model(model, self.device, self.amp)

    def checkpoint(self, path):
        """A checkpoint of this run's network: class count, size and input convention checked (weights_only)."""
        ckpt = training.load_checkpoint(path, self.num_classes)
        training.check_same_network(ckpt.get("args", {}), self.args, path)
        return ckpt

    def load_model(self, path):
        """A frozen eval-mode model from a checkpoint (see `checkpoint`)."""
        ckpt = self.checkpoint(path)
        model = self.network()
        try:
            model.load_state_dict(ckpt.get("model", ckpt))
        except RuntimeError as exc:
            raise common.DataError(f"{path}: not a multi-level DeepLabv2 state_dict of this network "
                                   f"({str(exc).splitlines()[0][:160]})") from None
        model.requires_grad_(False)
        return training.prepare_model(model, self.device, self.amp).eval()

    def dataset(self, cls, **kw):
        """A dataset with the run's normalisation and label space; bicubic image resize (AdvEnt)."""
        return cls(**{"norm": self.norm, "num_classes": self.num_classes, "interp": "bicubic", **kw})

    def source_set(self, for_region_mix):
        """D_S, LAB-translated if --lab on; for M_RL fitted to the target canvas (A4)."""
        a = self.args
        w, h = a.target_size
        resize, crop = tuple(a.source_size), None
        if for_region_mix:
            resize, crop = ((w, h), None) if a.src_fit == "resize" else (resize, (h, w))
        kw = dict(root=self.source_root, kind=self.source_kind, resize=resize, crop=crop)
        if a.lab == "off":
            return self.dataset(common.SegmentationDataset, **kw)
        with training.main_first(self.dist):   # rank 0 writes the cache, the others read it
            stats = reference_stats(self.train_set, self.out / "lab_reference_stats.json", a.workers)
        return self.dataset(LabSourceDataset, ref_stats=stats, mode=a.lab_mode, seed=a.seed,
                            cache_dir=self.out / "lab_offline", **kw)

    def pseudo_dir(self, r):
        """The folder of the pseudo-labels used in round r (>= 2): --pseudo-dir or round<r-1>/pseudo."""
        return Path(self.args.pseudo_dir) if self.args.pseudo_dir else self.stage_dir(r - 1, "pseudo")

    def check_pseudo(self, r):
        """{stem: png} of round r's pseudo-labels; DataError unless the folder matches D_U exactly."""
        folder = self.pseudo_dir(r)
        if not folder.is_dir():
            raise common.DataError(f"{folder}: pseudo-label folder not found (run --stage pseudo --round {r - 1} "
                                   f"first, or pass --pseudo-dir)")
        found = {p.stem: p for p in folder.glob("*.png")}
        missing = sorted(set(self.unlabeled) - set(found))
        extra = sorted(set(found) - set(self.unlabeled))
        if missing or extra:
            what = f"has no {missing[0]}.png" if missing else f"holds {extra[0]}.png"
            raise common.DataError(f"{folder}: does not match the unlabeled list ({len(self.unlabeled)} images): "
                                   f"it {what} ({len(missing)} missing, {len(extra)} not in D_U)")
        return found

    def target_set(self, r, gt_only=False):
        """D_T^r: the labeled images (ground truth) plus, from round 2, pseudo-labeled D_U minus them (A13)."""
        labeled = set(self.labeled)
        pseudo = {} if r == 1 or gt_only else {s: p for s, p in self.check_pseudo(r).items() if s not in labeled}
        stems = list(self.labeled) + sorted(pseudo)
        return self.dataset(TargetDataset, kind=self.target_kind, root=self.target_root, stems=stems, pseudo=pseudo,
                            resize=tuple(self.args.target_size), conditions=self.args.acdc_conditions), \
            len(self.labeled), len(pseudo)

    def unlabeled_set(self):
        """D_U images at the target size (their labels are never used)."""
        return self.dataset(common.SegmentationDataset, kind=self.target_kind, root=self.target_root,
                            stems=self.unlabeled, resize=tuple(self.args.target_size),
                            conditions=self.args.acdc_conditions)


def stage_finished(stage_dir, iters):
    """A trained stage is done when its final evaluation (metrics.json at --iters) and checkpoint exist."""
    path = stage_dir / "metrics.json"
    return (path.is_file() and (stage_dir / "checkpoint.pth").is_file()
            and json.loads(path.read_text()).get("iteration") == iters)


def loader(run, dataset, seed, stream, start, sampler=None):
    """An iteration-indexed training loader (order and draws follow from the stage seed and iteration)."""
    a = run.args
    sampler = sampler or common.IterationSampler(len(dataset), a.batch_size, seed, stream, start, a.iters,
                                                 run.dist.rank, run.dist.world)
    return training.infinite_loader(dataset, sampler, a.workers)


def target_loader(run, r, seed, stream, start, gt_only=False):
    """Loader over D_T^r: uniform over the merged set or the 1:1 balanced stream (A14)."""
    data, n_gt, n_pseudo = run.target_set(r, gt_only)
    a = run.args
    sampler = None
    if a.merge_sampling == "balanced" and n_pseudo:
        sampler = common.BalancedSampler(n_gt, n_pseudo, a.batch_size, seed, stream, start, a.iters, run.dist.rank,
                                  run.dist.world)
    return loader(run, data, seed, stream, start, sampler)


# ======================================================================================
# Stages
# ======================================================================================

def train_model(run, r, stage, teachers=None):
    """Train M_RL^r, M_SL^r, M_S^r or the supervised baseline; resumes inside the stage with --resume auto.

    Returns the final evaluation (the stage's metrics.json).
    """
    a, device, amp, dist = run.args, run.device, run.amp, run.dist
    stage_dir = run.stage_dir(r, stage)
    if a.resume and stage_finished(stage_dir, a.iters):
        return json.loads((stage_dir / "metrics.json").read_text())
    seed = run.seed(r, stage)
    warm = run.stage_dir(r - 1, stage) / "checkpoint.pth" if a.warm_start and r > 1 else None
    model = run.new_model(seed, warm)
    optimizer = common.deeplab_optimizer(model, a.lr, a.optimizer, not a.clean_param_groups, a.sgd_rule,
                                         a.momentum, a.weight_decay)              # DLDM §4.2 (A2)
    scheduler = common.lr_scheduler(optimizer, lambda i: common.poly_factor(i, a.poly_iters))
    start, best = 0, {}
    if a.resume and (stage_dir / "checkpoint.pth").is_file():
        ckpt = training.load_checkpoint(stage_dir / "checkpoint.pth", run.num_classes)
        start, best = training.restore_training(ckpt, model, optimizer, scheduler, dist=dist), ckpt.get("best", {})
    stage_dir.mkdir(parents=True, exist_ok=True)
    if start == 0 and dist.main:  # a fresh stage: no log or best snapshot of an earlier attempt
        for stale in ("log.jsonl", "best_snapshot.json"):
            (stage_dir / stale).unlink(missing_ok=True)
    # data streams of this stage (stream ids keep their draws independent)
    if stage == "rl":
        loaders = {"s": loader(run, run.source_set(True), seed, 0, start), "t": target_loader(run, r, seed, 1, start)}
    elif stage == "sl":
        loaders = {"s": loader(run, run.source_set(False), seed, 0, start), "t": target_loader(run, r, seed, 1, start)}
    elif stage == "student":
        loaders = {"u": loader(run, run.unlabeled_set(), seed, 0, start),
                   "t": target_loader(run, r, seed, 1, start, gt_only=a.student_ce == "gt")}
    else:
        loaders = {"t": target_loader(run, 1, seed, 1, start)}
    log = training.Logger(stage_dir, a.log_every, a.iters, start, dist)
    step = {"rl": rl_step, "sl": sl_step, "student": student_step, "supervised": supervised_step}[stage]
    net = training.ddp(model, dist, device, a.sync_bn,   # training forwards; `model` for the rest
                     find_unused=stage == "student" or not a.aux_weight)   # L_kl reads the main head only
    training.compile_networks(a, net, *(teachers or ()))         # --compile: in place, checkpoints unchanged
    metrics = None
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, a.iters):
        model.train()
        g = common.step_generator(seed, i, dist.rank)
        optimizer.zero_grad(set_to_none=True)
        batches = {k: training.next_batch(v, device) for k, v in loaders.items()}
        with training.cast_once(amp):                           # the weights cast once for the step's passes
            losses = step(net, batches, g, run, teachers)
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        log.log(i, losses, lr)
        if training.is_due(i, a.save_every, a.iters) or stop.requested:
            state = {**training.training_state(i + 1, model, optimizer, scheduler, a), "best": dict(best)}
            training.write_checkpoints(stage_dir, state, a.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, stage_dir)
        if training.is_due(i, a.eval_every, a.iters) and i + 1 < a.iters:
            metrics = evaluate(run, model, stage_dir, i + 1, stage, best)
    stop.restore()
    if metrics is None or metrics["iteration"] != a.iters:
        metrics = evaluate(run, model, stage_dir, a.iters, stage, best)
    return metrics


def evaluate(run, model, stage_dir, iteration, name, best):
    """Main head at full resolution on val (DDM eval.py): metrics.json; best_snapshot.json by the reported
    mIoU (mIoU13 for SYNTHIA, A15)."""
    metrics = training.evaluate_and_write(model, run.val, run.device, stage_dir, iteration, run.synthia, run.amp,
                                        align_corners=True, model_name=name, dist=run.dist)
    training.update_best(best, metrics, stage_dir, run.synthia, run.dist.main)
    return metrics


def rl_step(model, b, g, run, _):
    """Eq. 1-2: one labeled target image with a box of a labeled source image pasted at the same place."""
    (x_s, y_s), (x_t, y_t) = b["s"], b["t"]
    mask = box_mask(x_t.shape[0], *x_t.shape[2:], g, run.args.box, x_t.device)
    x_rl, y_rl = region_mix(mask, x_s, y_s, x_t, y_t)
    with run.amp.autocast():
        loss_rl = common.seg_loss(*model(x_rl), y_rl, run.args.aux_weight)                # Eq. 2 (A1, A8)
    run.amp.backward(loss_rl)
    return {"loss_rl": loss_rl, "source_share": 1 - mask.mean()}


def sl_step(model, b, g, run, _):
    """Eq. 3: a source and a target image in the same iteration; CE summed (two backward passes, one step)."""
    (x_s, y_s), (x_t, y_t) = b["s"], b["t"]
    with training.grad_sync(model, last=False):         # DDP: the target backward all-reduces the sum
        with run.amp.autocast():
            loss_sl_s = common.seg_loss(*model(x_s), y_s, run.args.aux_weight)
        run.amp.backward(loss_sl_s)
    with run.amp.autocast():
        loss_sl_t = common.seg_loss(*model(x_t), y_t, run.args.aux_weight)
    run.amp.backward(loss_sl_t)
    return {"loss_sl_s": loss_sl_s, "loss_sl_t": loss_sl_t}


def student_step(model, b, g, run, teachers):
    """Eq. 4: KL to the teachers' ensemble on x_u (main heads) + CE on labeled x_t."""
    a = run.args
    x_u, (x_t, y_t) = b["u"][0], b["t"]
    size = x_u.shape[2:]
    with torch.no_grad(), run.amp.autocast():
        z_teachers = [common.upsample(t(x_u)[1].float(), size) for t in teachers]     # z_RL, z_SL (A8)
    p_e = ensemble_probs(z_teachers, a.kd_temp, a.ens)                                 # E(M_RL, M_SL) (A10)
    with training.grad_sync(model, last=False):         # DDP: the L_ce backward all-reduces the sum
        with run.amp.autocast():
            loss_kl = kd_loss(common.upsample(model(x_u)[1], size), p_e, a.kd_temp, a.kd_t2)   # L_kl (A9)
        run.amp.backward(a.lambda_kl * loss_kl)
    with run.amp.autocast():
        loss_ce = common.seg_loss(*model(x_t), y_t, a.aux_weight)                     # L_ce
    run.amp.backward(a.lambda_ce * loss_ce)
    return {"loss_kl": loss_kl, "loss_ce": loss_ce}


def supervised_step(model, b, g, run, _):
    """The 'Supervised DeeplabV2' row: CE on the labeled target images only."""
    x_t, y_t = b["t"]
    with run.amp.autocast():
        loss_ce = common.seg_loss(*model(x_t), y_t, run.args.aux_weight)
    run.amp.backward(loss_ce)
    return {"loss_ce": loss_ce}


def teacher_paths(run, r):
    """Checkpoints of M_RL^r and M_SL^r (or --teachers); DataError before anything is written if absent."""
    paths = [Path(p) for p in run.args.teachers] if run.args.teachers else [
        run.stage_dir(r, "rl") / "checkpoint.pth", run.stage_dir(r, "sl") / "checkpoint.pth"]
    for p in paths:
        if not p.is_file():
            raise common.DataError(f"{p}: teacher checkpoint not found (run --stage rl and --stage sl of round {r} "
                                   f"first, or pass --teachers RL SL)")
    return paths


@torch.no_grad()
def pseudo_stage(run, r):
    """Alg. 1 line 5 (BDL SSL.py): pseudo-labels for D_U from M_S^r in two passes; resumable in pass 2.

    Pass 1 histograms the max-probability per predicted class (softmax at the output stride, probabilities
    upsampled to the target size); pass 2 recomputes the maps and writes <stem>.png with worker threads.
    Under torchrun rank r labels images r, r+K, ... and the integer histograms are summed over the ranks,
    so the thresholds are exactly those of one process.
    """
    a, dist = run.args, run.dist
    folder = run.stage_dir(r, "pseudo")
    ckpt = run.stage_dir(r, "student") / "checkpoint.pth"
    th_path = folder / "thresholds.json"
    if a.resume and th_path.is_file() and json.loads(th_path.read_text())["complete"]:
        return folder
    student = run.load_model(ckpt)
    data = run.unlabeled_set()
    share = torch.utils.data.Subset(data, range(dist.rank, len(data), dist.world))   # this rank's images
    batches = lambda: torch.utils.data.DataLoader(  # noqa: E731 (in order, no randomness)
        share, batch_size=a.pl_batch_size, num_workers=a.workers, pin_memory=run.device.type == "cuda")
    w, h = a.target_size

    def probabilities(x):
        with run.amp.autocast():
            z = student(x.to(run.device, non_blocking=True))[1]
        return common.upsample(F.softmax(z.float(), 1), (h, w))                     # BDL: softmax, then upsample

    folder.mkdir(parents=True, exist_ok=True)
    if a.resume and th_path.is_file():
        th = np.asarray(json.loads(th_path.read_text())["thresholds"])
    else:
        hist = torch.zeros(run.num_classes, a.pl_bins, dtype=torch.long, device=run.device)
        for batch in batches():                                                        # pass 1
            confidence_histogram(probabilities(batch["image"]), a.pl_bins, hist)
        if dist.world > 1:
            torch.distributed.all_reduce(hist)                                          # exact: integer counts
        th = bdl_thresholds(hist, a.pl_portion, a.pl_cap)
        if dist.main:
            common.atomic_write_text(th_path, json.dumps({"thresholds": th.tolist(), "complete": False,
                                                          "pixels_per_class": hist.sum(1).tolist()}))
    th_t = torch.from_numpy(th)
    stems = data.stems()
    with ThreadPoolExecutor(max_workers=4) as pool:                                     # pass 2
        pending = []
        for batch in batches():
            names = [folder / f"{stems[i]}.png" for i in batch["index"].tolist()]
            if a.resume and all(p.is_file() for p in names):
                continue
            labels = apply_thresholds(probabilities(batch["image"]), th_t).cpu().numpy()
            pending += [pool.submit(common.save_png, p, lab) for p, lab in zip(names, labels)]
        for job in pending:
            job.result()
    training.barrier(dist)                                                                # every rank's share written
    if dist.main:
        kept = {"thresholds": th.tolist(), "complete": True}
        common.atomic_write_text(th_path, json.dumps({**json.loads(th_path.read_text()), **kept}))
    training.barrier(dist)
    return folder


def evaluate_ensemble(run, paths):
    """--stage eval / --eval-only: one model, or E(a, b) averaged at T = 1 (Table 3); class counts must agree."""
    counts = {}
    for p in paths:
        ckpt = training.load_checkpoint(p)
        state = ckpt.get("model", ckpt)
        if "layer6.conv2d_list.0.weight" not in state:
            raise common.DataError(f"{p}: no multi-level DeepLabv2 main head ('layer6') in 'model'")
        counts[p] = state["layer6.conv2d_list.0.weight"].shape[0]
    if len(set(counts.values())) > 1:
        raise common.DataError("--ensemble: the checkpoints have different class counts ("
                               + ", ".join(f"{p}: {n}" for p, n in counts.items()) + ")")
    members = [run.load_model(p) for p in paths]
    model = members[0] if len(members) == 1 else Ensemble(members, run.args.ens)
    name = "+".join(str(p) for p in paths)
    model_name = f"E({name})" if len(paths) > 1 else name
    data, metrics_name = training.eval_dataset(run.args, run.val)   # --eval-set / --split test
    if run.args.export is not None:
        return common.export_submission(model, data, data.kind, run.args.export, run.device,
                                        run.amp.dtype if run.amp.enabled else None, True,
                                        record={"checkpoint": name, "model": model_name, "iteration": None})
    run.out.mkdir(parents=True, exist_ok=True)
    training.write_run_files(run.out, run.args, dist=run.dist)
    return training.evaluate_and_write(model, data, run.device, run.out, None, run.synthia, run.amp,
                                     align_corners=True, model_name=model_name,
                                     save_predictions=run.args.save_predictions, dist=run.dist, name=metrics_name)


def round_summary(run):
    """metrics.json of the run: the final student's evaluation at the top, plus every round's three models
    (Table 4), 'final (M_S^R)' and 'best over rounds' (what Table 1 reports, A15), each labelled. Rank 0
    only (it writes the files read here); {} on the other ranks."""
    if not run.dist.main:
        return {}
    rounds = []
    for r in range(1, run.args.rounds + 1):
        entry = {"round": r}
        for stage in ("rl", "sl", "student"):
            path = run.stage_dir(r, stage) / "metrics.json"
            if path.is_file():
                entry[{"rl": "M_RL", "sl": "M_SL", "student": "M_S"}[stage]] = json.loads(path.read_text())
        rounds.append(entry)
    students = [e for e in rounds if "M_S" in e]
    summary = {"rounds": rounds}
    if students:
        last = run.stage_dir(run.args.rounds, "student") / "metrics.json"
        if last.is_file():
            summary = {**json.loads(last.read_text()), **summary, "final (M_S^R)": json.loads(last.read_text())}
        key = training.reported_key(run.synthia)                    # Table 2 reports mIoU13
        best = max(students, key=lambda e: e["M_S"][key])
        summary["best over rounds"] = {"round": best["round"], **best["M_S"],
                                       "selection": f"best student over rounds by {key}, on val (as Tables 1-2 "
                                                    f"read)"}
    common.atomic_write_text(run.out / "metrics.json", json.dumps(summary, indent=1))
    return summary


def link_final_checkpoint(run):
    """<out-dir>/checkpoint.pth = M_S^R's checkpoint (hard link, else a copy); rank 0 only."""
    if not run.dist.main:
        return
    src, dst = run.stage_dir(run.args.rounds, "student") / "checkpoint.pth", run.out / "checkpoint.pth"
    dst.unlink(missing_ok=True)
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def check_inputs(run):
    """Validate the inputs a single stage needs before anything is written (exit 2 on bad input)."""
    a, r = run.args, run.args.round
    if a.stage == "student":
        for path in teacher_paths(run, r):
            run.checkpoint(path)
    if a.stage in ("rl", "sl", "student") and r > 1 and not (a.stage == "student" and a.student_ce == "gt"):
        run.check_pseudo(r)
    if a.stage == "pseudo" and not (run.stage_dir(r, "student") / "checkpoint.pth").is_file():
        raise common.DataError(f"{run.stage_dir(r, 'student') / 'checkpoint.pth'}: student checkpoint not found "
                               f"(run --stage student --round {r} first)")
    if a.warm_start and r > 1 and a.stage in TRAINED:
        warm = run.stage_dir(r - 1, a.stage) / "checkpoint.pth"
        if not warm.is_file():
            raise common.DataError(f"{warm}: --warm-start needs the previous round's checkpoint")


def run_stage(run, r, stage):
    """One stage of round r; the teachers of a student stage are loaded frozen in eval mode."""
    if stage == "pseudo":
        return pseudo_stage(run, r)
    teachers = [run.load_model(p) for p in teacher_paths(run, r)] if stage == "student" else None
    return train_model(run, r, stage, teachers)


def run_all(run):
    """Algorithm 1: for r = 1..R train M_RL^r, M_SL^r, then M_S^r, evaluate all three; pseudo-label if r < R."""
    for r in range(1, run.args.rounds + 1):
        for stage in ("rl", "sl", "student"):                                          # lines 2-4
            run_stage(run, r, stage)
            round_summary(run)
        if r < run.args.rounds:
            run_stage(run, r, "pseudo")                                                # lines 5-6
    link_final_checkpoint(run)
    return round_summary(run)                                                          # line 8: M_S^R


def main_run(args):
    """Set up, validate, then run the requested stage(s); returns the metrics (summary for --stage all)."""
    run = Run(args)
    if args.eval_only or args.stage == "eval":
        return evaluate_ensemble(run, [Path(p) for p in (args.ensemble or [args.checkpoint])])
    check_inputs(run)
    config = run.out / "config.json"
    if args.resume and config.is_file():   # every stage folder under it was made with the saved settings
        per_call = {"stage", "round"}        # one run folder is driven stage by stage with these
        training.check_same_run({k: v for k, v in json.loads(config.read_text()).items() if k not in per_call},
                              {k: v for k, v in vars(args).items() if k not in per_call}, config)
    run.resolve_init()
    training.write_run_files(run.out, args, run.labeled, run.dist)
    if args.init == "advent" and run.dist.main:
        common.atomic_write_text(run.out / "init_sha256.txt", f"{run.init_digest}  {run.init_path}\n")
    if args.stage == "all":
        return run_all(run)
    result = run_stage(run, args.round, args.stage)
    if args.stage != "supervised":
        round_summary(run)
    return result if isinstance(result, dict) else {"pseudo_dir": str(result)}


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    summary = main_run(args)
    if args.demo and args.stage == "all" and not args.eval_only:
        baseline = copy.copy(args)
        baseline.stage = "supervised"
        supervised = main_run(baseline)
        R = args.rounds
        others = [("supervised (labeled target only)", supervised)]
        for e in summary["rounds"]:
            others += [(f"{k}^{e['round']}", e[k]) for k in ("M_RL", "M_SL", "M_S") if k in e and
                       not (k == "M_S" and e["round"] == R)]
        training.write_demo_summary(Path(args.out_dir or training.default_out_dir("dldm", args.source, args.n_labeled,
                                                                              args.seed)),
                                  "dldm.py", (f"DLDM M_S^{R}", summary["final (M_S^R)"]), others,
                                  args.iters * (3 * R + 1), time.time() - t0)
    return summary


if __name__ == "__main__":
    training.run_script(main)
