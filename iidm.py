"""IIDM: Inter- and Intra-Domain Mixing for semi-supervised domain adaptation in semantic segmentation
(Fu et al., AAAI 2024) — GTA5/SYNTHIA + a few labeled Cityscapes images -> Cityscapes.

    python iidm.py --source gta5 --n-labeled 100        # paper Table 1: 69.5 mIoU (200: 70.0, 500: 70.6, 1000: 72.8)
    python iidm.py --source synthia --n-labeled 100     # paper Table 2: 74.2 13-class mIoU
    python iidm.py --demo                                # IIDM and two baselines on the demo data, CPU, minutes

No public IIDM code exists; the set-up is reconstructed from the paper and the DAFormer code it follows
(lhoyer/DAFormer; assumptions A1-A18 below). A mean teacher predicts a pseudo-label y_u and one
quality q for each unlabeled target crop x_u. The same x_u is mixed twice: half of the classes of the
source ground truth y_s are pasted onto it (inter-domain stream, mask M1), and half of the classes of the
labeled-target ground truth y_t are pasted onto it (intra-domain stream, mask M2). The student learns
from the source and labeled-target crops (L_s, L_t) and from both mixed images (L_inter, L_intra).

Paper -> code:
    eq. 1  x_inter = M1 x_s + (1 - M1) x_u              -> mixed_streams: one_mix(M1, x_s, x_u), M1 from y_s
    eq. 2  y_inter = M1 y_s + (1 - M1) y_u              -> mixed_streams: one_mix(M1, y_s, y_u)
    eq. 3  x_intra = M2 x_t + (1 - M2) x_u              -> mixed_streams: one_mix(M2, x_t, x_u), M2 from y_t
    eq. 4  y_intra = M2 y_t + (1 - M2) y_u              -> mixed_streams: one_mix(M2, y_t, y_u)
    eq. 5  teacher EMA, alpha 0.99                       -> common.ema_update (DAFormer order: before the step)
    eq. 6  quality q = share of pixels with max p >= tau -> `q` (one scalar over the unlabeled batch, A12)
    eq. 7  L_inter, eq. 8 L_intra (q-weighted CE)         -> `loss_inter`, `loss_intra` (weight 1 on pasted GT, A13)
    eq. 9  L_s, eq. 10 L_t (supervised CE)                -> `loss_s`, `loss_t`
    eq. 11 L = L_s + L_t + lambda L_inter + mu L_intra   -> --lambda 1, --mu 2
    Table 4 loss ablations -> --no-src-sup/--no-tgt-sup/--no-inter/--no-intra; Table 5 -> --mix-strategy;
    Table 6 -> --lambda/--mu; Table 7 -> --n-labeled.

Assumptions (the paper is silent), each with a flag where an alternative exists:
    A1  SYNTHIA: 16-way head; Cityscapes terrain/truck/train -> ignore; 13-class mIoU reported (mIoU13).
    A2  split: sorted train list, RandomState(--split-seed) permutation, first N labeled (nested), split.txt.
    A3  labeled target = DAFormer's target pipeline (flip, no cat_max_ratio); no photometric aug on clean streams.
    A4  source resize keeps the aspect ratio: GTA5 -> 1280x704, SYNTHIA 1280x760; every resize is mmcv's
        (OpenCV bilinear without antialiasing, nearest for labels; --resize bilinear: PIL antialiased).
    A5  rare-class sampling on the source only (--rcs both: also over the labeled target; none: off).
    A6  ImageNet-1k torchvision init with RGB mean/std (--init coco is a flagged deviation: BGR, caffe style).
    A7  separate student forwards of batch 2 per stream, each followed by its own backward.
    A8  teacher BN in train mode, EMA over parameters only (--teacher-eval-bn: eval mode + averaged buffers).
    A9  the final student, whole 1024x512 image, logits upsampled to full resolution (--eval-res half: labels at
        the input).
    A10 AdamW eps 1e-8, weight decay on every trained parameter, no clipping, fp32 (--amp optional).
    A11 classes chosen per image, ignore excluded (--classmix-select batch: DAFormer's batch union incl. 255).
    A12 q per unlabeled batch (--q-per-image: the paper's per-image q_i).
    A13 weight 1 on pasted ground-truth pixels, q elsewhere (--q-everywhere: eq. 7-8 literally).
    A14 no ImageNet feature distance, no pseudo-weight top/bottom crop (--stack daformer: both on, as DAFormer).
    A15 jitter (s 0.2, 80 %) and blur (50 %) switches drawn once per iteration and shared by both streams.
    A16 losses averaged over all pixels including ignored ones (mmseg).
    A17 two-two draws 4 unlabeled crops and computes q per stream.
    A18 one-one pastes x_t's classes onto x_u and x_s's on top, one loss weighted lambda.

Deviations: the network is the classic DeepLabv2-ResNet-101 of common.py in the `pytorch` stride style
(stride on the 3x3 conv, as the torchvision weights expect) with trainable BN affine parameters as in
DAFormer, but with the classic 7x7 stem, ceil-mode max-pool and dilation in every layer3/4 block: DAFormer's
ResNet-V1c deep stem and contract_dilation are not reproduced (its mmcv weights do not fit this layout).
Logits are upsampled with align_corners=False as in mmseg. --demo trains a light network
(--layers 1 1 1 1 --width 32) from the demo init with a short warm-up and a higher learning rate, 5 labeled.

--stack daformer: IIDM on DAFormer's network and training additions (Hoyer et al., CVPR 2022; lhoyer/DAFormer
final config gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py). IIDM reports no such run (its
Table 3 uses HRDA): this is a setting of this project, not a paper row.
    python iidm.py --source gta5 --n-labeled 100 --stack daformer --init pretrained/mit_b5.pth
What changes: the network is MiT-B5 + DAFormer head (--mit, --drop-path-rate 0.1) from SegFormer's ImageNet-1k
mit_b5.pth (--init PATH, never downloaded), RGB mean/std; AdamW's groups follow DAFormer's paramwise_cfg
(`decode_head.*` lr x --head-lr-mult, LayerNorms weight decay 0, the rest --weight-decay); the teacher runs
without DropPath/Dropout (BN in train mode, A8); EMA alpha 0.999 (--ema-alpha); the ImageNet feature distance
(--fd-lambda 0.005: a frozen copy of the initial encoder in eval mode, stage-4 maps, cells of one thing class
with share >= 0.75; 0 when there is none, an assumption where the authors get NaN) is added to L_s, its
backward after L_s's on the same forward, reaching the encoder only; the pseudo-label weight is 0 on the top
15 / bottom 120 rows of a 512-row crop (--pl-crop v1, on both streams' pseudo-labelled pixels; pasted ground
truth keeps weight 1); the student is evaluated on the whole image, logits resized to the input and then to
the labels. Everything else (data, RCS, warm-up, losses, A1-A18 otherwise) is IIDM's set-up above.
DeepLabv2-only flags (--layers, --width, --frozen-bn) are refused; one process only. --demo --stack daformer
trains the `tiny` MiT (64-channel head) from a random init (--init none), AdamW 6e-4, EMA 0.99.

--stack hrda [--mic]: IIDM Table 3 (IIDM+HRDA 77.8 / 78.9 / 79.6 / 81.1 and IIDM+MIC+HRDA 78.6 / 79.5 / 80.2 / 81.2
with 100 / 200 / 500 / 1000 labels). The paper says only that it adopts HRDA's multi-resolution training,
training resolution and backbone; everything below is this project's reading (assumptions A19-A24):
    python iidm.py --source gta5 --n-labeled 100 --stack hrda --init pretrained/mit_b5.pth [--mic]
Each iteration: EMA update; L_s = HRDA loss on the source (+ FD on the context features), backward; L_t = HRDA
loss on the labeled target, backward; one teacher pseudo-label y_u of x_u (context + overlapping detail
windows) with q over the batch, then the v2 margins; inter stream (classes of y_s onto x_u), backward; intra
stream (classes of y_t onto the same x_u and y_u) x mu, backward; with --mic the masked colour-augmented x_u
against y_u and the same weights, backward; one AdamW step. Every HRDA loss is 0.9 fused + 0.1 detail with its
own detail box. Data, network, FD, evaluation and the checkpoint names are dacs.py --stack hrda's.
    A19 HRDA's configuration as a whole: EMA 0.999, FD 0.005, pseudo-label crop v2, RCS min crop ratio 2.0,
        GTA5 2560x1440, Cityscapes 2048x1024, 1024x1024 crops (IIDM's own: --ema-alpha 0.99 --fd-lambda 0
        --pl-crop none).
    A20 the labeled target follows the unlabeled target's pipeline and gets the full HRDA loss
        (--labeled-loss fused: the fused term only).
    A21 one pseudo-label and one q serve the inter, intra and MIC streams (q before the margins); --mic needs
        the one-two streams.
    A22 ClassMix on the whole crops, before the context/detail split; jitter/blur draws shared by the two mixed
        streams, MIC draws its own; a forward and backward per stream (BN statistics per stream).
    A23 MIC masks x_u only (--mic-on labeled: also x_t against its ground truth; --mic-on mixed: the mixed
        images instead of a stream of their own).
    A24 the final student is reported, evaluated with HRDA's slide inference at 2048x1024 (--eval-mode).
--mic also works with --stack deeplabv2/daformer (the same masked stream on their networks; not a paper row).
--mic is refused with --target acdc: IIDM+MIC is a GTA5 -> Cityscapes row only, and MIC masks its Cityscapes ->
ACDC runs in another mode (source and target image 0, no colour augmentation; lhoyer/MIC seg/experiments.py id 80),
which has no counterpart for IIDM's GTA5 source beside labeled ACDC images. --demo --mic masks 4-px blocks of the
64x64 crops (MIC's 16x16 grid).

--target acdc (an assumption; the paper uses Cityscapes only): the labeled split is drawn from ACDC's sorted train
list as from Cityscapes' (--split-seed, nested; --acdc-conditions picks conditions), the Cityscapes resizes are
scaled to ACDC's 1920x1080 frame (1024x512 -> 960x540) and val is scored at full label resolution (mmseg's protocol
for ACDC, DAFormer/HRDA); with --stack hrda 2048x1024 -> 1920x1080 and no pseudo-label crop (HRDA's rule for ACDC,
experiments.py id 49); --target dark_zurich is refused (Dark Zurich train has no labels).
--compile (README 'Compiled step'): torch.compile, in place, of the student's training forward, the EMA teacher
and the frozen ImageNet encoder (evaluation eager; checkpoints and exact resume unchanged). AdamW (A10) is fused
on CUDA, foreach elsewhere: the same update rule, one kernel.
"""
import copy
import time
from pathlib import Path

import torch

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (40000, "IIDM §Implementation Details"),
    "batch_size": (2, "2 source + 2 labeled target + 2 unlabeled target; IIDM §Implementation Details"),
    "lr": (6e-5, "encoder lr, IIDM §Implementation Details; decoder x10 (--head-lr-mult)"),
    "source_size": (None, "GTA5 fit into 1280 720 -> 1280x704, SYNTHIA 1280 760 (DAFormer configs; A4)"),
    "target_size": ((1024, 512), "IIDM; DAFormer cityscapes config"),
    "crop_size": ((512, 512), "IIDM §Implementation Details"),
    "eval_res": ("full", "DAFormer whole-image inference at full resolution (A9)"),
    "init": ("imagenet", "ImageNet-1k, IIDM §Implementation Details (A6)"),
    "eval_every": (4000, "DAFormer evaluation interval"),
    "save_every": (4000, "a resumable checkpoint at each DAFormer evaluation; DAFormer itself saves once, at 40k"),
}
DEMO = {"source": "demo", "n_labeled": 5, "iters": 400, "lr": 1e-3, "head_lr_mult": 1.0, "warmup_iters": 20,
        "rcs_min_pixels": 12,  # 3000 px of a 1914x1052 GTA5 label, scaled to the 128x64 demo images
        "layers": [1, 1, 1, 1], "width": 32, "init": "demo", "source_size": [128, 64], "target_size": [128, 64],
        "crop_size": [64, 64], "eval_res": "full", "eval_every": 0, "save_every": 100, "log_every": 25,
        "workers": 0}
SOURCE_SIZE = {"gta5": (1280, 720), "synthia": (1280, 760), "demo": None}
DAFORMER = {  # --stack daformer: DAFormer's network and its training additions (lhoyer/DAFormer final config
    # gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py); IIDM's own settings above stay
    "init": "pretrained/mit_b5.pth", "mit": "b5", "drop_path_rate": 0.1, "fd_lambda": 0.005, "pl_crop": "v1",
    "ema_alpha": 0.999,
}
HRDA = {**DAFORMER,  # --stack hrda (IIDM Table 3): HRDA's configuration as a whole (A19), lhoyer/HRDA gta2csHR_hrda.py
    "target_size": (2048, 1024), "crop_size": (1024, 1024), "pl_crop": "v2", "hr_loss_weight": 0.1,
    "eval_mode": "slide"}
HRDA_SOURCE_SIZE = {"gta5": (2560, 1440), "synthia": (2560, 1520), "demo": None}   # HRDA uda_{gta,synthia}HR_*.py
RCS_MIN_CROP_RATIO = {"deeplabv2": 0.5, "daformer": 0.5, "hrda": 2.0}   # DAFormer / HRDA min_crop_ratio
DEMO_DAFORMER = {"source": "demo", "n_labeled": 5, "iters": 400, "lr": 6e-4, "warmup_iters": 20,
                 "rcs_min_pixels": 12, "mit": "tiny", "init": "none", "ema_alpha": 0.99, "source_size": [128, 64],
                 "target_size": [128, 64], "crop_size": [64, 64], "eval_res": "full", "eval_every": 0,
                 "save_every": 100, "log_every": 25, "workers": 0}
DEMO_HRDA = {**DEMO_DAFORMER, "pl_crop": "v1"}   # the demo images are far smaller than v2's 2048x1024 margins


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--source", choices=["gta5", "synthia", "demo"], default="gta5", help="source domain")
    training.add_target_arg(p, labeled=True)
    training.add_split_args(p, 100, "IIDM Table 1 (100/200/500/1000)")
    p.add_argument("--no-src-sup", action="store_true",
                   help="drop L_s (and the source: implies --no-inter); Table 4 rows 2 and 4")
    p.add_argument("--no-tgt-sup", action="store_true",
                   help="drop L_t (Table 4 row 1 = --n-labeled 0 --no-tgt-sup --no-inter --no-intra)")
    p.add_argument("--no-inter", action="store_true", help="drop the inter-domain stream L_inter (Table 4)")
    p.add_argument("--no-intra", action="store_true", help="drop the intra-domain stream L_intra (Table 4)")
    p.add_argument("--mix-strategy", choices=["one-two", "two-two", "one-one"], default="one-two",
                   help="Table 5: one x_u in two streams (IIDM), two x_u in two streams, one x_u in one "
                        "triple-mixed stream")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="weight of L_inter (eq. 11, Table 6); with --mix-strategy one-one the weight of its one "
                        "mixed loss (A18)")
    p.add_argument("--mu", type=float, default=2.0,
                   help="weight of L_intra (eq. 11, Table 6); unused with --mix-strategy one-one (A18)")
    p.add_argument("--tau", type=float, default=0.968, help="confidence threshold of q (eq. 6; IIDM)")
    p.add_argument("--ema-alpha", type=float, default=0.99, help="teacher EMA momentum (eq. 5; IIDM 'following DACS')")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="decoder lr / encoder lr (6e-4 / 6e-5; IIDM)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (IIDM)")
    p.add_argument("--resize", choices=["cv2", "bilinear"], default="cv2",
                   help="image resizes: OpenCV bilinear without antialiasing as DAFormer's mmcv (cv2), or PIL's "
                        "antialiased bilinear of the DACS-style loaders")
    p.add_argument("--warmup-iters", type=int, default=1500, help="linear warm-up length (DAFormer poly10warm)")
    p.add_argument("--rcs", choices=["source", "both", "none"], default="source",
                   help="rare-class sampling over the source (DAFormer; A5), also the labeled target, or off")
    p.add_argument("--rcs-temp", type=float, default=0.01, help="RCS temperature T (DAFormer)")
    p.add_argument("--rcs-min-pixels", type=int, default=3000,
                   help="RCS: an image qualifies for class c with more than this many c pixels at original "
                        "resolution; a crop is retried until it holds half as many (DAFormer 3000 / 1500)"),
    p.add_argument("--classmix-select", choices=["image", "batch"], default="image",
                   help="ClassMix classes per image without ignore (A11) or from the batch union incl. ignore "
                        "(DAFormer get_class_masks)")
    p.add_argument("--q-per-image", action="store_true", help="q per unlabeled image (eq. 6 as written; A12)")
    p.add_argument("--q-everywhere", action="store_true",
                   help="weight q on every mixed pixel, pasted ground truth included (eq. 7-8 literally; A13)")
    p.add_argument("--no-jitter", action="store_true", help="no colour jitter on mixed images")
    p.add_argument("--no-blur", action="store_true", help="no Gaussian blur on mixed images")
    p.add_argument("--teacher-eval-bn", action="store_true",
                   help="teacher with eval-mode BN and EMA-averaged running stats (DAFormer: train mode; A8)")
    p.add_argument("--frozen-bn", action="store_true",
                   help="freeze BN affine parameters as the classic DeepLabv2 (DAFormer trains them)")
    p.add_argument("--labeled-loss", choices=["hrda", "fused"], default=None,
                   help="--stack hrda: L_t as the full HRDA loss (0.9 fused + 0.1 detail; A20) or the fused term "
                        "only (default: hrda)")
    p.add_argument("--mic-on", choices=["unlabeled", "labeled", "mixed"], default=None,
                   help="--mic: mask the unlabeled crop x_u against its pseudo-label (MIC's target-only masking; "
                        "A23), also the labeled crop x_t against its ground truth, or the mixed images instead of "
                        "a stream of their own (default: unlabeled)")
    training.add_stack_args(p)
    args = training.parse_with_stack(p, {"daformer": DAFORMER, "hrda": HRDA},
                                     {"deeplabv2": DEMO, "daformer": DEMO_DAFORMER, "hrda": DEMO_HRDA}, argv,
                                     targets={"hrda": {t: {"pl_crop": "none"} for t in ("acdc", "dark_zurich")}})
    training.check_args(args)
    training.check_target(args, args.source, args.target, labeled=True)
    if args.labeled_loss is not None and args.stack != "hrda":
        raise common.DataError(f"--labeled-loss is a --stack hrda flag (this run: --stack {args.stack})")
    if args.mic_on is not None and not args.mic:
        raise common.DataError("--mic-on is a --mic flag; add --mic or drop it")
    args.labeled_loss = args.labeled_loss or ("hrda" if args.stack == "hrda" else None)
    args.mic_on = args.mic_on or ("unlabeled" if args.mic else None)
    if args.mic and args.target != "cityscapes":
        raise common.DataError(f"--mic --target {args.target}: IIDM+MIC (Table 3) is GTA5 -> Cityscapes only and MIC "
                               "masks ACDC in another mode (mask_mode 'separate', dacs.py --mask-mode); drop --mic")
    if args.mic and (args.no_inter and args.no_intra or args.mix_strategy != "one-two"):
        raise common.DataError("--mic needs the teacher's pseudo-label of IIDM's one-two streams (A21): drop "
                               "--no-inter/--no-intra or --mix-strategy")
    if args.stack == "hrda" and args.source_size is None:
        args.source_size = HRDA_SOURCE_SIZE[args.source]
    if args.stack != "deeplabv2":
        if not args.eval_only:
            training.check_mit_init(args)
        if not (args.fd_lambda >= 0 and 0 <= args.drop_path_rate < 1):
            raise common.DataError("--fd-lambda >= 0 and --drop-path-rate in [0,1) expected")
    if not 0 < args.ema_alpha < 1 or not 0 < args.tau <= 1 or args.warmup_iters < 0 or args.head_lr_mult <= 0:
        raise common.DataError("--ema-alpha in (0,1), --tau in (0,1], --warmup-iters >= 0, --head-lr-mult > 0 "
                               "expected")
    if min(args.lam, args.mu, args.weight_decay, args.rcs_min_pixels) < 0 or not args.rcs_temp > 0:
        raise common.DataError("--lambda, --mu, --weight-decay, --rcs-min-pixels >= 0 and --rcs-temp > 0 expected")
    if args.no_src_sup:
        args.no_inter = True
    if args.n_labeled == 0 and not (args.no_tgt_sup and args.no_intra):   # (a --split-file's N: parse_with_demo)
        given = f"--split-file {args.split_file}" if args.split_file else "--n-labeled 0"
        raise common.DataError(f"{given} leaves no labeled target image: add --no-tgt-sup --no-intra")
    if args.no_src_sup and args.no_tgt_sup:
        raise common.DataError("--no-src-sup with --no-tgt-sup leaves no supervised loss")
    if args.mix_strategy != "one-two" and (args.no_inter or args.no_intra):
        raise common.DataError(f"--mix-strategy {args.mix_strategy} needs both mixing streams")
    if not any(args.crop_size) and not args.no_inter:   # x_s (GTA5 1280x704) and x_u (1024x512) must align
        raise common.DataError("--crop-size 0 0: the inter-domain mix pastes source pixels onto a target image "
                               "of another size; give a crop size or add --no-inter")
    if args.source_size is None:
        args.source_size = SOURCE_SIZE[args.source]
    if args.stack == "hrda" and not args.eval_only:
        training.check_hrda_args(args)
    return args


def pixel_weight(M, q, q_everywhere=False):
    """Weight of the mixed pixels: 1 on pasted ground truth, q on pseudo-labels (A13), or q everywhere."""
    return q * torch.ones_like(M) if q_everywhere else common.one_mix(M, torch.ones_like(M), q.expand_as(M))


def mixed_streams(x_s, y_s, x_t, y_t, u_inter, u_intra, g, args):
    """The mixed batches (name, loss weight, x, y, w) of one iteration per --mix-strategy.

    u_inter / u_intra = (x_u, y_u, q): the unlabeled crops, their teacher pseudo-labels and quality (the
    same triple for both streams in IIDM's one-two strategy). M1 comes from y_s, M2 from y_t (eq. 1-4).
    """
    select = dict(rule="ceil", drop_ignore=args.classmix_select == "image",
                  batch_union=args.classmix_select == "batch")
    if args.mix_strategy == "one-one":                      # A18: x_t's classes onto x_u, then x_s's on top
        x_u, y_u, q = u_inter
        M1, M2 = common.class_mix_mask(y_s, g, **select), common.class_mix_mask(y_t, g, **select)
        x = common.one_mix(M1, x_s, common.one_mix(M2, x_t, x_u))
        y = common.one_mix(M1, y_s, common.one_mix(M2, y_t, y_u))
        return [("loss_mix", args.lam, x, y, pixel_weight(torch.maximum(M1, M2), q, args.q_everywhere))]
    streams = []
    if not args.no_inter:
        x_u, y_u, q = u_inter
        M1 = common.class_mix_mask(y_s, g, **select)                       # classes of the source GT
        streams.append(("loss_inter", args.lam, common.one_mix(M1, x_s, x_u),          # eq. 1
                        common.one_mix(M1, y_s, y_u), pixel_weight(M1, q, args.q_everywhere)))   # eq. 2
    if not args.no_intra:
        x_u, y_u, q = u_intra
        M2 = common.class_mix_mask(y_t, g, **select)                       # classes of the labeled-target GT
        streams.append(("loss_intra", args.mu, common.one_mix(M2, x_t, x_u),           # eq. 3
                        common.one_mix(M2, y_t, y_u), pixel_weight(M2, q, args.q_everywhere)))   # eq. 4
    return streams


def train(args):
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    hrda = args.stack == "hrda"
    if args.stack != "deeplabv2" and dist.world > 1:
        raise common.DataError(f"--stack {args.stack} runs in one process (DAFormer/HRDA train on one GPU; the "
                               "source and feature-distance backward passes share one forward): launch it without "
                               "torchrun")
    training.apply_world(args, dist, device)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    style, norm = common.init_convention(args.init, default=("pytorch", "imagenet_rgb"))   # daformer: RGB too
    common.seed_everything(args.seed)
    num_classes = 16 if args.source == "synthia" else 19                       # A1
    synthia = num_classes == 16
    out_dir = Path(args.out_dir or training.default_out_dir("iidm", args.source, args.n_labeled, args.seed,
                                                          args.target))
    up = lambda logits, size: common.upsample(logits, size, align_corners=False)  # noqa: E731 (mmseg resize)
    # ---------------------------------------------------------------- data
    source_kind, source_root, target_kind, target_root = training.data_roots(args, args.source, args.target)
    keep = common.target_keeps_ratio(args.stack, target_kind)
    val = training.target_val(target_kind, target_root, args.target_size, args.eval_res, norm, num_classes,
                              args.resize, args.acdc_conditions, args.stack)
    detail = tuple(c // 2 for c in args.crop_size)       # HRDA: 512x512 detail crops of the 1024x1024 crop
    if hrda:                       # HRDA on MiT + DAFormer head; a teacher without DropPath/Dropout
        build = lambda stochastic=True: common.hrda_segmentor(num_classes, args.mit, args.drop_path_rate,  # noqa: E731
                                                              stochastic, detail)
    elif args.stack == "daformer":   # MiT + DAFormer head; a teacher without DropPath/Dropout (DAFormer)
        build = lambda stochastic=True: common.daformer_segmentor(num_classes, args.mit,  # noqa: E731
                                                                  args.drop_path_rate, stochastic)
    else:
        build = lambda stochastic=True: common.DeepLabV2(num_classes, style=style, layers=args.layers,  # noqa: E731
                                                         width=args.width, freeze_bn_affine=args.frozen_bn)
    student = training.prepare_model(build(), device, amp)
    evaluated = student                                  # HRDA test_cfg: windows of the crop every half crop
    if hrda and args.eval_mode == "slide":
        evaluated = training.WeightsOf(common.SlideInference(student, args.crop_size, detail))
    if args.eval_only:
        return training.eval_only(args, evaluated, val, device, out_dir, synthia, align_corners=False, dist=dist)
    stems = common.dataset_stems(target_kind, target_root, conditions=args.acdc_conditions)
    labeled, unlabeled = common.labeled_split(stems, args.n_labeled, args.split_seed, args.split_file)
    use_teacher = not (args.no_inter and args.no_intra)
    if use_teacher and not unlabeled:
        raise common.DataError(f"--n-labeled {len(labeled)} leaves no unlabeled image for the mixing streams")
    crop = args.crop_size if min(args.crop_size) > 0 else None
    rcs_crop_pixels = int(args.rcs_min_pixels * RCS_MIN_CROP_RATIO[args.stack])
    source = None if args.no_src_sup else common.SegmentationDataset(
        source_kind, source_root, resize=args.source_size, keep_ratio=True, interp=args.resize, crop=crop,
        cat_max_ratio=0.75, flip=True, norm=norm, num_classes=num_classes, rcs_min_crop_pixels=rcs_crop_pixels)
    data_t = None if not labeled else common.SegmentationDataset(
        target_kind, target_root, resize=args.target_size, keep_ratio=keep, interp=args.resize, crop=crop,
        flip=True, norm=norm, num_classes=num_classes, stems=labeled, conditions=args.acdc_conditions,
        rcs_min_crop_pixels=rcs_crop_pixels)
    data_u = None if not use_teacher else common.SegmentationDataset(
        target_kind, target_root, resize=args.target_size, keep_ratio=keep, interp=args.resize, crop=crop,
        flip=True, norm=norm, num_classes=num_classes, stems=unlabeled, conditions=args.acdc_conditions)
    if data_u is not None and args.pl_crop == "v2":      # HRDA: the margin mask travels with the crop
        data_u = common.PseudoMarginDataset(data_u)
    # ---------------------------------------------------------------- models, optimiser
    imnet = None
    if args.stack != "deeplabv2":
        if args.init != "none":
            common.load_mit_imagenet(student.backbone, args.init)
        if args.fd_lambda > 0 and not args.no_src_sup:   # DAFormer's frozen ImageNet encoder, never saved
            imnet = copy.deepcopy(student.backbone).eval().requires_grad_(False)
        groups = common.daformer_param_groups(student, args.lr, args.weight_decay, args.head_lr_mult)
    else:
        training.initialise(student, args.init, norm, args.data_root)
        groups = common.param_groups(student, args.lr, args.head_lr_mult, official_duplicates=False)
    teacher = training.prepare_model(common.ema_teacher(student, lambda: build(stochastic=False),  # A8
                                                        train_bn=not args.teacher_eval_bn),
                                   device, amp) if use_teacher else None
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,  # A10
                                  **common.adam_kernels(device))
    scheduler = common.lr_scheduler(optimizer, lambda i: common.warmup_poly_factor(i, args.iters, args.warmup_iters))
    ckpt = training.resume_state(args, out_dir, num_classes)
    start = 0 if ckpt is None else ckpt["iteration"]

    def loader(dataset, stream, rcs):
        """Training loader: rare-class sampling (DAFormer) or uniform. The source's class counts are cached in
        the run folder; the labeled target's follow the split, which another run in the folder may change."""
        if not rcs:
            return training.shuffled_loader(dataset, args, stream, start, dist=dist)
        cache = out_dir / "rcs_counts_0.json" if stream == 0 else None
        with training.main_first(dist):   # rank 0 writes the cache, the others read it
            if cache is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
            counts = common.rcs_statistics(dataset, cache=cache, workers=args.workers)
        if len(counts) != len(dataset):
            raise common.DataError(f"{cache}: class counts of {len(counts)} images, the source has {len(dataset)} "
                                   f"(a cache of another dataset: delete it)")
        return training.infinite_loader(dataset, common.RareClassSampler(
            counts, num_classes, args.batch_size, args.seed, stream, start, args.iters, temperature=args.rcs_temp,
            min_pixels=args.rcs_min_pixels, rank=dist.rank, world=dist.world), args.workers)

    B = args.batch_size
    loader_s = None if source is None else loader(source, 0, args.rcs != "none")
    loader_t = None if args.no_tgt_sup and args.no_intra else loader(data_t, 1, args.rcs == "both")
    n_u = 2 * B if args.mix_strategy == "two-two" else B                      # A17: 4 unlabeled crops
    loader_u = None if teacher is None else training.shuffled_loader(data_u, args, 2, start, n_u, dist)
    if ckpt is not None:   # after the loaders, which draw from torch's RNG when they start (MiT's DropPath uses it)
        start = training.restore_training(ckpt, student, optimizer, scheduler, teacher, args.seed, dist)
    model = training.ddp(student, dist, device, args.sync_bn)   # training forwards; `student` for the rest
    training.compile_networks(args, model, teacher, imnet)        # --compile: in place, checkpoints unchanged
    training.write_run_files(out_dir, args, labeled, dist)   # after every refusal: a bad run writes nothing
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    metrics = None  # the last evaluation

    def pseudo_label(x_u):
        """Teacher pseudo-label y_u and quality q (eq. 6) on the un-mixed crops."""
        with torch.no_grad(), amp.autocast():
            logits = up(teacher(x_u).float(), x_u.shape[2:])
        y_u, q_map, _ = common.pseudo_label(logits, args.tau, "uniform", per_image=args.q_per_image)
        return y_u, q_map[:, :1, :1] if args.q_per_image else q_map[0, 0, 0]

    def crop_weight(q, y_u, valid=None):
        """--pl-crop v1 (DAFormer): the pseudo-label weight map with 0 on the top/bottom rows; v2 (HRDA): 0 outside
        the margins `valid`; else q itself (q is taken before either)."""
        if args.pl_crop == "v2":
            return q * valid
        return common.pseudo_label_crop(q * torch.ones_like(y_u, dtype=torch.float)) if args.pl_crop == "v1" else q

    def seg_loss(x, y, w, hr_weight=None, fused_scale=1.0):
        """eq. 7-10: (q-weighted) CE averaged over all pixels, ignored ones included (mmseg; A16); --stack hrda:
        (1 - hr_weight) fused + hr_weight detail with a fresh detail box (fused_scale: MIC's lambda, fused term)."""
        with amp.autocast():
            if hrda:
                out = model(x, common.hr_crop_box(x.shape[2:], detail, g))
                return common.hrda_loss(out, y, w, args.hr_loss_weight if hr_weight is None else hr_weight,
                                        fused_scale)
            return fused_scale * common.ce_pixel_weighted(up(model(x), y.shape[1:]), y, w)

    def mic_loss(x, y, w):
        """MIC: the masked colour-augmented crop (own draws) against its targets, --mask-lambda (HRDA: on the fused
        term only, the authors' code; --mask-lambda-all: on both)."""
        x_k = common.mic_masked_input(x, norm, g, args.mask_block, args.mask_ratio)
        if hrda and not args.mask_lambda_all:
            return seg_loss(x_k, y, w, fused_scale=args.mask_lambda)
        return args.mask_lambda * seg_loss(x_k, y, w)
    # ---------------------------------------------------------------- training loop (DAFormer dacs.py order)
    labeled_pass = loader_t is not None and not args.no_tgt_sup                # L_t has its own backward
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        student.train()
        g = common.step_generator(args.seed, i, dist.rank)
        if teacher is not None and i > 0:                                     # eq. 5, before the step
            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)
        optimizer.zero_grad(set_to_none=True)
        losses = {}
        x_s = y_s = x_t = y_t = None
        with training.cast_once(amp):                                          # the weights cast once per step
            if loader_s is not None:
                x_s, y_s = training.next_batch(loader_s, device)
                with training.grad_sync(model, last=not labeled_pass and teacher is None):   # DDP: no_sync but last
                    if imnet is None:
                        losses["loss_s"] = seg_loss(x_s, y_s, 1.0)                    # L_s, eq. 9
                        amp.backward(losses["loss_s"])
                    else:                # DAFormer: L_s backward keeping its graph, then the feature distance's
                        with amp.autocast():
                            if hrda:     # HRDA: FD on the context view's features
                                out = student(x_s, common.hr_crop_box(x_s.shape[2:], detail, g))
                                loss_s, features = common.hrda_loss(out, y_s, 1.0, args.hr_loss_weight), out.features
                            else:
                                features, out = student.forward_features(x_s)
                                loss_s = common.ce_pixel_weighted(up(out, y_s.shape[1:]), y_s, 1.0)
                        amp.backward(loss_s, retain_graph=True)
                        with amp.autocast():
                            losses["loss_fd"] = args.fd_lambda * common.thing_feature_distance(
                                features[-1], imnet, common.context_view(x_s) if hrda else x_s, y_s, num_classes)
                        amp.backward(losses["loss_fd"])                               # reaches the encoder only
                        losses["loss_s"] = loss_s.detach()   # the source graph kept for FD is freed here, not after
                        del loss_s, features, out            # the later streams
            if loader_t is not None:
                x_t, y_t = training.next_batch(loader_t, device)
                if labeled_pass:
                    with training.grad_sync(model, last=teacher is None):
                        losses["loss_t"] = seg_loss(x_t, y_t, 1.0, 0.0 if args.labeled_loss == "fused" else None)
                        amp.backward(losses["loss_t"])                                # eq. 10
            if teacher is not None:
                x_u, valid = training.next_target_batch(loader_u, device)      # labels unused; v2 margins
                x_u_inter, x_u_intra = (x_u[:B], x_u[B:]) if args.mix_strategy == "two-two" else (x_u, x_u)
                v_inter, v_intra = (valid[:B], valid[B:]) if valid is not None and args.mix_strategy == "two-two" else (
                    valid, valid)
                y_u, q = pseudo_label(x_u_inter)                                  # one y_u and q for both streams
                y_u2, q2 = pseudo_label(x_u_intra) if args.mix_strategy == "two-two" else (y_u, q)
                w_u = crop_weight(q, y_u, v_inter)                                # also MIC's (A21)
                streams = mixed_streams(x_s, y_s, x_t, y_t, (x_u_inter, y_u, w_u),
                                        (x_u_intra, y_u2, crop_weight(q2, y_u2, v_intra)), g, args)
                # A15: one jitter and one blur switch for all streams; factors, op order and sigma per image
                x_all = torch.cat([s[2] for s in streams])
                if not args.no_jitter:
                    x_all = common.color_jitter(x_all, norm, g, strength=0.2, gate=0.2, per_image_order=True)
                if not args.no_blur:
                    x_all = common.gaussian_blur(x_all, g, per_image=True)
                if args.mic_on == "mixed":                                        # A23 alternative: no own stream
                    x_all = x_all * common.mic_block_mask(x_all.shape[0], x_all.shape[2], x_all.shape[3], g,
                                                          args.mask_block, args.mask_ratio, x_all.device)
                mic_u, mic_t = args.mic_on in ("unlabeled", "labeled"), args.mic_on == "labeled" and x_t is not None
                for k, (name, weight, _, y, w) in enumerate(streams):            # L_inter eq. 7, L_intra eq. 8
                    with training.grad_sync(model, last=k == len(streams) - 1 and not mic_u):
                        losses[name] = seg_loss(x_all[k * B:(k + 1) * B], y, w)
                        amp.backward(weight * losses[name])
                if mic_u:                                                         # MIC on x_u, same y_u and weights
                    with training.grad_sync(model, last=not mic_t):
                        losses["loss_mic"] = mic_loss(x_u_inter, y_u, w_u)
                        amp.backward(losses["loss_mic"])
                if mic_t:                                                         # A23 alternative: x_t with its GT
                    losses["loss_mic_t"] = mic_loss(x_t, y_t, 1.0)
                    amp.backward(losses["loss_mic_t"])
                losses["q"] = q.mean()
                if args.mix_strategy == "two-two":                                # A17: the second stream's own q
                    losses["q_intra"] = q2.mean()
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
                                                align_corners=False, dist=dist)  # resumed a finished run


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    metrics = train(args)
    if args.demo and not args.eval_only and not (args.no_inter or args.no_intra or args.no_tgt_sup):
        baselines = []
        base_dir = args.out_dir or str(training.default_out_dir("iidm", args.source, args.n_labeled, args.seed))
        for name, no_src, suffix in (("target-only (L_t)", True, "_target_only"),
                                     ("source+target (L_s+L_t)", False, "_source_target")):
            baseline = copy.copy(args)
            baseline.no_inter = baseline.no_intra = True
            baseline.no_src_sup, baseline.out_dir = no_src, base_dir + suffix
            baseline.resume = None if args.resume is None else "auto"   # its own folder, never IIDM's PATH
            baselines.append((name, train(baseline)))
        training.write_demo_summary(base_dir, "iidm.py", ("IIDM", metrics), baselines, args.iters, time.time() - t0)
    return metrics


if __name__ == "__main__":
    training.run_script(main)
