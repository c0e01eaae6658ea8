"""ASS: Alleviating Semantic-level Shift, a semi-supervised domain adaptation method for semantic segmentation
(Wang, Wei, Feris, Xiong, Hwu, Huang, Shi, CVPR-W 2020, arXiv 2004.00794), and the AdaptSegNet multi-level baseline it
is built on (Tsai et al., CVPR 2018) — GTA5/SYNTHIA + N labeled Cityscapes images -> Cityscapes.

    python asss.py --source gta5 --preset ga-csa --n-labeled 500    # ASS headline, Table 1: 60.2
    python asss.py --source gta5 --preset adaptsegnet               # N = 0 row of Table 1 (AdaptSegNet): 42.4
    python asss.py --source synthia --preset ga-csa --n-labeled 500 # Table 3: 69.8 (13-class mIoU, mIoU13)
    python asss.py --demo                                            # GA+CSA, oracle, source-only on demo data

No ASS code was released. The paper follows AdaptSegNet for the backbone, the classifier and the global
module (ASS §4.1), so everything ASS does not describe is wasidennis/AdaptSegNet train_gta2cityscapes_multi.py
and model/deeplab_multi.py, model/discriminator.py. One iteration (batch 1 per stream, gradients of all
passes accumulated, then one step of every optimiser):
  1. D frozen. Source image: CE(main) + 0.1 CE(aux) (+ GA on the source maps with the label "target" and
     lambda_sadv L_sadv on the layer4 features, s2t), backward.
  2. Labeled target image (N > 0): CE(main) + 0.1 CE(aux), backward.
  3. Unlabeled target image: forward without a graph (s2t), or with the GA loss labelled "source" (t2s,
     AdaptSegNet), backward.
  4. D unfrozen, on detached inputs: each D_g sees source (0) and unlabeled target (1) probability maps, D_s
     sees source (class k) and labeled-target (class k + c) features; each half weighted 0.5; backward.

Paper -> code:
    Eq. 1  L_seg(I) pixel CE of the upsampled score maps          -> `common.seg_loss` (main + 0.1 aux, AdaptSegNet)
    Eq. 2  L_gadv(I_s) = -log D_g(P_s)[target]                     -> `gan_loss(D_g(P_s), TARGET)` (--ga-direction s2t)
           AdaptSegNet's own direction: target maps labelled source -> `gan_loss(D_g(P_tu), SOURCE)` (t2s)
    Eq. 3  L_gd: D_g on P_s (z = 0) and P_tu (z = 1)               -> `discriminator_pass`, lambda_gd = 0.5 each
    Eq. 4  V^k = sum_hw y^k F / sum_hw y^k                         -> `class_vectors`
    Eq. 5  FCSA L_sadv = -log D_s(V_s^k)[k + c]                    -> `sa_loss(..., domain=TARGET)` (fcsa)
    Eq. 6  FCSA L_sd: V_s^k -> k, V_tl^k -> k + c                  -> `sa_loss(..., SOURCE / TARGET)` on detached V
    Eq. 7  CSA L_sadv = -log D_s(F_s)[h, w, k + c]                 -> `sa_loss(..., domain=TARGET)` (csa)
    Eq. 8  CSA L_sd per pixel, source -> k, labeled target -> k + c -> `sa_loss(..., SOURCE / TARGET)` on detached F
    Eq. 9  L(I_s, I_tl) = seg(S) + seg(T_L) + l_gadv L_gadv + l_sadv L_sadv -> `generator_pass`
    Eq. 10 L(F_s, F_tu, F_tl) = l_gd (L_gd + L_gd) + l_sd (L_sd + L_sd)     -> `discriminator_pass`
    Eq. 11 max_D min_G                                              -> G step on Eq. 9, D steps on Eq. 10
    §4.1   D_g = AdaptSegNet FCDiscriminator; CSA D_s = 1x1 conv 2048->1024, LeakyReLU 0.2, 1x1 conv -> 2c;
           FCSA D_s = FC 2048->1024, LeakyReLU 0.2, FC -> 2c       -> `common.FCDiscriminator`, `semantic_discriminator`
    §4.2   SGD 2.5e-4 (momentum 0.9, wd 5e-4), Adam 1e-4 (0.9, 0.99) for every D, poly 0.9 -> `build_optimisers`
    Tables 1/3 columns -> --preset {adaptsegnet, oracle, ga, ga-fcsa, ga-csa} and --n-labeled;
    Table 2 lambda_sadv sweeps -> --lambda-sadv.

AdaptSegNet facts kept (its released code): multi-level DeepLabv2 (aux head `layer5` on layer3, main head
`layer6` on layer4; checkpoints keep these DeeplabMulti keys), two-branch ASPP sum (--aspp-full sums four),
BN in train mode with frozen affine parameters (also during the no-graph target forward), the duplicated 1x
parameter group with PyTorch 0.4's per-entry SGD (weight decay added into p.grad in place, compounding over a
tensor's listings; --sgd-rule torch1.5: out of place; --clean-param-groups: each tensor once; changes results),
logits upsampled to the input size with align_corners=True before the softmax that D_g sees, BCE with logits,
domain labels source 0 / target 1, lambda_adv 0.0002 (aux) / 0.001 (main), lambda_seg 0.1 on the aux output,
poly over 250k iterations stopped at 150k, GTA5 resized to 1280x720 and Cityscapes to 1024x512 (bicubic)
without cropping, Caffe BGR mean, no augmentation, init DeepLab_resnet_pretrained_init-f81d91e8.pth (ImageNet
then COCO; AdaptSegNet issue #92), `Scale.` stripped, classifier skipped; evaluation of the main head on val
at 1024x512, upsampled to the full 2048x1024 labels (AdaptSegNet evaluate_cityscapes.py, compute_iou.py).

Readings the paper leaves open (each a default; the flag gives the alternative):
    R1  GA direction: s2t for ASS (Eq. 2 as written: source maps pushed toward "target"), t2s for the N = 0
        AdaptSegNet row (its code)                                      --ga-direction s2t|t2s
    R2  GA stays multi-level (0.0002 / 0.001) though Eq. 9 shows one lambda_gadv; 42.4 is the multi-level
        AdaptSegNet number                                              --lambda-adv A1 A2 (0.00005 0.0005:
        the AdaptSegNet README's weights for PyTorch >= 0.4)
    R3  lambda_seg of Eq. 9 = main 1 + aux 0.1 per labeled domain, S and T_L weighted equally --lambda-seg
    R4  F = layer4 output (2048 channels, stride 8), the input of the main classifier; SA touches only F
    R5  y = the label at the training resolution, nearest-resized to F's grid; 255 never counts
    R6  SA losses are means (over valid pixels for CSA, over present classes for FCSA), not Eq. 5-8's sums
    R7  lambda_gd = lambda_sd = 0.5 per domain term, as AdaptSegNet halves its D losses --lambda-gd, --lambda-sd
    R8  unlabeled pool T_U = all 2975 train images for every N (N = 2975 needs it)   --unlabeled complement
    R9  labeled subset: sorted train list, RandomState(--split-seed) permutation, first N (nested), split.txt
    R10 one S, one T_L, one T_U image per iteration; T_L never feeds D_g, T_U never feeds D_s (Eq. 10)
    R11 poly horizon 250k and stop 150k for every N and for the oracle (--iters, --poly-iters)
    R12 plain momentum as the AdaptSegNet code, although ASS §4.2 says Nesterov            --nesterov
    R13 SYNTHIA: 19-way head, 1280x760 input, 13-class mIoU reported (mIoU13 in metrics.json)
    R14 oracle = the same network, init and schedule trained on the N labeled images only
    R15 the final (150k) snapshot is the primary number; the best of the evaluated snapshots (every
        --eval-every) goes to best_snapshot.json, labelled as selected on val
    R16 the broken sentence of §4.2 ("We first .") is read as single-stage training from the init
    R17 lambda_sadv: CSA 0.01 (Table 2b); FCSA 1.0, and 0.04 at N = 500 (Table 2a's best per N) --lambda-sadv
    R18 Eq. 11 read literally would let G maximise the discriminators' losses on all features; G uses the
        non-saturating Eq. 9 on source features only and D uses Eq. 10 (§3.4, §4.2)
    R19 FCSA: no minimum pixel count for a class vector; the vectors of one image form D_s's batch

Deviations: --seed seeds everything and fixes every data draw by (seed, stream, iteration) (AdaptSegNet
defines a seed it never applies). --preset source-only (source CE only) is a demo baseline, not an ASS column.
--demo trains a light network (--layers 1 1 1 1 --width 32) from the demo init with Adam, 5 labeled images;
it shows the loop working and the paper's ordering (GA+CSA above its oracle), not the paper's numbers.

--target acdc (an assumption; the paper uses Cityscapes only): the labeled split is drawn from ACDC's sorted train
list as from Cityscapes' (--split-seed, nested; --acdc-conditions picks conditions), the Cityscapes resizes are
scaled to ACDC's 1920x1080 frame (1024x512 -> 960x540) and val is scored at full label resolution (mmseg's protocol
for ACDC, DAFormer/HRDA); --target dark_zurich is refused (Dark Zurich train has no labels).
--compile (README 'Compiled step'): torch.compile, in place, of the segmenter's training pass and every
discriminator (evaluation eager; checkpoints and exact resume unchanged). Every D's Adam is fused on CUDA,
foreach elsewhere; G's LegacySGD keeps the authors' per-listing arithmetic.
"""
import copy
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (150000, "stop iteration, AdaptSegNet train_gta2cityscapes_multi.py NUM_STEPS_STOP"),
    "batch_size": (1, "one image per stream; AdaptSegNet BATCH_SIZE, ITER_SIZE 1"),
    "lr": (2.5e-4, "ASS §4.2; AdaptSegNet LEARNING_RATE; heads x10 with SGD, one rate for every parameter "
                   "with --optimizer adam"),
    "source_size": (None, "GTA5 1280 720 (AdaptSegNet INPUT_SIZE), SYNTHIA 1280 760 (assumed, R13)"),
    "target_size": ((1024, 512), "AdaptSegNet INPUT_SIZE_TARGET"),
    "crop_size": ((0, 0), "AdaptSegNet resizes whole images, never crops"),
    "eval_res": ("full", "AdaptSegNet evaluate_cityscapes.py: main head upsampled to 2048x1024"),
    "init": ("adaptsegnet", "AdaptSegNet RESTORE_FROM DeepLab_resnet_pretrained_init-f81d91e8.pth"),
    "sgd_rule": ("torch0.4", "AdaptSegNet README: PyTorch 0.4 (pytorch_0.4/), the root scripts older"),
    "eval_every": (5000, "AdaptSegNet SAVE_PRED_EVERY snapshots; best-of-snapshots logged (R15)"),
    "save_every": (5000, "AdaptSegNet SAVE_PRED_EVERY"),
}
DEMO = {"source": "demo", "n_labeled": 5, "iters": 400, "lr": 1e-3, "optimizer": "adam", "layers": [1, 1, 1, 1],
        "width": 32, "init": "demo", "source_size": [128, 64], "target_size": [128, 64], "eval_every": 0,
        "save_every": 0, "log_every": 50, "workers": 0}
SOURCE_SIZE = {"gta5": (1280, 720), "synthia": (1280, 760), "demo": None}

# AdaptSegNet's DeepLab init (ImageNet, then COCO): a different file from the COCO init of DACS/ClassMix.
# Its name carries the first 8 hex digits of its sha256 (torch.hub convention), checked on download.
ADAPTSEGNET_INIT_URL = "http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth"
ADAPTSEGNET_INIT_SHA256_PREFIX = "f81d91e8"

NUM_CLASSES = 19  # c: the head is 19-way for GTA5 and SYNTHIA (R13)
SOURCE, TARGET = 0, 1  # domain labels of every discriminator (AdaptSegNet source_label/target_label; ASS §3.2)

# Table 1/3 columns: which streams and modules each trains
PRESETS = {
    "ga-csa": dict(use_source=True, use_ga=True, sa="csa", labeled=True),     # ASS (headline)
    "ga-fcsa": dict(use_source=True, use_ga=True, sa="fcsa", labeled=True),
    "ga": dict(use_source=True, use_ga=True, sa="none", labeled=True),
    "oracle": dict(use_source=False, use_ga=False, sa="none", labeled=True),   # labeled target only
    "adaptsegnet": dict(use_source=True, use_ga=True, sa="none", labeled=False),  # N = 0 row, UDA
    "source-only": dict(use_source=True, use_ga=False, sa="none", labeled=False),  # demo baseline
}


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--source", choices=["gta5", "synthia", "demo"], default="gta5", help="source domain")
    training.add_target_arg(p, labeled=True)
    p.add_argument("--preset", choices=list(PRESETS), default="ga-csa",
                   help="column of ASS Tables 1/3: ga-csa (ASS), ga-fcsa, ga, oracle (labeled target only), "
                        "adaptsegnet (N = 0: AdaptSegNet multi-level UDA); source-only is a demo baseline")
    training.add_split_args(p, None, "100 for the presets with labeled images, 0 for adaptsegnet/source-only; "
                                   "ASS Tables 1/3 use 50/100/200/500/1000/2975")
    p.add_argument("--unlabeled", choices=["all", "complement"], default="all",
                   help="unlabeled target pool: all train images (R8; needed for N = 2975) or those not labeled")
    p.add_argument("--ga-direction", choices=["s2t", "t2s"], default=None,
                   help="G's GA term: source maps labelled target (s2t, ASS Eq. 2; default with N > 0) or "
                        "unlabeled target maps labelled source (t2s, AdaptSegNet code; default for adaptsegnet)")
    p.add_argument("--lambda-seg", type=float, default=0.1,
                   help="weight of the aux-head CE, main head 1 (AdaptSegNet LAMBDA_SEG; R3)")
    p.add_argument("--lambda-adv", type=float, nargs=2, default=[0.0002, 0.001], metavar=("AUX", "MAIN"),
                   help="GA weights of the aux / main level (AdaptSegNet LAMBDA_ADV_TARGET1/2; README: "
                        "0.00005 0.0005 for PyTorch >= 0.4)")
    p.add_argument("--lambda-sadv", type=float, default=None,
                   help="weight of L_sadv: CSA 0.01 (Table 2b), FCSA 1.0 and 0.04 at N = 500 (Table 2a; R17)")
    p.add_argument("--lambda-gd", type=float, default=0.5, help="weight of each domain term of L_gd (R7)")
    p.add_argument("--lambda-sd", type=float, default=0.5, help="weight of each domain term of L_sd (R7)")
    p.add_argument("--lr-d", type=float, default=1e-4,
                   help="Adam learning rate of every discriminator (ASS §4.2; AdaptSegNet LEARNING_RATE_D)")
    p.add_argument("--poly-iters", type=int, default=None,
                   help="horizon of the poly schedule (power 0.9) of G and every D; default --iters / 0.6 "
                        "= 250000 for 150000 (AdaptSegNet NUM_STEPS / NUM_STEPS_STOP)")
    p.add_argument("--nesterov", action="store_true",
                   help="Nesterov momentum as ASS §4.2 writes (the AdaptSegNet code uses plain momentum; R12)")
    p.add_argument("--clean-param-groups", action="store_true",
                   help="clean variant: each tensor once in the 1x group (AdaptSegNet lists backbone tensors "
                        "3-4 times; changes results)")
    p.add_argument("--aspp-full", action="store_true",
                   help="clean variant: sum all four ASPP branches (AdaptSegNet sums two; issues #20, #60)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="G's optimiser: sgd = AdaptSegNet's SGD 0.9 / wd 5e-4; adam is for the random-init demo")
    training.set_target_defaults(p, argv)
    args = training.parse_with_demo(p, DEMO, argv)
    training.check_args(args)
    training.check_target(args, args.source, args.target, labeled=True)
    training.check_optimizer_flags(args)
    resolve_preset(args)
    if args.source_size is None:
        args.source_size = SOURCE_SIZE[args.source]
    if args.poly_iters is None:
        args.poly_iters = round(args.iters / 0.6)
    if args.nesterov and args.optimizer != "sgd":
        raise common.DataError(f"--nesterov: G's optimiser is --optimizer {args.optimizer}, not sgd")
    if args.poly_iters < args.iters:
        raise common.DataError(f"--poly-iters {args.poly_iters}: expected >= --iters {args.iters}")
    if min(*args.lambda_adv, args.lambda_seg, args.lambda_sadv, args.lambda_gd, args.lambda_sd) < 0 \
            or not args.lr_d > 0:
        raise common.DataError("loss weights (--lambda-*) must be >= 0 and --lr-d > 0")
    return args


def resolve_preset(args):
    """Fill the preset's streams and modules into args; contradictory explicit flags are a DataError."""
    preset = PRESETS[args.preset]
    args.use_source, args.use_ga, args.sa = preset["use_source"], preset["use_ga"], preset["sa"]
    if args.n_labeled is None and args.split_file is None:
        args.n_labeled = 100 if preset["labeled"] else 0
    if preset["labeled"] and args.n_labeled == 0:
        raise common.DataError(f"--preset {args.preset} with --n-labeled 0: this column trains on labeled "
                               f"target images (the N = 0 GA column is --preset adaptsegnet)")
    if not preset["labeled"] and (args.n_labeled or args.split_file):
        raise common.DataError(f"--preset {args.preset} uses no labeled target image: drop --n-labeled "
                               f"{args.n_labeled} / --split-file, or use --preset ga|ga-fcsa|ga-csa|oracle")
    if not args.use_ga and args.ga_direction is not None:
        raise common.DataError(f"--ga-direction {args.ga_direction}: --preset {args.preset} has no GA module")
    if args.sa == "none" and args.lambda_sadv is not None:
        raise common.DataError(f"--lambda-sadv {args.lambda_sadv}: --preset {args.preset} has no "
                               f"semantic-level module (use ga-csa or ga-fcsa)")
    if args.ga_direction is None and args.use_ga:   # a preset without GA records none
        args.ga_direction = "t2s" if args.preset == "adaptsegnet" else "s2t"
    if args.lambda_sadv is None:        # R17: FCSA's best lambda depends on N (a --split-file's N too)
        args.lambda_sadv = {"csa": 0.01, "fcsa": 0.04 if args.n_labeled == 500 else 1.0}.get(args.sa, 0.0)
    return args


# ------------------------------------------------------------------ init, network, discriminators

def segment(model, x):
    """(pred1, pred2, F): aux logits (layer5 on layer3), main logits (layer6 on layer4) and F = layer4 (R4).

    The same computation as DeeplabMulti's forward, which returns only the two logit maps.
    """
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x3 = model.layer3(model.layer2(model.layer1(h)))
    feat = model.layer4(x3)
    return model.layer5(x3), model.layer6(feat), feat


class Segmenter(nn.Module):
    """`segment` as a module's forward: what DistributedDataParallel wraps for the training passes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return segment(self.model, x)


def semantic_discriminator(kind, n=2048, c=NUM_CLASSES):
    """D_s of ASS §4.1: CSA = 1x1 convs n -> 1024 -> 2c per pixel; FCSA = FC n -> 1024 -> 2c per class vector."""
    if kind == "csa":
        return nn.Sequential(nn.Conv2d(n, 1024, 1), nn.LeakyReLU(0.2), nn.Conv2d(1024, 2 * c, 1))
    return nn.Sequential(nn.Linear(n, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 2 * c))


def build_discriminators(args):
    """ModuleDict of the run's discriminators: D_g1 (aux level), D_g2 (main level), D_s (CSA/FCSA)."""
    discs = nn.ModuleDict()
    if args.use_ga:
        discs["D_g1"] = common.FCDiscriminator(NUM_CLASSES)
        discs["D_g2"] = common.FCDiscriminator(NUM_CLASSES)
    if args.sa != "none":
        discs["D_s"] = semantic_discriminator(args.sa, n=32 * args.width)   # F = layer4: 2048 channels at width 64
    return discs


def build_optimisers(model, discs, args):
    """G: SGD over the 1x/10x groups (or the demo's Adam); every D: Adam (0.9, 0.99); poly on all (§4.2)."""
    duplicates = not args.clean_param_groups
    if args.optimizer == "sgd" and args.nesterov:
        opt_g = common.LegacySGD(common.param_groups(model, args.lr, official_duplicates=duplicates), lr=args.lr,
                                 nesterov=True, rule=args.sgd_rule)
    else:
        opt_g = common.deeplab_optimizer(model, args.lr, args.optimizer, duplicates, args.sgd_rule)
    opt_d = {name: torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=(0.9, 0.99),
                                    **common.adam_kernels(next(d.parameters()).device)) for name, d in discs.items()}
    poly = lambda i: common.poly_factor(i, args.poly_iters)  # noqa: E731 (lr set before iteration i)
    return opt_g, opt_d, common.lr_scheduler(opt_g, poly), {k: common.lr_scheduler(o, poly) for k, o in opt_d.items()}


# ------------------------------------------------------------------ losses (Eq. 1-8)

def gan_loss(d_logits, domain):
    """BCE with logits against a constant domain label, mean over D's output map (AdaptSegNet 'Vanilla')."""
    d_logits = d_logits.float()
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, float(domain)))


def d_input(logits, size):
    """What D_g sees: the softmax of the logits upsampled to the input image size (AdaptSegNet)."""
    return common.upsample(logits, size).float().softmax(1)


def downsample_labels(y, size):
    """y of ASS §3: the label map nearest-resized to F's h x w (R5); 255 stays 255."""
    return F.interpolate(y[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def class_vectors(feat, y, c=NUM_CLASSES):
    """Eq. 4: V^k = mean of F over the pixels of class k, per image -> (B, c, n), and (B, c) present flags."""
    onehot = F.one_hot(torch.where(y == common.IGNORE, c, y), c + 1)[..., :c].float()   # (B, h, w, c)
    counts = onehot.sum((1, 2))
    sums = torch.einsum("bnhw,bhwk->bkn", feat.float(), onehot)
    return sums / counts.clamp(min=1)[..., None], counts > 0


def sa_targets(y, c, domain):
    """Channel of D_s's 2c-way softmax for class k: k (source, z = 0) or k + c (target, z = 1); 255 kept."""
    return torch.where(y == common.IGNORE, y, y + c * domain)


def sa_loss(d_s, kind, feat, y, domain, c=NUM_CLASSES):
    """-log D_s(.)[k + domain*c]: CSA per valid pixel of F (Eq. 7/8), FCSA per class vector (Eq. 5/6); means (R6).

    domain = TARGET on source features is the adversarial loss L_sadv (Eq. 5/7); D_s's own loss L_sd (Eq. 6/8)
    uses SOURCE for source features and TARGET for labeled-target features.
    """
    if kind == "csa":
        return common.ce_loss(d_s(feat), sa_targets(y, c, domain))
    vectors, present = class_vectors(feat, y, c)
    logits = d_s(vectors).float()                                              # (B, c, 2c); absent rows masked
    target = (torch.arange(c, device=feat.device) + c * domain).expand(present.shape)
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(present.shape)
    return (nll * present).sum() / present.sum().clamp(min=1)


# ------------------------------------------------------------------ one iteration: G passes, then D

def set_requires_grad(modules, flag):
    """Freeze (False) or unfreeze the discriminators; frozen D still passes gradients to its input."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def generator_pass(model, discs, args, amp, source, labeled, unlabeled, seg=None):
    """Eq. 9 (with AdaptSegNet's multi-level GA): backward of every G loss, D frozen.

    source / labeled = (x, y) or None, unlabeled = x or None; seg(x) = segment(model, x) (under torchrun
    the DDP-wrapped Segmenter); discs: the raw discriminators (frozen here, so outside DDP). Returns the
    losses and the detached tensors the discriminators learn from (Eq. 10).
    """
    seg = seg or Segmenter(model)
    set_requires_grad(discs.values(), False)
    losses, saved = {}, {}
    lam1, lam2 = args.lambda_adv
    adapt_u = unlabeled is not None and args.ga_direction != "s2t"             # T_U has its own backward
    if source is not None:                                                     # S: segmentation + adaptation
        x_s, y_s = source
        with training.grad_sync(seg, last=labeled is None and not adapt_u):    # DDP: no_sync but the last pass
            with amp.autocast():
                p1, p2, feat = seg(x_s)
                losses["loss_seg_s"] = common.seg_loss(p1, p2, y_s, args.lambda_seg)    # Eq. 1 on I_s
                loss = losses["loss_seg_s"]
                if args.use_ga:
                    P1, P2 = d_input(p1, x_s.shape[2:]), d_input(p2, x_s.shape[2:])
                    saved["P_s"] = (P1.detach(), P2.detach())
                    if args.ga_direction == "s2t":                                 # Eq. 2: source maps -> "target"
                        losses["loss_adv1"] = gan_loss(discs["D_g1"](P1), TARGET)
                        losses["loss_adv2"] = gan_loss(discs["D_g2"](P2), TARGET)
                        loss = loss + lam1 * losses["loss_adv1"] + lam2 * losses["loss_adv2"]
                if args.sa != "none":
                    y_f = downsample_labels(y_s, feat.shape[2:])
                    losses["loss_sadv"] = sa_loss(discs["D_s"], args.sa, feat, y_f, TARGET)   # Eq. 5 / 7
                    loss = loss + args.lambda_sadv * losses["loss_sadv"]
                    saved["F_s"] = (feat.detach(), y_f)
            amp.backward(loss)
    if labeled is not None:                                                    # T_L: segmentation only
        x_l, y_l = labeled
        with training.grad_sync(seg, last=not adapt_u):
            with amp.autocast():
                p1, p2, feat = seg(x_l)
                losses["loss_seg_tl"] = common.seg_loss(p1, p2, y_l, args.lambda_seg)   # Eq. 1 on I_tl
            amp.backward(losses["loss_seg_tl"])
        if args.sa != "none":
            saved["F_tl"] = (feat.detach(), downsample_labels(y_l, feat.shape[2:]))
    if unlabeled is not None:                                                  # T_U: only GA sees it
        x_u = unlabeled
        if args.ga_direction == "s2t":                # no graph needed; train-mode BN still updates its stats
            with torch.no_grad(), amp.autocast():
                p1, p2, _ = seg(x_u)
                saved["P_tu"] = (d_input(p1, x_u.shape[2:]), d_input(p2, x_u.shape[2:]))
        else:                                         # AdaptSegNet: target maps -> "source"
            with amp.autocast():
                p1, p2, _ = seg(x_u)
                P1, P2 = d_input(p1, x_u.shape[2:]), d_input(p2, x_u.shape[2:])
                losses["loss_adv1"] = gan_loss(discs["D_g1"](P1), SOURCE)
                losses["loss_adv2"] = gan_loss(discs["D_g2"](P2), SOURCE)
            amp.backward(lam1 * losses["loss_adv1"] + lam2 * losses["loss_adv2"])
            saved["P_tu"] = (P1.detach(), P2.detach())
    return losses, saved


def discriminator_pass(discs, args, amp, saved):
    """Eq. 10: each D_g on source (0) and unlabeled-target (1) maps, D_s on source (k) and labeled-target
    (k + c) features, all detached, each domain term weighted 0.5; one backward into the discriminators."""
    set_requires_grad(discs.values(), True)
    losses = {}
    with amp.autocast():
        if args.use_ga:
            for level, name in ((0, "D_g1"), (1, "D_g2")):                    # Eq. 3 per level
                losses[f"loss_d{level + 1}"] = (args.lambda_gd * gan_loss(discs[name](saved["P_s"][level]), SOURCE)
                                                + args.lambda_gd * gan_loss(discs[name](saved["P_tu"][level]), TARGET))
        if args.sa != "none":                                                   # Eq. 6 / 8
            losses["loss_ds"] = (args.lambda_sd * sa_loss(discs["D_s"], args.sa, *saved["F_s"], SOURCE)
                                 + args.lambda_sd * sa_loss(discs["D_s"], args.sa, *saved["F_tl"], TARGET))
    if losses:
        amp.backward(sum(losses.values()))
    return losses


# ------------------------------------------------------------------ checkpoints

def training_state(i, model, opt_g, sched_g, discs, opt_d, sched_d, best, args):
    """training.training_state plus every discriminator's weights, Adam state and schedule, and the best snapshot."""
    state = training.training_state(i, model, opt_g, sched_g, args)
    state["discriminators"] = {k: d.state_dict() for k, d in discs.items()}
    state["optimizers_d"] = {k: o.state_dict() for k, o in opt_d.items()}
    state["schedulers_d"] = {k: s.state_dict() for k, s in sched_d.items()}
    state["best"] = dict(best)
    return state


def restore(ckpt, path, model, opt_g, sched_g, discs, opt_d, sched_d, dist=common.Dist()):
    """Load a checkpoint into the run; DataError (nothing written yet) when its discriminator state is missing
    or belongs to another preset. Returns (start iteration, best snapshot)."""
    found = set(ckpt.get("discriminators", {})) & set(ckpt.get("optimizers_d", {})) & set(ckpt.get("schedulers_d", {}))
    if found != set(discs):
        need = ", ".join(discs) or "none"
        raise common.DataError(f"{path}: discriminator state (weights, Adam state, schedule) for "
                               f"{', '.join(sorted(found)) or 'none'}, but this run needs {need}; resume with the "
                               f"checkpoint of a run of the same --preset")
    try:
        start = training.restore_training(ckpt, model, opt_g, sched_g, dist=dist)
        for k in discs:
            discs[k].load_state_dict(ckpt["discriminators"][k])
            opt_d[k].load_state_dict(ckpt["optimizers_d"][k])
            sched_d[k].load_state_dict(ckpt["schedulers_d"][k])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise common.DataError(f"{path}: not a checkpoint of this run's models "
                               f"({str(exc).strip().splitlines()[0][:200]})") from None
    return start, ckpt.get("best", {})


# ------------------------------------------------------------------ training

def train(args):
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    training.apply_world(args, dist, device)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    style, norm = common.init_convention(args.init)
    common.seed_everything(args.seed)
    synthia = args.source == "synthia"
    out_dir = Path(args.out_dir or training.default_out_dir("asss", f"{args.source}_{args.preset}", args.n_labeled,
                                                          args.seed, args.target))
    # ---------------------------------------------------------------- data
    source_kind, source_root, target_kind, target_root = training.data_roots(args, args.source, args.target)
    val = training.target_val(target_kind, target_root, args.target_size, args.eval_res, norm, interp="bicubic",
                              conditions=args.acdc_conditions)
    model = training.prepare_model(common.DeepLabV2(NUM_CLASSES, multi_level=True, aspp_full=args.aspp_full,
                                                    style=style, layers=args.layers, width=args.width), device, amp)
    if args.eval_only:                                          # the main head (layer6), as AdaptSegNet evaluates
        return training.eval_only(args, model, val, device, out_dir, synthia, dist=dist)
    stems = common.dataset_stems(target_kind, target_root, conditions=args.acdc_conditions)
    labeled, rest = common.labeled_split(stems, args.n_labeled, args.split_seed, args.split_file)
    args.n_labeled = len(labeled)
    pool = stems if args.unlabeled == "all" else rest           # R8
    if args.use_ga and not pool:
        raise common.DataError(f"--unlabeled complement with --n-labeled {len(labeled)} leaves no unlabeled image")
    city = lambda names: common.SegmentationDataset(  # noqa: E731 (AdaptSegNet: bicubic resize, no crop)
        target_kind, target_root, resize=args.target_size, interp="bicubic", crop=args.crop_size, norm=norm,
        stems=names, conditions=args.acdc_conditions)
    data_s = common.SegmentationDataset(source_kind, source_root, resize=args.source_size, interp="bicubic",
                                        crop=args.crop_size, norm=norm) if args.use_source else None
    data_l = city(labeled) if labeled else None
    data_u = city(pool) if args.use_ga else None
    # ---------------------------------------------------------------- models, optimisers
    init = args.init if args.init != "adaptsegnet" else str(common.download_init(      # AdaptSegNet's own file
        "adaptsegnet", ADAPTSEGNET_INIT_URL, ADAPTSEGNET_INIT_SHA256_PREFIX))
    training.initialise(model, init, norm, args.data_root)
    discs = nn.ModuleDict({k: training.prepare_model(d, device, amp) for k, d in build_discriminators(args).items()})
    opt_g, opt_d, sched_g, sched_d = build_optimisers(model, discs, args)
    start, best = 0, {}
    ckpt = training.resume_state(args, out_dir, NUM_CLASSES)
    if ckpt is not None:
        path = out_dir / "checkpoint.pth" if args.resume == "auto" else Path(args.resume)
        start, best = restore(ckpt, path, model, opt_g, sched_g, discs, opt_d, sched_d, dist)
    training.write_run_files(out_dir, args, labeled, dist)
    seg = training.ddp(Segmenter(model), dist, device, args.sync_bn)   # training passes; `model` for the rest
    train_discs = {k: training.ddp(d, dist, device) for k, d in discs.items()}   # D's own pass (Eq. 10)
    training.compile_networks(args, seg, *discs.values(), *train_discs.values())   # --compile: in place
    loader_s = training.shuffled_loader(data_s, args, 0, start, dist=dist) if data_s is not None else None
    loader_l = training.shuffled_loader(data_l, args, 1, start, dist=dist) if data_l is not None else None
    loader_u = training.shuffled_loader(data_u, args, 2, start, dist=dist) if data_u is not None else None
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    metrics = None  # the last evaluation
    # ---------------------------------------------------------------- training loop (AdaptSegNet order)
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        model.train()                                           # BN batch statistics, as AdaptSegNet
        opt_g.zero_grad(set_to_none=True)
        for opt in opt_d.values():
            opt.zero_grad(set_to_none=True)
        source = training.next_batch(loader_s, device) if loader_s is not None else None
        labeled_batch = training.next_batch(loader_l, device) if loader_l is not None else None
        unlabeled = training.next_batch(loader_u, device)[0] if loader_u is not None else None   # labels unused
        with training.cast_once(amp):                           # each network's weights cast once per step
            losses, saved = generator_pass(model, discs, args, amp, source, labeled_batch, unlabeled, seg)   # Eq. 9
            losses.update(discriminator_pass(train_discs, args, amp, saved))                           # Eq. 10
        amp.step(opt_g, *opt_d.values())
        lr = sched_g.get_last_lr()[0]
        for sched in (sched_g, *sched_d.values()):
            sched.step()
        log.log(i, losses, lr)
        # ------------------------------------------------------------ snapshots, evaluation
        if training.is_due(i, args.eval_every, args.iters):
            metrics = training.evaluate_and_write(model, val, device, out_dir, i + 1, synthia, amp, dist=dist)
            training.update_best(best, metrics, out_dir, synthia, dist.main)     # R15
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            training.write_checkpoints(out_dir, training_state(i + 1, model, opt_g, sched_g, discs, opt_d, sched_d,
                                                             best, args), args.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, out_dir)
    stop.restore()
    return metrics or training.evaluate_and_write(model, val, device, out_dir, start, synthia, amp,
                                                dist=dist)  # a finished run


def baseline_args(args, preset, suffix):
    """The demo's baseline run: the same settings under another preset, in <out-dir><suffix>."""
    base = copy.copy(args)
    base.preset, base.ga_direction, base.lambda_sadv, base.split_file = preset, None, None, None
    base.n_labeled = args.n_labeled if PRESETS[preset]["labeled"] else 0
    base.out_dir = str(Path(args.out_dir or training.default_out_dir(
        "asss", f"{args.source}_{args.preset}", args.n_labeled, args.seed))) + suffix
    return resolve_preset(base)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    metrics = train(args)
    if args.demo and not args.eval_only and args.preset == "ga-csa":
        oracle = train(baseline_args(args, "oracle", "_oracle"))
        source_only = train(baseline_args(args, "source-only", "_source_only"))
        out_dir = args.out_dir or training.default_out_dir("asss", f"{args.source}_{args.preset}", args.n_labeled,
                                                         args.seed)
        training.write_demo_summary(out_dir, "asss.py", ("GA+CSA", metrics),
                                  [(f"oracle ({args.n_labeled} labeled)", oracle), ("source-only", source_only)],
                                  args.iters, time.time() - t0)
    return metrics


if __name__ == "__main__":
    training.run_script(main)
