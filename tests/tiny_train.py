"""A minimal mean-teacher training script built only from common.py's toolkit (used by the resume tests).

It is what every method script's set-up, checkpointing and resume path look like, on a tiny model.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import common  # noqa: E402
import training  # noqa: E402


def main():
    defaults = {"iters": (6, "test"), "batch_size": (2, "test"), "lr": (1e-3, "test"),
                "source_size": ((32, 16), "test"), "target_size": ((32, 16), "test"), "crop_size": ((16, 16), "test"),
                "eval_res": ("half", "test"), "init": ("none", "test")}
    parser = common.ArgumentParser(parents=[training.shared_parser(defaults)])
    parser.add_argument("--n-labeled", type=int, default=2)
    args = parser.parse_args()
    training.check_args(args)
    torch.set_num_threads(1)
    device = training.select_device(args.device)
    root = training.dataset_root(args, "cityscapes")
    stems = common.SegmentationDataset("cityscapes", root).stems()
    labeled, _ = common.labeled_split(stems, args.n_labeled, args.seed)
    train = common.SegmentationDataset("cityscapes", root, resize=tuple(args.target_size),
                                       crop=tuple(args.crop_size), flip=True, stems=labeled)
    out_dir = Path(args.out_dir or training.default_out_dir("tiny_train", "cityscapes", args.n_labeled, args.seed))
    common.seed_everything(args.seed)
    build = lambda: common.DeepLabV2(19, layers=args.layers)  # noqa: E731
    model = build().to(device)
    common.initialise(model, args.init)
    teacher = common.ema_teacher(model, build)
    optimizer = common.LegacySGD(common.param_groups(model, args.lr), lr=args.lr)
    scheduler = common.lr_scheduler(optimizer, lambda i: common.poly_factor(i, args.iters))
    start = 0
    ckpt = training.resume_state(args, out_dir, 19)
    if ckpt is not None:
        start = training.restore_training(ckpt, model, optimizer, scheduler, teacher)
    training.write_run_files(out_dir, args, labeled)
    loader = training.shuffled_loader(train, args, 0, start)
    amp = training.Amp(device, args.amp, args.amp_dtype)
    log = training.Logger(out_dir, args.log_every, args.iters, start)
    stop = training.StopSignals()         # SIGTERM/SIGINT: checkpoint, then exit 128 + signal
    for i in range(start, args.iters):
        g = common.step_generator(args.seed, i)
        x, y = training.next_batch(loader, device)
        with torch.no_grad():
            q_label, q, _ = common.pseudo_label(common.upsample(teacher(x), y.shape[1:]))
        mask = common.class_mix_mask(y, g)
        x_m = common.color_jitter(common.mix_pairs(mask, x), "imagenet_bgr", g)
        y_m = common.mix_pairs(mask, q_label.float()).long()
        with amp.autocast():
            loss_s = common.ce_loss(common.upsample(model(x), y.shape[1:]), y)
            loss_u = common.ce_pixel_weighted(common.upsample(model(x_m), y.shape[1:]), y_m, q)
        optimizer.zero_grad(set_to_none=True)
        amp.backward(loss_s + loss_u)
        amp.step(optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        common.ema_update(teacher, model, i)
        log.log(i, {"loss_s": loss_s, "loss_u": loss_u}, lr)
        if training.is_due(i, args.save_every, args.iters) or stop.requested:
            training.write_checkpoints(out_dir, training.training_state(i + 1, model, optimizer, scheduler, args, teacher),
                                     args.keep_checkpoints)
            stop.exit_if_requested(i + 1, out_dir)


if __name__ == "__main__":
    training.run_script(main)
