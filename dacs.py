"""DACS: Domain Adaptation via Cross-domain Mixed Sampling (Tranheden, Olsson, Pinto, Svensson, WACV 2021;
Tranheden & Olsson, MSc thesis, Chalmers 2020) — GTA5/SYNTHIA -> Cityscapes.

    python dacs.py --source gta5                  # the released configuration (thesis Table 4.3: 52.14)
    python dacs.py --source synthia               # thesis Table 4.4: 48.34 (16 classes) / 54.81 (13 classes)
    python dacs.py --source gta5 --source-only    # the "Source" row (32.85)
    python dacs.py --demo                         # DACS and source-only on the generated demo data, CPU
    python dacs.py --source cityscapes --target acdc --stack daformer   # DAFormer's Cityscapes -> ACDC (below)

What is implemented (defaults = vikolss/DACS trainUDA.py + configUDA.json, the code that produced 52.14):
a mean teacher (EMA) predicts pseudo-labels on target crops; ClassMix *across* domains pastes half of the
classes of each source ground truth onto a target image; the student learns from the source crops (L_l)
and from the mixed images (L_u), whose targets are the source labels inside the mask and the teacher's
pseudo-labels outside, weighted 1 on source pixels and q (share of confident target pixels) elsewhere.

Thesis -> code:
    Alg. 1 / §3.1 ClassMix mask (half of the classes of the source GT)   -> common.class_mask via `M`
    §3.2, Fig. 3.4 mixed image x_m = M x_s + (1 - M) x_t                   -> `x_m` (common.one_mix)
    mixed target  y_m = M y_s + (1 - M) argmax f_teacher(x_t)              -> `y_m`
    eq. 2.15 threshold_uniform weight q = |{p >= tau}| / |pixels|           -> `q`, weight map `w`
    eq. 2.14 / §3.3 L = L_l + lambda * L_u                                  -> `loss_l`, `loss_u`
    eq. 2.16 EMA teacher alpha = min(1 - 1/(i+1), 0.99)                     -> common.ema_update
    eq. 2.6 poly learning rate, power 0.9 (x10 on the classifier)           -> common.poly_factor
    §3.4 strong augmentation of mixed images (colour jitter, blur)          -> common.color_jitter/gaussian_blur
    Table 5.2 ablations: InterMix (default), IntraMix, distribution-aligned IntraMix -> --mix
    §2.5.6 distribution alignment (ReMixMatch, EMA 0.99 of predictions)    -> `align_distribution`

Authors' quirks kept by default (docs/quirks.md, D1-D13 and Q1-Q12), each with
its clean variant as a flag: two-branch ASPP sum (--aspp-full), BN in train mode with frozen affine and a
train-mode teacher whose buffers are not averaged (--teacher-eval-bn), duplicated 1x parameter group with
the PyTorch-1.5 SGD (--clean-param-groups; DACS pins no PyTorch: 1.5 is assumed, --sgd-rule torch0.4 is
<= 1.4), ceil(n/2) classes with the ignore value as a candidate (--mask-rounding floor,
--mask-exclude-ignore), jitter applied when U > 0.2, i.e. 80 % (--jitter-gate 0.5
is the thesis' 50 %), evaluation at half resolution (--eval-res full).

Deviations and assumptions:
- Seeding: the authors seed numpy only; here python/numpy/torch and every data and augmentation draw follow
  from --seed and the iteration (exact resume). This cannot change expected results.
- The batch size is general: pair k = (source k, target k), as the released code does for its two pairs.
- L_l is backpropagated right after its forward, before the teacher and mixed passes (the released code: one
  backward of L_l + L_u): the gradients add up to the same sum (bit-equal on the CPU), one graph alive at a time.
- SYNTHIA: the released script has no SYNTHIA branch (author's instructions, vikolss/DACS#4); images are kept
  at 1280x760 and cropped like GTA5; the 19-way head is trained and 16/13-class mIoU are read off the
  19x19 matrix. The source-only baseline length is not stated in the thesis; 250k iterations assumed.
- IntraMix (Table 5.2) is the ClassMix SSL mixing (teacher argmax of target image k, floor(n/2) classes,
  pasted onto target k+1, soft maps mixed, q from the mixed confidences) with DACS's augmentations; the
  distribution alignment uses the mean teacher softmax of each target batch for the EMA (alpha 0.99, start
  uniform) and the target train-label pixel frequencies as p(y) — the thesis leaves both details open.
- --demo trains a light network (--layers 1 1 1 1 --width 32) from the demo init with Adam (the paper's
  SGD 2.5e-4 needs the COCO init); it is a demonstration of the loop, not of the paper's numbers.

--stack daformer: DAFormer (Hoyer, Dai, Van Gool, CVPR 2022; lhoyer/DAFormer, final config
configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py, README: GTA5 68.3, SYNTHIA 60.9
16-class; released checkpoint 68.85), i.e. DACS on a new network with DAFormer's training, in the order of its
mmseg/models/uda/dacs.py (`train_daformer`):
    python dacs.py --source gta5 --stack daformer --init pretrained/mit_b5.pth
    network  MiT-B5 encoder + DAFormer head (separable ASPP fusion), --mit; stochastic depth 0.1 (--drop-path-rate)
    init     SegFormer's ImageNet-1k mit_b5.pth (--init PATH; default pretrained/mit_b5.pth as DAFormer; never
             downloaded), RGB mean/std normalisation
    optim    AdamW 6e-5, betas (0.9, 0.999), wd 0.01; head (`decode_head.*`) lr x10, LayerNorms wd 0 (mmcv
             paramwise_cfg); linear warm-up 1500 iterations then poly 1 (--warmup-iters); 40k iterations; fp32
    data     GTA5 fit into 1280x720 (-> 1280x704), SYNTHIA 1280x760, Cityscapes 1024x512, OpenCV-style resizes,
             512x512 crops with mmseg's cat_max_ratio 0.75 on both domains (the target's reads target labels:
             --target-cat-max-ratio 1 is the clean variant), flip 0.5; rare-class sampling of the source
             (T 0.01, 3000 px, min crop ratio 0.5: --rcs, --rcs-temp, --rcs-min-pixels)
    step     EMA update first (alpha 0.999 with the ramp min(1 - 1/(i+1), alpha), --ema-alpha; copy at i = 0);
             source CE (averaged over all pixels, mmseg) backward keeping its graph; ImageNet feature distance
             (--fd-lambda 0.005) backward; teacher pseudo-labels (train-mode BN, DropPath/Dropout off, logits
             resized to the crop); q over the target batch; weight 0 on the top 15 / bottom 120 rows of the
             512-row crop (--pl-crop v1; other crop heights scale the rows); ClassMix of ceil(n/2) classes drawn
             from the batch's union of source labels, ignore included (get_class_masks; --classmix-select image);
             jitter s 0.2 when U > 0.2, blur when U > 0.5; mixed CE backward; one AdamW step
    FD       a frozen copy of the initial encoder, in eval mode under no_grad, encodes the source batch; the
             stage-4 maps are compared (L2 over channels) at the cells whose source label, pooled over the
             32x32 cell, is one thing class (traffic light/sign, person ... bicycle) with a share >= 0.75;
             mean over those cells x 0.005. Assumption: no such cell gives 0 (the authors' mean of an empty
             tensor is NaN). Its gradient reaches the encoder only. The copy is rebuilt from --init, not saved.
    eval     the student, whole 1024x512 image (OpenCV-style resize), logits resized to the input and then to
             the 2048x1024 labels (two bilinear resizes, as mmseg)
Checkpoints hold `model`/`ema_model` under the authors' student names (backbone.*, decode_head.*); --eval-only
--checkpoint also reads the authors' released latest.pth (mmcv `state_dict` with model.*/ema_model.*). A
checkpoint of the other --stack is refused. DeepLabv2-only flags (--layers, --width, --aspp-full, --optimizer,
--clean-param-groups) are refused with --stack daformer; --mix intra* too (DAFormer mixes across domains only).
One process only (the source and FD backward passes share one forward; DAFormer trains on one GPU).
--demo --stack daformer trains the `tiny` MiT (64-channel head) from a random init (--init none), AdamW 6e-4,
warm-up 20, EMA 0.99.

--stack hrda: HRDA (Hoyer, Dai, Van Gool, ECCV 2022; lhoyer/HRDA configs/hrda/gta2csHR_hrda.py, README: GTA5 73.8,
released checkpoint 73.79), DAFormer's training with multi-resolution self-training, in the order of HRDA's dacs.py:
    python dacs.py --source gta5 --stack hrda --init pretrained/mit_b5.pth
    data     GTA5 fit into 2560x1440, Cityscapes 2048x1024, 1024x1024 crops (--crop-size), cat_max_ratio 0.75 on
             the source crops only (--target-cat-max-ratio 1), RCS min crop ratio 2.0 (a crop must hold 2 x
             --rcs-min-pixels of the sampled class)
    network  common.HRDA: MiT + DAFormer head for context and detail, scale-attention head; the authors' names
    forward  each student pass (source, mix, masked) draws its own detail box: half the crop (512x512), offsets
             on a grid of 8; context = the crop at half resolution
    loss     (1 - w) CE(fused) + w CE(detail, labels in the box), w = --hr-loss-weight 0.1
    teacher  pseudo-labels from the context view and overlapping detail windows (half a detail crop apart),
             fused logits resized to the crop; q over the batch, then the pseudo-label crop v2 (--pl-crop v2:
             weight 0 in the margins top 30 / bottom 240 / left 30 / right 30 of the 2048x1024 image, transformed
             with the crop and flip; q is taken before it)
    FD       on the context features; the ImageNet encoder encodes the half-resolution view
    eval     --eval-mode slide (default): windows of the crop every half crop over the full 2048x1024 image, each a
             full HRDA inference, averaged (HRDA test_cfg); whole: one inference of the whole image
The detail crop, the teacher's windows and the evaluation windows follow --crop-size (half of it, and the crop
itself), so small crops work in the tests; crop sides must be multiples of 16, and images at least as large as
the crop. Checkpoints use the authors' HRDA student names (backbone.*, decode_head.head.*,
decode_head.scale_attention.*); --eval-only --checkpoint reads the latest.pth of the authors' released archive.
SYNTHIA is fit into 2560x1520 (lhoyer/HRDA configs/_base_/datasets/uda_synthiaHR_to_cityscapesHR_1024x1024.py).

--mic: MIC (Hoyer et al., CVPR 2023; lhoyer/MIC, GTA5 + HRDA: 75.9), with every --stack:
    python dacs.py --source gta5 --stack hrda --mic --init pretrained/mit_b5.pth
After the mix backward, the target crop, colour-augmented with fresh draws (jitter s 0.2 when U > 0.2, blur
when U > 0.5, one op order and one sigma per batch) and multiplied by a block mask (--mask-block pixel blocks,
each dropped with probability --mask-ratio 0.7), is trained against the teacher's un-mixed pseudo-label with the
same q and crop weights, x --mask-lambda 1, with its own backward before the step. With --stack hrda the authors
scale only the fused term (--mask-lambda-all: the whole loss, the clean variant). With --stack deeplabv2 the
masked loss is one more term of DACS's loss (an assumption: MIC's DeepLabv2 runs use its DAFormer-based code).
--mic is refused with --source-only and with --mix intra*.
MIC -> code (lhoyer/MIC seg/mmseg/models/uda/masking_consistency_module.py, models/utils/masking_transforms.py):
    mask_mode (seg/experiments.py id 80)                 -> --mask-mode: separatetrgaug for --target cityscapes,
                                                            separate for acdc/dark_zurich (the default follows it)
    separatetrgaug: target batch, strong_transform      -> common.mic_masked_input (jitter, blur, then the mask)
    separate: [source 0, target 0], [GT, pseudo-label],  -> common.mic_separate_batch, then common.mic_mask_image
        weights [1, pseudo-weight], no colour augmentation  (batch size 2, as MIC asserts; else refused)
    BlockMaskGenerator: round(H/b) x round(W/b) U(0,1) > r -> common.mic_block_mask (--mask-block, --mask-ratio);
                                                            a block larger than the crop is refused
    pseudo-label/weight 'same' as the host's (one teacher) -> target_pseudo_label: q, then --pl-crop (daformer v1,
                                                            hrda none on ACDC/Dark Zurich), as the mixed stream's
    forward_train loss x mask_lambda                      -> `loss_mic` (HRDA: its fused term, with a detail box)
    the loop                                              -> mic_batch: one line per mask mode
MIC's Cityscapes -> ACDC/Dark Zurich runs are HRDA's (id 80); --stack daformer/deeplabv2 with these targets use the
same rule (an assumption). --mask-block defaults to MIC's grid of 16x16 blocks per crop: 64 px for HRDA's 1024
crops (experiments.py id 80), 32 px for the 512 crops of DAFormer and DeepLabv2 (id 81), 4 px on the demo's 64x64.

Cityscapes as the source, ACDC or Dark Zurich as the target (DAFormer/HRDA/MIC's "further datasets"):
    python dacs.py --source cityscapes --target acdc --stack daformer --init pretrained/mit_b5.pth
    python dacs.py --source cityscapes --target dark_zurich --stack hrda --init pretrained/mit_b5.pth
--target cityscapes (default), acdc (rgb_anon/<condition>/train; its gt/<condition>/train labels are read with the
images but used only by --mix intra-aligned's p(y), as DAFormer's target pipeline loads none; --acdc-conditions) or
dark_zurich (rgb_anon/train/night, no labels exist); the run evaluates on the target's val and metrics.json names it ("target";
ACDC adds a per-condition block). A source equal to the target is refused. Defaults with their sources:
    daformer source Cityscapes resized to 1024x512, target fit into 960x540, 512x512 crops, cat_max_ratio 0.75 on
             the source only (--target-cat-max-ratio 1: the target pipeline loads no annotations), RCS over the
             Cityscapes source (T 0.01), pseudo-label crop v1 kept (lhoyer/DAFormer
             configs/_base_/datasets/uda_cityscapes_to_acdc_512x512.py, uda_cityscapes_to_darkzurich_512x512.py;
             experiments.py id 8: plcrop=True); val fit into 960x540, labels at full 1920x1080 resolution
    hrda     source 2048x1024, target and val 1920x1080, 1024x1024 crops, RCS min crop ratio 2.0, slide evaluation
             (crop 1024, stride 512), no pseudo-label crop (--pl-crop none: "ACDC and DarkZurich have no
             rectification artifacts", lhoyer/HRDA experiments.py id 49; uda_cityscapesHR_to_acdcHR_1024x1024.py)
    deeplabv2 assumption (no DACS setting exists): Cityscapes source 1024x512 (DACS's Cityscapes halving),
             target fit into 960x540 (the same scale of the 1920x1080 frame), 512x512 crops, evaluation at full label
             resolution (as mmseg for these targets; --eval-res half: labels at the input)
--mic masks with --mask-mode separate on these targets (one source and one target image, no colour augmentation;
lhoyer/MIC seg/experiments.py id 80); --mix intra-aligned is refused with dark_zurich (p(y) is read from target train labels, which Dark Zurich lacks). The paper numbers
of these settings are test-server numbers: `--eval-only --checkpoint CK --split test --export DIR` writes the
submission (README "Submitting to the test servers").
--compile (README 'Compiled step'): torch.compile, in place, of the student's training forward, the EMA teacher
and (--stack daformer/hrda) the frozen ImageNet encoder; a MiT segmentor as its encoder and head (what
forward_features runs). Evaluation stays eager; checkpoints and exact resume are unchanged. AdamW (--stack
daformer/hrda) and the demo's Adam are fused on CUDA, foreach elsewhere; the SGD is the authors' LegacySGD.
"""
import copy
import time
from pathlib import Path

import torch

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (250000, "DACS configUDA.json; thesis §4.1.3"),
    "batch_size": (2, "2 source + 2 target; DACS configUDA.json"),
    "lr": (2.5e-4, "DACS configUDA.json; head x10"),
    "source_size": (None, "GTA5 1280 720 (DACS/trainUDA.py), SYNTHIA kept at 1280 760 (thesis §4.1.3)"),
    "target_size": ((1024, 512), "DACS data/augmentations.py RandomCrop_city halves the 2048x1024 images"),
    "crop_size": ((512, 512), "DACS configUDA.json input_size; data/augmentations.py RandomCrop_gta/_city"),
    "eval_res": ("half", "DACS/evaluateUDA.py"),
    "init": ("coco", "DACS configUDA.json 'pretrained: coco'"),
    "sgd_rule": ("torch1.5", "assumption: vikolss/DACS pins no PyTorch; its sibling ClassMix pins torch==1.5.0"),
    "eval_every": (5000, "DACS configUDA.json"),
    "save_every": (5000, "DACS configUDA.json"),
}
DEMO = {"source": "demo", "iters": 400, "lr": 1e-3, "optimizer": "adam", "layers": [1, 1, 1, 1],
        "width": 32, "init": "demo", "source_size": [128, 64], "target_size": [128, 64], "crop_size": [64, 64],
        "eval_every": 0, "save_every": 100, "log_every": 25, "workers": 0}
SOURCE_SIZE = {"gta5": (1280, 720), "synthia": (1280, 760), "demo": None,
               "cityscapes": (1024, 512)}   # DAFormer's Cityscapes source resize (uda_cityscapes_to_acdc_512x512.py)
DAFORMER = {  # --stack daformer: lhoyer/DAFormer configs/daformer/
    # gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py and the _base_ configs it names
    "iters": 40000, "batch_size": 2, "lr": 6e-5,          # runner max_iters; samples_per_gpu; schedules/adamw.py
    "target_size": (1024, 512), "crop_size": (512, 512),  # uda_gta_to_cityscapes_512x512.py (GTA5 fits 1280x720)
    "eval_res": "full", "eval_every": 4000, "save_every": 4000, "init": "pretrained/mit_b5.pth",
    "mit": "b5", "drop_path_rate": 0.1,                   # models/daformer_sepaspp_mitb5.py, mit_b5
    "fd_lambda": 0.005, "pl_crop": "v1", "ema_alpha": 0.999,
    "warmup_iters": 1500, "rcs": "source", "rcs_temp": 0.01, "rcs_min_pixels": 3000,   # poly10warm.py; rcs cfg
    "classmix_select": "batch", "target_cat_max_ratio": 0.75,   # dacs_transforms.get_class_masks; target pipeline
}
HRDA = {**DAFORMER,  # --stack hrda: lhoyer/HRDA configs/hrda/gta2csHR_hrda.py and uda_gtaHR_to_cityscapesHR_1024x1024.py
    "target_size": (2048, 1024), "crop_size": (1024, 1024),  # Cityscapes at full size, 1024x1024 crops
    "pl_crop": "v2", "hr_loss_weight": 0.1, "eval_mode": "slide",  # crop_pseudo_margins; hr_loss_weight; test_cfg
    "target_cat_max_ratio": 1.0}                             # cat_max_ratio 0.75 on the source crops only
HRDA_SOURCE_SIZE = {"gta5": (2560, 1440), "synthia": (2560, 1520), "demo": None,   # HRDA uda_{gta,synthia}HR_*.py
                    "cityscapes": (2048, 1024)}                   # HRDA uda_cityscapesHR_to_acdcHR_1024x1024.py
RCS_MIN_CROP_RATIO = {"daformer": 0.5, "hrda": 2.0}   # DAFormer / HRDA rare_class_sampling min_crop_ratio
DAFORMER_FLAGS = ("warmup_iters", "rcs", "rcs_temp", "rcs_min_pixels", "classmix_select", "target_cat_max_ratio")
DEMO_DAFORMER = {"source": "demo", "iters": 400, "lr": 6e-4, "mit": "tiny", "init": "none", "ema_alpha": 0.99,
                 "warmup_iters": 20, "rcs_min_pixels": 12, "source_size": [128, 64], "target_size": [128, 64],
                 "crop_size": [64, 64], "eval_every": 0, "save_every": 100, "log_every": 25, "workers": 0}
DEMO_HRDA = {**DEMO_DAFORMER, "pl_crop": "v1"}   # the demo images are far smaller than v2's 2048x1024 margins
NO_TARGET_LABELS = {"target_cat_max_ratio": 1.0}   # DAFormer/HRDA cs2acdc, cs2darkzurich: no target annotations loaded
TARGETS = {  # --target acdc/dark_zurich beyond the resize (training.set_target_defaults) per --stack
    "daformer": {"acdc": NO_TARGET_LABELS, "dark_zurich": NO_TARGET_LABELS},   # plcrop kept: DAFormer experiments.py id 8
    "hrda": {"acdc": {"pl_crop": "none"}, "dark_zurich": {"pl_crop": "none"}},  # HRDA experiments.py id 49: plcrop False
}


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--source", choices=["gta5", "synthia", "cityscapes", "demo"], default="gta5",
                   help="source domain (labeled)")
    training.add_target_arg(p)
    p.add_argument("--source-only", action="store_true",
                   help="baseline: supervised source loss only, no teacher (thesis 'Source' rows; --stack daformer/"
                        "hrda: no feature distance either)")
    p.add_argument("--mix", choices=["inter", "intra", "intra-aligned"], default="inter",
                   help="Table 5.2: InterMix = DACS (default), IntraMix = ClassMix within the target, "
                        "intra-aligned = IntraMix + distribution alignment to the target label frequencies")
    p.add_argument("--pixel-weight", choices=["threshold_uniform", "threshold", "none"], default="threshold_uniform",
                   help="weight of the pseudo-labelled pixels: share q of confident target pixels (default), "
                        "1 on each confident pixel only, or 1 everywhere (DACS configUDA.json 'pixel_weight', the "
                        "options of DACS/trainUDA.py; IntraMix: from the mixed confidences, as ClassMix trainSSL.py)")
    p.add_argument("--tau", type=float, default=0.968,
                   help="confidence threshold of q and of --pixel-weight threshold (DACS/trainUDA.py)")
    p.add_argument("--ema-alpha", type=float, default=0.99, help="teacher EMA momentum (DACS/trainUDA.py)")
    p.add_argument("--consistency-weight", type=float, default=1.0,
                   help="lambda of L_u, >= 0 (DACS configUDA.json 'consistency_weight')")
    p.add_argument("--mask-rounding", choices=["ceil", "floor"], default=None,
                   help="classes pasted from n: ceil(n/2) (DACS code) or floor(n/2) (ClassMix code) (default: "
                        "ceil with --mix inter, floor with IntraMix)")
    p.add_argument("--mask-exclude-ignore", action="store_true",
                   help="clean variant: never draw the ignore value as a class (DACS draws it; docs/quirks.md D1)")
    p.add_argument("--no-jitter", action="store_true", help="no colour jitter on mixed images (config: on)")
    p.add_argument("--no-blur", action="store_true", help="no Gaussian blur on mixed images (config: on)")
    p.add_argument("--jitter-gate", type=float, default=0.2,
                   help="jitter applied when U(0,1) > gate: 0.2 = 80 %% (DACS code), 0.5 = thesis §5.2.1")
    p.add_argument("--aspp-full", action="store_true",
                   help="clean variant: sum all four ASPP branches (the authors' code sums two; docs/quirks.md Q1)")
    p.add_argument("--teacher-eval-bn", action="store_true",
                   help="clean variant: teacher predicts with eval-mode BN and EMA-averaged running stats "
                        "(authors: train-mode BN on the target batch, buffers not averaged; docs/quirks.md Q3)")
    p.add_argument("--clean-param-groups", action="store_true",
                   help="clean variant: each tensor once in the 1x group (changes results: ~3x lower "
                        "effective backbone LR than the authors' duplicated group; docs/quirks.md Q4)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd = the authors' SGD 0.9 / wd 5e-4; adam is for the random-init demo (one learning "
                        "rate for all parameters, no x10 head, each tensor once)")
    training.add_stack_args(p)
    p.add_argument("--warmup-iters", type=int, default=None,
                   help="--stack daformer: linear warm-up length before the poly decay (default: 1500, DAFormer "
                        "poly10warm)")
    p.add_argument("--rcs", choices=["source", "none"], default=None,
                   help="--stack daformer: rare-class sampling of the source images (default: source, DAFormer) or off")
    p.add_argument("--rcs-temp", type=float, default=None, help="--stack daformer: RCS temperature T (default: 0.01)")
    p.add_argument("--rcs-min-pixels", type=int, default=None,
                   help="--stack daformer: RCS min_pixels at original resolution; a crop must hold half as many "
                        "(default: 3000, min_crop_ratio 0.5)")
    p.add_argument("--classmix-select", choices=["image", "batch"], default=None,
                   help="--stack daformer: ClassMix classes of each source label drawn from the batch's union, "
                        "ignore included (default: batch, DAFormer get_class_masks) or from the image itself")
    p.add_argument("--mask-mode", choices=["separatetrgaug", "separate"], default=None,
                   help="--mic: what is masked (lhoyer/MIC mask_mode): the colour-augmented target batch, or source "
                        "image 0 and target image 0 without colour augmentation (batch size 2) (default: "
                        "separatetrgaug with --target cityscapes, separate with acdc/dark_zurich, MIC "
                        "seg/experiments.py id 80)")
    p.add_argument("--target-cat-max-ratio", type=float, default=None,
                   help="--stack daformer: mmseg's crop retry rule on the target crops, which reads the target "
                        "labels (default: 0.75, DAFormer's Cityscapes pipeline); 1 = a plain random crop (clean "
                        "variant: no target label is read)")
    args = training.parse_with_stack(p, {"daformer": DAFORMER, "hrda": HRDA},
                                     {"deeplabv2": DEMO, "daformer": DEMO_DAFORMER, "hrda": DEMO_HRDA}, argv,
                                     DAFORMER_FLAGS, TARGETS)
    training.check_args(args)
    training.check_target(args, args.source, args.target)
    if args.mix == "intra-aligned" and args.target == "dark_zurich":
        raise common.DataError("--mix intra-aligned --target dark_zurich: the alignment reads the target train label "
                               "frequencies, and Dark Zurich train has no labels")
    check_mic_args(args)
    if args.stack != "deeplabv2":
        check_daformer_args(args)
    if args.mic and args.source_only:
        raise common.DataError("--mic with --source-only: MIC trains on the teacher's target pseudo-labels; drop one")
    if args.mic and args.mix != "inter":
        raise common.DataError(f"--mic with --mix {args.mix}: MIC is implemented on top of the cross-domain mix "
                               "(--mix inter) only")
    if args.stack == "hrda" and args.source_size is None:
        args.source_size = HRDA_SOURCE_SIZE[args.source]
    if not 0 < args.ema_alpha < 1 or not 0 <= args.jitter_gate <= 1 or not 0 < args.tau <= 1:
        raise common.DataError("--ema-alpha in (0,1), --jitter-gate in [0,1] and --tau in (0,1] expected")
    if args.consistency_weight < 0:
        raise common.DataError(f"--consistency-weight {args.consistency_weight}: expected >= 0")
    if args.source_size is None:
        args.source_size = SOURCE_SIZE[args.source]
    if args.stack == "hrda" and not args.eval_only:
        training.check_hrda_args(args)
    mixing = not args.source_only and not args.eval_only
    if mixing and args.mix != "inter" and args.batch_size < 2:
        raise common.DataError(f"--mix {args.mix} pairs target image k with k+1: --batch-size {args.batch_size}, "
                               f"expected at least 2")
    if mixing and args.mix == "inter" and not any(args.crop_size):
        import demo
        frame = args.source_size or demo.SIZE[::-1]        # the demo source keeps its images (W H)
        if tuple(frame) != tuple(args.target_size):
            raise common.DataError(f"--crop-size 0 0: InterMix pastes source pixels onto the target image, so "
                                   f"both need one size; source {frame[0]} {frame[1]}, --target-size "
                                   f"{args.target_size[0]} {args.target_size[1]}")
    if args.mask_rounding is None:
        args.mask_rounding = "ceil" if args.mix == "inter" else "floor"
    return args


def check_mic_args(args):
    """--mic: --mask-mode's default from the target (MIC experiments.py id 80), batch size 2 for 'separate'
    (DataError)."""
    if args.mask_mode is not None and not args.mic:
        raise common.DataError("--mask-mode is a --mic flag; add --mic or drop it")
    if not args.mic:
        return
    args.mask_mode = args.mask_mode or ("separatetrgaug" if args.target == "cityscapes" else "separate")
    if args.mask_mode == "separate" and args.batch_size != 2:
        raise common.DataError(f"--mask-mode separate masks source image 0 and target image 0 of batches of 2 "
                               f"(lhoyer/MIC asserts it): --batch-size {args.batch_size}, expected 2")


def mic_batch(x_s, y_s, x_t, y_t, w_t, norm, g, args):
    """MIC's masked images, labels and pixel weights for --mask-mode: separatetrgaug = the colour-augmented target
    batch against the pseudo-label and weights; separate = [source 0, target 0] against [GT, pseudo-label] with
    weights [1, pseudo-weight], not colour-augmented (lhoyer/MIC masking_consistency_module.py)."""
    if args.mask_mode == "separatetrgaug":
        return common.mic_masked_input(x_t, norm, g, args.mask_block, args.mask_ratio), y_t, w_t
    x_k, y_k, w_k = common.mic_separate_batch(x_s, y_s, x_t, y_t, w_t)
    return common.mic_mask_image(x_k, g, args.mask_block, args.mask_ratio), y_k, w_k


def check_daformer_args(args):
    """--stack daformer: the mit init file and the ranges of its flags (DataError)."""
    if not args.eval_only:
        training.check_mit_init(args)
    if args.mix != "inter":
        raise common.DataError(f"--mix {args.mix}: --stack daformer trains DAFormer's cross-domain ClassMix only")
    if not (args.fd_lambda >= 0 and 0 <= args.drop_path_rate < 1 and args.warmup_iters >= 0 and args.rcs_temp > 0
            and args.rcs_min_pixels >= 0 and 0 < args.target_cat_max_ratio <= 1):
        raise common.DataError("--fd-lambda >= 0, --drop-path-rate in [0,1), --warmup-iters >= 0, --rcs-temp > 0, "
                               "--rcs-min-pixels >= 0 and --target-cat-max-ratio in (0,1] expected")


def target_pseudo_label(teacher_logits, args, pl_crop=None, valid=None):
    """(pseudo-label, weight map, q): weight q (--pixel-weight) over the target batch, then 0 on the rows of
    --pl-crop v1 or outside the v2 margins `valid` (q is taken before the crop, as DAFormer and HRDA)."""
    mode = {"threshold_uniform": "uniform", "threshold": "pixel", "none": "none"}[args.pixel_weight]
    y_t, q, _ = common.pseudo_label(teacher_logits, args.tau, mode)  # uniform: q over both target images (D2)
    share = q.mean()
    if pl_crop == "v1":                               # DAFormer dacs.py: after q, before the mix
        q = common.pseudo_label_crop(q)
    elif pl_crop == "v2":                             # HRDA dacs.py: the transformed margin mask
        q = q * valid
    return y_t, q, share


def cross_domain_mix(x_s, y_s, x_t, teacher_logits, g, args, pl_crop=None, batch_union=False, valid=None):
    """InterMix (§3.2): classes of source GT k pasted onto target image k; weight 1 on pasted pixels, q elsewhere
    (--stack daformer/hrda: q is 0 on the rows of --pl-crop v1 or outside the v2 margins `valid`, and the
    classes may come from the batch's union)."""
    y_t, q, share = target_pseudo_label(teacher_logits, args, pl_crop, valid)
    M = common.class_mix_mask(y_s, g, rule=args.mask_rounding, drop_ignore=args.mask_exclude_ignore,
                              batch_union=batch_union)
    x_m = common.one_mix(M, x_s, x_t)
    y_m = common.one_mix(M, y_s, y_t)                 # pasted ignore pixels keep 255 (ignored)
    w = common.one_mix(M, torch.ones_like(q), q)
    return x_m, y_m, w, share


def intra_domain_mix(x_t, teacher_prob, g, args):
    """IntraMix (Table 5.2): ClassMix SSL within the target: classes of teacher argmax k pasted onto target k+1;
    --pixel-weight on the mixed confidences (CM/trainSSL.py): q everywhere, the confident pixels, or 1."""
    M = common.class_mix_mask(teacher_prob.argmax(1), g, rule=args.mask_rounding, drop_ignore=True)
    x_m = common.mix_pairs(M, x_t)
    conf, y_m = common.mix_pairs(M, teacher_prob).max(1)   # mixed soft maps, then max/argmax (CM/trainSSL.py)
    confident = (conf >= args.tau).float()
    q = confident.mean()
    w = {"threshold_uniform": q * torch.ones_like(conf), "threshold": confident,
         "none": torch.ones_like(conf)}[args.pixel_weight]
    return x_m, y_m, w, q


def align_distribution(prob, p_target, p_model):
    """ReMixMatch alignment (§2.5.6): scale each pixel's distribution by p(y)/p~(y) and renormalise."""
    prob = prob * (p_target / p_model).view(1, -1, 1, 1)
    return prob / prob.sum(1, keepdim=True)


def train(args):
    if args.stack != "deeplabv2":
        return train_daformer(args)
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    training.apply_world(args, dist, device, pairs_within_batch=args.mix != "inter" and not args.source_only)
    check_mic_args(args)                  # again on the per-process batch (--global-batch paper divides it)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    style, norm = common.init_convention(args.init)
    common.seed_everything(args.seed)
    out_dir = Path(args.out_dir or training.default_out_dir("dacs", args.source + "_source_only" * args.source_only,
                                                          None, args.seed, args.target))
    # ---------------------------------------------------------------- data
    source_kind, source_root, target_kind, target_root = training.data_roots(args, args.source, args.target)
    val = training.target_val(target_kind, target_root, args.target_size, args.eval_res, norm,
                              conditions=args.acdc_conditions)
    build = lambda: common.DeepLabV2(19, aspp_full=args.aspp_full, style=style, layers=args.layers,  # noqa: E731
                                     width=args.width)
    student = training.prepare_model(build(), device, amp)
    synthia = args.source == "synthia"
    if args.eval_only:
        return training.eval_only(args, student, val, device, out_dir, synthia, dist=dist)
    source = common.SegmentationDataset(source_kind, source_root, resize=args.source_size, interp="bicubic",
                                        crop=args.crop_size, norm=norm)
    target = common.SegmentationDataset(target_kind, target_root, resize=args.target_size, crop=args.crop_size,
                                        keep_ratio=common.target_keeps_ratio(args.stack, target_kind),
                                        norm=norm, conditions=args.acdc_conditions)
    # ---------------------------------------------------------------- models, optimiser
    training.initialise(student, args.init, norm, args.data_root)
    teacher = None if args.source_only else training.prepare_model(      # train-mode BN as the authors' (Q3)
        common.ema_teacher(student, build, train_bn=not args.teacher_eval_bn), device, amp)
    optimizer = common.deeplab_optimizer(student, args.lr, args.optimizer, not args.clean_param_groups, args.sgd_rule)
    scheduler = common.lr_scheduler(optimizer, lambda i: common.poly_factor(i, args.iters))
    ckpt = training.resume_state(args, out_dir, 19)
    p_target = p_model = None
    if args.mix == "intra-aligned" and not args.source_only:
        if ckpt is not None and "p_model" not in ckpt:   # e.g. an authors' checkpoint: no distribution alignment
            raise common.DataError("--resume: the checkpoint has no 'p_model' (--mix intra-aligned's running mean)")
        out_dir.mkdir(parents=True, exist_ok=True)
        counts = torch.zeros(19, dtype=torch.float64)
        with training.main_first(dist):   # rank 0 writes the cache, the others read it
            stats = common.rcs_statistics(target, cache=out_dir / "target_class_counts.json")
        for d in stats:
            for c, n in d.items():
                counts[c] += n
        p_target = (counts / counts.sum()).float().clamp(min=1e-6).to(device)
        p_model = torch.full((19,), 1 / 19, device=device)
    start = 0
    if ckpt is not None:
        start = training.restore_training(ckpt, student, optimizer, scheduler, teacher, args.seed, dist)
        if p_model is not None:
            p_model.copy_(ckpt["p_model"])
    training.write_run_files(out_dir, args, dist=dist)
    model = training.ddp(student, dist, device, args.sync_bn)   # training forwards; `student` for the rest
    training.compile_networks(args, model, teacher)               # --compile: in place, checkpoints unchanged
    loader_s = training.shuffled_loader(source, args, 0, start, dist=dist)
    loader_t = None if args.source_only else training.shuffled_loader(target, args, 1, start, dist=dist)
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    metrics = None  # the last evaluation
    # ---------------------------------------------------------------- training loop (DACS/trainUDA.py order)
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        student.train()
        g = common.step_generator(args.seed, i, dist.rank)
        optimizer.zero_grad(set_to_none=True)
        x_s, y_s = training.next_batch(loader_s, device)
        with training.cast_once(amp):                                   # the weights cast once for both passes
            with training.grad_sync(model, last=teacher is None):
                with amp.autocast():
                    loss_l = common.ce_loss(common.upsample(model(x_s), y_s.shape[1:]), y_s)     # L_l, source CE
                amp.backward(loss_l)      # before the mixed forward: one graph alive; the gradients add up
            losses = {"loss_l": loss_l.detach()}
            if teacher is not None:
                x_t, _ = training.next_batch(loader_t, device)                 # target labels unused
                with torch.no_grad(), amp.autocast():
                    logits_t = common.upsample(teacher(x_t).float(), x_t.shape[2:])
                if args.mix == "inter":
                    x_m, y_m, w, q = cross_domain_mix(x_s, y_s, x_t, logits_t, g, args)
                else:
                    prob_t = logits_t.softmax(1)
                    if p_model is not None:  # §2.5.6: running mean of the predictions, then alignment
                        batch_mean = prob_t.mean((0, 2, 3))
                        if dist.world > 1:   # the global batch's mean: p_model stays the same on every rank
                            torch.distributed.all_reduce(batch_mean)
                            batch_mean /= dist.world
                        p_model.lerp_(batch_mean, 0.01)   # EMA 0.99 (thesis §5.2.2)
                        prob_t = align_distribution(prob_t, p_target, p_model)
                    x_m, y_m, w, q = intra_domain_mix(x_t, prob_t, g, args)
                if not args.no_jitter:  # §3.4; one gate per iteration, own factors and op order per image (D6)
                    x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=True)
                if not args.no_blur:
                    x_m = common.gaussian_blur(x_m, g, per_image=True)
                with training.grad_sync(model, last=not args.mic):
                    with amp.autocast():
                        logits_m = common.upsample(model(x_m), y_m.shape[1:])
                        loss_u = args.consistency_weight * common.ce_pixel_weighted(logits_m, y_m, w)   # lambda * L_u
                    amp.backward(loss_u)
                losses.update(loss_u=loss_u, q=q)
                if args.mic:   # MIC (--mask-mode): masked images against the unmixed pseudo-label (+ GT), added to L
                    y_t, w_t, _ = target_pseudo_label(logits_t, args)
                    x_k, y_k, w_k = mic_batch(x_s, y_s, x_t, y_t, w_t, norm, g, args)
                    with amp.autocast():
                        losses["loss_mic"] = args.mask_lambda * common.ce_pixel_weighted(
                            common.upsample(model(x_k), y_k.shape[1:]), y_k, w_k)
                    amp.backward(losses["loss_mic"])
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if teacher is not None:
            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)
        log.log(i, losses, lr)
        # ------------------------------------------------------------ checkpoints, evaluation
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            state = training.training_state(i + 1, student, optimizer, scheduler, args, teacher)
            if p_model is not None:
                state["p_model"] = p_model
            training.write_checkpoints(out_dir, state, args.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, out_dir)
        if training.is_due(i, args.eval_every, args.iters):
            metrics = training.evaluate_and_write(student, val, device, out_dir, i + 1, synthia, amp, dist=dist)
    stop.restore()
    return metrics or training.evaluate_and_write(student, val, device, out_dir, start, synthia, amp,
                                                dist=dist)  # a finished run


def train_daformer(args):
    """DAFormer (Hoyer et al., CVPR 2022) or HRDA (ECCV 2022), + MIC (CVPR 2023) with --mic: DACS on MiT + DAFormer
    head, in the order of lhoyer/DAFormer's (lhoyer/HRDA's, lhoyer/MIC's) mmseg/models/uda/dacs.py."""
    hrda = args.stack == "hrda"
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    if dist.world > 1:
        raise common.DataError(f"--stack {args.stack} runs in one process (DAFormer/HRDA train on one GPU; the "
                               "source and feature-distance backward passes share one forward): launch it without "
                               "torchrun")
    amp = training.Amp(device, args.amp, args.amp_dtype)
    norm = "imagenet_rgb"                                # DAFormer img_norm_cfg: RGB mean/std
    common.seed_everything(args.seed)
    out_dir = Path(args.out_dir or training.default_out_dir("dacs", args.source + "_source_only" * args.source_only,
                                                          None, args.seed, args.target))
    up = lambda logits, size: common.upsample(logits, size, align_corners=False)  # noqa: E731 (mmseg resize)
    # ---------------------------------------------------------------- data
    source_kind, source_root, target_kind, target_root = training.data_roots(args, args.source, args.target)
    val = training.target_val(target_kind, target_root, args.target_size, args.eval_res, norm, interp="cv2",
                              conditions=args.acdc_conditions, stack=args.stack)
    detail = tuple(c // 2 for c in args.crop_size)       # HRDA: 512x512 detail crops of the 1024x1024 crop
    if hrda:
        build = lambda stochastic=True: common.hrda_segmentor(19, args.mit, args.drop_path_rate,  # noqa: E731
                                                              stochastic, detail)
    else:
        build = lambda stochastic=True: common.daformer_segmentor(19, args.mit, args.drop_path_rate,  # noqa: E731
                                                                  stochastic)
    student = training.prepare_model(build(), device, amp)
    evaluated = student                                  # HRDA test_cfg: windows of the crop every half crop
    if hrda and args.eval_mode == "slide":
        evaluated = training.WeightsOf(common.SlideInference(student, args.crop_size, detail))
    synthia = args.source == "synthia"
    if args.eval_only:
        return training.eval_only(args, evaluated, val, device, out_dir, synthia, align_corners=False, dist=dist)
    crop = args.crop_size if min(args.crop_size) > 0 else None
    source = common.SegmentationDataset(source_kind, source_root, resize=args.source_size, keep_ratio=True,
                                        interp="cv2", crop=crop, cat_max_ratio=0.75, flip=True, norm=norm,
                                        rcs_min_crop_pixels=int(args.rcs_min_pixels * RCS_MIN_CROP_RATIO[args.stack]))
    target = common.SegmentationDataset(target_kind, target_root, resize=args.target_size,
                                        keep_ratio=common.target_keeps_ratio(args.stack, target_kind),
                                        interp="cv2", crop=crop,
                                        cat_max_ratio=args.target_cat_max_ratio if args.target_cat_max_ratio < 1
                                        else None, flip=True, norm=norm, conditions=args.acdc_conditions)
    if args.pl_crop == "v2":                             # HRDA: the margin mask travels with the target crop
        target = common.PseudoMarginDataset(target)
    # ---------------------------------------------------------------- models, optimiser
    if args.init != "none":
        common.load_mit_imagenet(student.backbone, args.init)
    use_fd = args.fd_lambda > 0 and not args.source_only
    imnet = copy.deepcopy(student.backbone).eval().requires_grad_(False) if use_fd else None  # frozen, never saved
    teacher = None if args.source_only else training.prepare_model(common.ema_teacher(  # no DropPath/Dropout
        student, lambda: build(stochastic=False), train_bn=not args.teacher_eval_bn), device, amp)
    training.compile_networks(args, student, teacher, imnet)      # --compile: in place, checkpoints unchanged
    optimizer = torch.optim.AdamW(common.daformer_param_groups(student, args.lr), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=0.01, **common.adam_kernels(device))
    scheduler = common.lr_scheduler(optimizer, lambda i: common.warmup_poly_factor(i, args.iters, args.warmup_iters))
    ckpt = training.resume_state(args, out_dir, 19)
    start = 0 if ckpt is None else ckpt["iteration"]
    if args.rcs == "source":   # the loaders draw from torch's RNG when they start: before the RNG is restored
        loader_s = training.rare_class_loader(source, args, 0, start, 19, out_dir / "rcs_counts_0.json", dist)
    else:
        loader_s = training.shuffled_loader(source, args, 0, start, dist=dist)
    loader_t = None if args.source_only else training.shuffled_loader(target, args, 1, start, dist=dist)
    if ckpt is not None:       # DropPath draws from torch's RNG: it continues exactly
        start = training.restore_training(ckpt, student, optimizer, scheduler, teacher, args.seed, dist)
    training.write_run_files(out_dir, args, dist=dist)
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    metrics = None  # the last evaluation

    def stream_loss(x, y, w, g, fused_scale=1.0):
        """(loss, encoder features) of one student pass: DAFormer's CE, or HRDA's 0.9 fused + 0.1 detail with a
        fresh detail box (fused_scale: MIC's lambda on the fused term) and the context features."""
        if hrda:
            out = student(x, common.hr_crop_box(x.shape[2:], detail, g))
            return common.hrda_loss(out, y, w, args.hr_loss_weight, fused_scale), out.features
        features, logits = student.forward_features(x)
        return fused_scale * common.ce_pixel_weighted(up(logits, y.shape[1:]), y, w), features
    # ---------------------------------------------------------------- training loop (DAFormer/HRDA/MIC dacs.py order)
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        student.train()
        g = common.step_generator(args.seed, i, dist.rank)
        if teacher is not None and i > 0:                      # EMA first; at i = 0 the teacher is a copy
            common.ema_update(teacher, student, i, args.ema_alpha, args.teacher_eval_bn)
        optimizer.zero_grad(set_to_none=True)
        x_s, y_s = training.next_batch(loader_s, device)
        with training.cast_once(amp):                            # the weights cast once for every pass
            with amp.autocast():
                loss_l, features = stream_loss(x_s, y_s, 1.0, g)
            losses = {"loss_l": loss_l}
            amp.backward(loss_l, retain_graph=use_fd)                # source CE first, its graph kept for FD
            if use_fd:          # ImageNet feature distance, stage 4 only (HRDA: of the context view)
                with amp.autocast():
                    losses["loss_fd"] = args.fd_lambda * common.thing_feature_distance(
                        features[-1], imnet, common.context_view(x_s) if hrda else x_s, y_s)
                amp.backward(losses["loss_fd"])                      # reaches the encoder only
                losses["loss_l"] = loss_l.detach()                   # the source graph kept for FD is freed here,
                del loss_l, features                                 # not after the later streams
            if teacher is not None:
                x_t, valid = training.next_target_batch(loader_t, device)   # labels unused (but by the crop rule)
                with torch.no_grad(), amp.autocast():                # HRDA: overlapping detail windows
                    logits_t = up(teacher(x_t).float(), x_t.shape[2:])
                x_m, y_m, w, q = cross_domain_mix(x_s, y_s, x_t, logits_t, g, args, args.pl_crop,
                                                  args.classmix_select == "batch", valid)
                if not args.no_jitter:  # DAFormer: s 0.2, p 0.2; one switch per iteration, factors and order per image
                    x_m = common.color_jitter(x_m, norm, g, strength=0.2, gate=args.jitter_gate, per_image_order=True)
                if not args.no_blur:
                    x_m = common.gaussian_blur(x_m, g, per_image=True)
                with amp.autocast():
                    loss_u = args.consistency_weight * stream_loss(x_m, y_m, w, g)[0]
                amp.backward(loss_u)
                losses.update(loss_u=loss_u, q=q)
                if args.mic:   # MIC (--mask-mode): masked images against the unmixed pseudo-label (+ GT) and weights
                    y_t, w_t, _ = target_pseudo_label(logits_t, args, args.pl_crop, valid)
                    x_k, y_k, w_k = mic_batch(x_s, y_s, x_t, y_t, w_t, norm, g, args)
                    fused_only = hrda and not args.mask_lambda_all   # MIC scales HRDA's fused term only
                    with amp.autocast():
                        loss_mic = stream_loss(x_k, y_k, w_k, g, args.mask_lambda if fused_only else 1.0)[0]
                        losses["loss_mic"] = loss_mic if fused_only else args.mask_lambda * loss_mic
                    amp.backward(losses["loss_mic"])
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        log.log(i, losses, lr)
        # ------------------------------------------------------------ checkpoints, evaluation
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            training.write_checkpoints(out_dir, training.training_state(i + 1, student, optimizer, scheduler, args,
                                                                    teacher), args.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, out_dir)
        if training.is_due(i, args.eval_every, args.iters):
            metrics = training.evaluate_and_write(evaluated, val, device, out_dir, i + 1, synthia, amp,
                                                align_corners=False, dist=dist)
    stop.restore()
    return metrics or training.evaluate_and_write(evaluated, val, device, out_dir, start, synthia, amp,
                                                align_corners=False, dist=dist)  # a finished run


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    metrics = train(args)
    if args.demo and not args.source_only and not args.eval_only:
        baseline = copy.copy(args)
        baseline.source_only, baseline.out_dir = True, None if args.out_dir is None else args.out_dir + "_source_only"
        base = train(baseline)
        out_dir = args.out_dir or training.default_out_dir("dacs", args.source, None, args.seed)
        name = {"deeplabv2": "DACS", "daformer": "DAFormer", "hrda": "HRDA"}[args.stack]
        name = f"MIC({name})" if args.mic else name
        training.write_demo_summary(out_dir, "dacs.py", (name, metrics), [("source-only", base)], args.iters,
                                  time.time() - t0)
    return metrics


if __name__ == "__main__":
    training.run_script(main)
