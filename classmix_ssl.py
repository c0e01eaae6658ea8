"""ClassMix: Segmentation-Based Data Augmentation for Semi-Supervised Learning (Olsson, Tranheden, Pinto,
Svensson, WACV 2021; Tranheden & Olsson, MSc thesis, Chalmers 2020) —
semi-supervised semantic segmentation on Cityscapes.

    python classmix_ssl.py --n-labeled 372                  # thesis Table 4.1, 1/8 labels: 61.35
    python classmix_ssl.py --n-labeled 372 --no-unlabeled   # its supervised baseline: 54.84
    python classmix_ssl.py --demo                           # ClassMix and its baseline on the demo data, CPU

What is implemented (defaults = WilhelmT/ClassMix trainSSL.py + configCityscapes.json, with the two
augmentations off as in the runs of Table 4.1): N labeled Cityscapes images train the student with CE (L_l);
a mean teacher (EMA) predicts on the unlabeled images; each unlabeled image's pseudo-label gives a ClassMix
mask (half of its predicted classes) that pastes those pixels onto the next image of the batch; the
student learns on the mixed images from the equally mixed teacher predictions (L_u), weighted by the share
q of confident pixels.

Thesis -> code:
    Alg. 1 ClassMix mask M_k from the teacher argmax A_k (floor(n/2) classes)  -> `M` (common.class_mix_mask)
    §3.2, Fig. 3.3 mixed image x_s,k = M_k u_k + (1 - M_k) u_{k+1}              -> `x_m` (common.mix_pairs)
    mixed target: M_k P_k + (1 - M_k) P_{k+1}, then max/argmax                 -> `conf`, `y_m`
    eq. 2.15 threshold_uniform weight q = |{conf >= tau}| / |pixels|            -> `unsupervised_weight`
    eq. 2.13 sigmoid ramp-up, pixel-wise threshold, constant (Table 5.1)       -> --pixel-weight, --rampup-iters
    eq. 2.14 L = L_l + lambda * L_u (pixel-weighted CE, mean over all pixels)  -> `loss_l`, `loss_u`
    eq. 2.1 squared error instead of CE (Table 5.1)                            -> --consistency-loss mse
    eq. 2.16 EMA teacher alpha = min(1 - 1/(i+1), 0.99)                        -> common.ema_update
    eq. 2.6 poly learning rate, power 0.9 (x10 on the classifier)              -> common.poly_factor

Table 5.1 ablations: --mask cut|cow, --pixel-weight sigmoid|threshold|none, --consistency-loss mse,
--soft-targets, --crop-size 512 512 (random crop; with --no-unlabeled its baseline), --extra-aug (colour
jitter + blur, the released config), --iters 80000.

Authors' quirks kept by default (docs/quirks.md, C1-C12 and Q1-Q12), with the
clean variant as a flag: floor(n/2) classes (--mask-rounding ceil = thesis Alg. 1), two-branch ASPP sum
(--aspp-full), train-mode teacher BN without averaged buffers (--teacher-eval-bn), duplicated 1x parameter
group with the PyTorch-1.5 SGD of its requirements.txt (--clean-param-groups; --sgd-rule torch0.4), jitter applied when U > 0.2 (--jitter-gate 0.5 =
thesis' 50 %), half-resolution evaluation (--eval-res full), the Cityscapes RGB mean subtracted from BGR
images (normalisation `cityscapes_bgr`), q from the *mixed* confidences as one scalar per batch.

Deviations and assumptions:
- Splits: the authors' split_{0,1,2}.pkl index a filesystem-dependent os.walk order, so their exact subsets
  cannot be recovered. Here the train list is sorted and permuted with RandomState(--split-seed):
  --split-seed 1 applies split_2.pkl's permutation, 10 split_1.pkl's; split_0's seed is unknown, so the
  default is split 2's seed 1 rather than the config's split 0 (--official-split picks 1 or 2).
- Seeding of python/numpy/torch and of every draw from --seed and the iteration (exact resume).
- L_l is backpropagated right after its forward, before the teacher and mixed passes (CM/trainSSL.py: one
  backward of L_l + L_u): the gradients add up to the same sum (bit-equal on the CPU), one graph alive at a time.
- --soft-targets ("no pseudo-label") trains with CE against the mixed soft teacher maps, weighted like the
  default; the thesis does not give the loss form (assumed: soft-target cross-entropy).
- --demo trains a light network (--layers 1 1 1 1 --width 32) from the demo init with Adam, 10 labeled.
- A flag that the others would leave without effect is refused (e.g. method flags with --no-unlabeled,
  --mask-rounding with --mask cut|cow, --pixel-weight or --soft-targets with --consistency-loss mse, seed
  flags with --split-file); a --split-file gives N.
- --dataset acdc (an assumption; the paper uses Cityscapes only): the labeled split is drawn from ACDC's sorted
  train list as from Cityscapes' (--split-seed, nested; --acdc-conditions picks conditions), the Cityscapes resizes
  are scaled to ACDC's 1920x1080 frame (1024x512 -> 960x540) and val is scored at full label resolution (mmseg's
  protocol for ACDC, DAFormer/HRDA); --dataset dark_zurich is refused (Dark Zurich train has no labels).
- --compile (README 'Compiled step'): torch.compile, in place, of the student's training forward and the EMA
  teacher (evaluation eager; checkpoints and exact resume unchanged). The demo's Adam is fused on CUDA, foreach
  elsewhere; the SGD is the authors' per-listing LegacySGD.
"""
import copy
import time
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import training

PAPER = {  # dest: (value, source) — shown in --help
    "iters": (40000, "CM configCityscapes.json; thesis §4.1.2"),
    "batch_size": (2, "2 labeled + 2 unlabeled; CM configCityscapes.json"),
    "lr": (2.5e-4, "CM configCityscapes.json; head x10"),
    "target_size": ((1024, 512), "CM configCityscapes.json input_size 512,1024"),
    "crop_size": ((0, 0), "no crop: CM configCityscapes.json crop false; thesis §4.1.2"),
    "eval_res": ("half", "CM/evaluateSSL.py"),
    "init": ("coco", "CM configCityscapes.json 'pretrained: coco'"),
    "sgd_rule": ("torch1.5", "WilhelmT/ClassMix requirements.txt: torch==1.5.0"),
    "eval_every": (5000, "CM configCityscapes.json"),
    "save_every": (5000, "CM configCityscapes.json"),
}
DEMO = {"dataset": "demo", "n_labeled": 10, "iters": 400, "lr": 1e-3, "optimizer": "adam", "layers": [1, 1, 1, 1],
        "width": 32, "init": "demo", "target_size": [128, 64], "eval_every": 0, "save_every": 100, "log_every": 25,
        "workers": 0}
OFFICIAL_SPLIT_SEED = {1: 10, 2: 1}  # CM split_1.pkl / split_2.pkl = these RandomState permutations


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[training.shared_parser(PAPER)],
                              formatter_class=training.HelpFormatter)
    p.add_argument("--dataset", choices=["cityscapes", "acdc", "dark_zurich", "demo"], default="cityscapes",
                   help="the dataset (acdc: its labeled train split, drawn as Cityscapes'; its 960x540 frame scale "
                        "and full-resolution evaluation; dark_zurich is refused: no train labels)")
    training.add_split_args(p, 372, "1/8 of 2975; CM configCityscapes.json labeled_samples", split_seed=1,
                          seed_help="; 1 = the permutation of CM split_2.pkl, 10 = split_1.pkl")
    p.add_argument("--official-split", type=int, choices=[1, 2], default=None,
                   help="use the permutation of CM split_<k>.pkl (sets --split-seed; split_0's is unknown)")
    p.add_argument("--no-unlabeled", action="store_true",
                   help="supervised baseline: labeled images only, no teacher (Table 4.1 'Baseline')")
    p.add_argument("--mask", choices=["class", "cut", "cow"], default="class",
                   help="mixing mask: ClassMix (default), CutMix or CowMix (Table 5.1)")
    p.add_argument("--mask-rounding", choices=["floor", "ceil"], default="floor",
                   help="classes pasted from n: floor(n/2) (CM code) or ceil(n/2) (thesis Alg. 1)")
    p.add_argument("--pixel-weight", choices=["threshold_uniform", "threshold", "sigmoid", "none"],
                   default="threshold_uniform",
                   help="weight of L_u: share of confident pixels (default), per-pixel threshold, sigmoid "
                        "ramp-up exp(-5(1-i/L)^2), constant 1 (Table 5.1)")
    p.add_argument("--rampup-iters", type=int, default=10000,
                   help="L of --pixel-weight sigmoid (CM/trainSSL.py; divided by K with --scale-iters)")
    p.add_argument("--tau", type=float, default=0.968, help="confidence threshold (CM/trainSSL.py)")
    p.add_argument("--ema-alpha", type=float, default=0.99, help="teacher EMA momentum (CM/trainSSL.py)")
    p.add_argument("--consistency-weight", type=float, default=1.0,
                   help="lambda of L_u (CM configCityscapes.json consistency_weight)")
    p.add_argument("--consistency-loss", choices=["ce", "mse"], default="ce",
                   help="L_u: pixel-weighted CE (default) or squared error between softmax and the mixed teacher "
                        "maps, times q (Table 5.1; CM/trainSSL.py)")
    p.add_argument("--soft-targets", action="store_true",
                   help="no pseudo-label: CE against the mixed soft teacher maps (Table 5.1)")
    p.add_argument("--extra-aug", action="store_true",
                   help="colour jitter + Gaussian blur on mixed images: the released config (Table 5.1 "
                        "'Extra augmentations'); off = the runs of Table 4.1")
    p.add_argument("--jitter-gate", type=float, default=0.2,
                   help="with --extra-aug, jitter applied when U(0,1) > gate: 0.2 = 80 %% (CM code), 0.5 = thesis")
    p.add_argument("--aspp-full", action="store_true",
                   help="clean variant: sum all four ASPP branches (the authors' code sums two; docs/quirks.md Q1)")
    p.add_argument("--teacher-eval-bn", action="store_true",
                   help="clean variant: eval-mode teacher BN with EMA-averaged running stats (docs/quirks.md Q3)")
    p.add_argument("--clean-param-groups", action="store_true",
                   help="clean variant: each tensor once in the 1x group (changes results; docs/quirks.md Q4)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd = the authors' SGD 0.9 / wd 5e-4; adam is for the random-init demo")
    training.set_target_defaults(p, argv, dest="dataset")
    args = training.parse_with_demo(p, DEMO, argv)
    training.check_args(args)
    training.check_target(args, None, "cityscapes" if args.dataset == "demo" else args.dataset, labeled=True,
                          flag="--dataset")
    if args.official_split is not None and args.dataset == "acdc":
        raise common.DataError(f"--official-split {args.official_split}: ClassMix's split files permute the 2975 "
                               f"Cityscapes train images (this run: --dataset {args.dataset})")
    training.check_optimizer_flags(args)
    if not 0 < args.ema_alpha < 1 or not 0 <= args.jitter_gate <= 1 or not 0 < args.tau <= 1:
        raise common.DataError("--ema-alpha in (0,1), --jitter-gate in [0,1] and --tau in (0,1] expected")
    if args.consistency_weight < 0 or args.rampup_iters < 1:
        raise common.DataError("--consistency-weight >= 0 and --rampup-iters >= 1 expected")
    check_combinations(args, lambda *dests: [f"--{d.replace('_', '-')}" for d in dests
                                             if getattr(args, d) != p.get_default(d)])
    if args.official_split is not None:
        args.split_seed = OFFICIAL_SPLIT_SEED[args.official_split]
    return args


def check_combinations(args, changed):
    """Refuse flags that the other flags would leave without effect; `changed(*dests)` names those given
    a value other than their default."""
    unused = changed("mask", "mask_rounding", "pixel_weight", "rampup_iters", "tau", "ema_alpha", "consistency_weight",
                     "consistency_loss", "soft_targets", "extra_aug", "jitter_gate", "teacher_eval_bn")
    if args.no_unlabeled and unused:
        raise common.DataError(f"--no-unlabeled trains without teacher and mixed images: {', '.join(unused)} "
                               f"would have no effect (drop them)")
    if not args.no_unlabeled and args.batch_size < 2:
        raise common.DataError(f"--batch-size {args.batch_size}: ClassMix pastes image k onto image k+1 of the "
                               f"unlabeled batch, which needs at least 2 (or --no-unlabeled)")
    if args.mask != "class" and changed("mask_rounding"):
        raise common.DataError(f"--mask-rounding applies to --mask class (here --mask {args.mask})")
    if args.consistency_loss == "mse" and changed("pixel_weight", "soft_targets"):
        raise common.DataError(f"--consistency-loss mse is scaled by q whatever the weight (CM/trainSSL.py): "
                               f"{', '.join(changed('pixel_weight', 'soft_targets'))} would have no effect")
    if args.pixel_weight != "sigmoid" and changed("rampup_iters"):
        raise common.DataError(f"--rampup-iters is the length of --pixel-weight sigmoid (here {args.pixel_weight})")
    if not args.extra_aug and changed("jitter_gate"):
        raise common.DataError("--jitter-gate gates the jitter of --extra-aug: add --extra-aug")
    if args.split_file is not None and args.official_split is not None:   # (--split-seed: training.py refuses)
        raise common.DataError("--split-file gives the labeled list itself: drop --split-seed / --official-split")
    if args.official_split is not None and changed("split_seed") \
            and args.split_seed != OFFICIAL_SPLIT_SEED[args.official_split]:
        raise common.DataError(f"--official-split {args.official_split} is --split-seed "
                               f"{OFFICIAL_SPLIT_SEED[args.official_split]} (here --split-seed {args.split_seed})")


def sigmoid_rampup(i, length=10000, c=5.0):
    """eq. 2.13 as CM/trainSSL.py computes it: exp(-c (1 - i/length)^2), then 1."""
    return math.exp(-c * (1 - i / length) ** 2) if i < length else 1.0


def unsupervised_weight(conf, i, args):
    """Per-pixel weight of L_u (§2.5.4) from the mixed confidences `conf` (N,H,W)."""
    confident = (conf >= args.tau).float()
    if args.pixel_weight == "threshold_uniform":
        return confident.mean() * torch.ones_like(conf)          # one q for the batch (docs/quirks.md C3)
    if args.pixel_weight == "threshold":
        return confident
    return torch.full_like(conf, sigmoid_rampup(i, args.rampup_iters) if args.pixel_weight == "sigmoid" else 1.0)


def mixing_mask(teacher_label, g, args):
    """M_k: classes of pseudo-label k (ClassMix) or a CutMix / CowMix mask, 1 = pixel from image k."""
    n, h, w = teacher_label.shape
    if args.mask == "cut":
        return common.cutmix_mask(n, h, w, g, teacher_label.device)
    if args.mask == "cow":
        return common.cowmix_mask(n, h, w, g, teacher_label.device)
    return common.class_mix_mask(teacher_label, g, rule=args.mask_rounding, drop_ignore=True)


def class_mix(x_u, P, g, args):
    """Alg. 1 on the unlabeled batch: the mask of teacher map k pastes image k onto image k+1 (mix_pairs);
    the teacher's soft maps are mixed with the same masks (the targets)."""
    M = mixing_mask(P.argmax(1), g, args)
    return common.mix_pairs(M, x_u), common.mix_pairs(M, P)


def soft_ce_weighted(logits, target_prob, weight):
    """Cross-entropy against soft targets, times a pixel weight, mean over all pixels."""
    return (-(target_prob * F.log_softmax(logits.float(), 1)).sum(1) * weight).mean()


def train(args):
    # ---------------------------------------------------------------- setup
    dist, device = training.distributed(args.device)
    training.apply_world(args, dist, device, pairs_within_batch=not args.no_unlabeled)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    style, norm = common.init_convention(args.init)
    if norm == "imagenet_bgr":
        norm = "cityscapes_bgr"  # ClassMix subtracts the Cityscapes RGB mean from BGR images (docs/quirks.md C9)
    common.seed_everything(args.seed)
    name = args.dataset + "_baseline" * args.no_unlabeled
    out_dir = Path(args.out_dir or training.default_out_dir("classmix_ssl", name, args.n_labeled, args.seed))
    # ---------------------------------------------------------------- data
    kind, root = training.data_roots(args, args.dataset, args.dataset)[2:]
    val = training.target_val(kind, root, args.target_size, args.eval_res, norm, conditions=args.acdc_conditions)
    build = lambda: common.DeepLabV2(19, aspp_full=args.aspp_full, style=style, layers=args.layers,  # noqa: E731
                                     width=args.width)
    student = training.prepare_model(build(), device, amp)
    if args.eval_only:
        return training.eval_only(args, student, val, device, out_dir, dist=dist)
    stems = common.dataset_stems(kind, root, conditions=args.acdc_conditions)
    labeled, unlabeled = common.labeled_split(stems, args.n_labeled, args.split_seed, args.split_file)
    if not labeled:
        raise common.DataError("--n-labeled 0: ClassMix needs labeled images")
    if not unlabeled and not args.no_unlabeled:
        raise common.DataError(f"--n-labeled {len(labeled)} leaves no unlabeled image (use --no-unlabeled)")
    crop = args.crop_size if min(args.crop_size) > 0 else None  # no augmentation besides the optional crop (C7)
    data_l = common.SegmentationDataset(kind, root, resize=args.target_size, crop=crop, norm=norm,
                                        stems=labeled, conditions=args.acdc_conditions)
    data_u = None if args.no_unlabeled else common.SegmentationDataset(
        kind, root, resize=args.target_size, crop=crop, norm=norm, stems=unlabeled, conditions=args.acdc_conditions)
    # ---------------------------------------------------------------- models, optimiser
    training.initialise(student, args.init, norm, args.data_root)
    teacher = None if args.no_unlabeled else training.prepare_model(    # train-mode BN as the authors' (C4)
        common.ema_teacher(student, build, train_bn=not args.teacher_eval_bn), device, amp)
    optimizer = common.deeplab_optimizer(student, args.lr, args.optimizer, not args.clean_param_groups, args.sgd_rule)
    scheduler = common.lr_scheduler(optimizer, lambda i: common.poly_factor(i, args.iters))
    start = 0
    ckpt = training.resume_state(args, out_dir, 19)
    if ckpt is not None:
        start = training.restore_training(ckpt, student, optimizer, scheduler, teacher, args.seed, dist)
    training.write_run_files(out_dir, args, labeled, dist)
    model = training.ddp(student, dist, device, args.sync_bn)   # training forwards; `student` for the rest
    training.compile_networks(args, model, teacher)               # --compile: in place, checkpoints unchanged
    loader_l = training.shuffled_loader(data_l, args, 0, start, dist=dist)
    loader_u = None if data_u is None else training.shuffled_loader(data_u, args, 1, start, dist=dist)
    log = training.Logger(out_dir, args.log_every, args.iters, start, dist)
    metrics = None  # the last evaluation
    # ---------------------------------------------------------------- training loop (CM/trainSSL.py order)
    stop = training.StopSignals(dist)     # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        student.train()
        g = common.step_generator(args.seed, i, dist.rank)
        optimizer.zero_grad(set_to_none=True)
        x_l, y_l = training.next_batch(loader_l, device)
        with training.cast_once(amp):                                   # the weights cast once for both passes
            with training.grad_sync(model, last=teacher is None):
                with amp.autocast():
                    loss_l = common.ce_loss(common.upsample(model(x_l), y_l.shape[1:]), y_l)     # L_l, supervised CE
                amp.backward(loss_l)      # before the mixed forward: one graph alive; the gradients add up
            losses = {"loss_l": loss_l.detach()}
            if teacher is not None:
                x_u, _ = training.next_batch(loader_u, device)                 # labels unused
                with torch.no_grad(), amp.autocast():
                    P = common.upsample(teacher(x_u).float(), x_u.shape[2:]).softmax(1)   # weak view = identity
                x_m, P_m = class_mix(x_u, P, g, args)
                if args.extra_aug:  # one gate, factors per image, one op order and one sigma per call (CM/trainSSL.py)
                    x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=False)
                    x_m = common.gaussian_blur(x_m, g, per_image=False)
                conf, y_m = P_m.max(1)                             # (= mixing the argmax maps)
                w = unsupervised_weight(conf, i, args)
                with amp.autocast():
                    logits_m = common.upsample(model(x_m), y_m.shape[1:])
                    if args.consistency_loss == "mse":  # eq. 2.1 ablation; CM scales it by q whatever the weight
                        loss_u = common.mse_softmax(logits_m, P_m) * (conf >= args.tau).float().mean()
                    elif args.soft_targets:
                        loss_u = soft_ce_weighted(logits_m, P_m, w)
                    else:
                        loss_u = common.ce_pixel_weighted(logits_m, y_m, w)
                    loss_u = args.consistency_weight * loss_u                   # lambda * L_u, eq. 2.14
                losses.update(loss_u=loss_u, q=(conf >= args.tau).float().mean())
                amp.backward(loss_u)
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if teacher is not None:
            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)
        log.log(i, losses, lr)
        # ------------------------------------------------------------ checkpoints, evaluation
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            training.write_checkpoints(out_dir, training.training_state(i + 1, student, optimizer, scheduler, args,
                                                                    teacher), args.keep_checkpoints, dist)
            stop.exit_if_requested(i + 1, out_dir)
        if training.is_due(i, args.eval_every, args.iters):
            metrics = training.evaluate_and_write(student, val, device, out_dir, i + 1, amp=amp, dist=dist)
    stop.restore()
    return metrics or training.evaluate_and_write(student, val, device, out_dir, start, amp=amp,
                                                dist=dist)  # a finished run


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    metrics = train(args)
    if args.demo and not args.no_unlabeled and not args.eval_only:
        baseline = copy.copy(args)
        baseline.no_unlabeled, baseline.out_dir = True, None if args.out_dir is None else args.out_dir + "_baseline"
        base = train(baseline)
        out_dir = args.out_dir or training.default_out_dir("classmix_ssl", args.dataset, args.n_labeled, args.seed)
        training.write_demo_summary(out_dir, "classmix_ssl.py", ("ClassMix", metrics),
                                  [(f"supervised ({args.n_labeled} labeled)", base)], args.iters, time.time() - t0)
    return metrics


if __name__ == "__main__":
    training.run_script(main)
