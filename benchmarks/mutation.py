"""Mutation run over the six method scripts, common.py and training.py: do the tests catch plausible one-line bugs?

Each mutation replaces one exact snippet (a line, or a few lines for a reordering) of one file by a
plausible bug a contributor could write: a paper default changed, a loss averaged or weighted differently,
two steps of the loop swapped, a pseudo-label or confidence read off the wrong tensor, a mask pasted the
wrong way, the teacher updated differently, a schedule's power or warm-up changed, a resume that forgets
state. The mutation is applied to a scratch copy of the working tree (tracked and untracked, not ignored
files; never the working files), the mutation's covering tests run there with OMP_NUM_THREADS=1, no
bytecode cache and a timeout, and the file is restored. pytest's exit status 1 (a test failed) = caught,
0 or 5 (no test selected by a -k expression) = missed, a timeout = caught (reported as such); any other
status (a collection error, a node id that does not exist) stops the run: the test list is then wrong.

A mutation whose snippet does not occur exactly once in its file, or whose mutated file does not
compile, is an error before anything runs (tests/test_mutation_tool.py checks the list on every test
run, so it follows the code). Results are merged into --json by mutation name and the markdown table is
printed (--table prints it from --json without running).

    OMP_NUM_THREADS=1 python benchmarks/mutation.py                     # every mutation (~8 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/mutation.py --only dacs_tau_default cm_mse_without_q
    python benchmarks/mutation.py --table
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("dacs.py", "classmix_ssl.py", "iidm.py", "camix.py", "asss.py", "dldm.py")


class Mutation(NamedTuple):
    name: str
    file: str
    old: str          # exact text, occurring once in `file`
    new: str
    what: str         # the bug it stands for
    tests: tuple      # pytest arguments: node ids, or a file plus "-k EXPR"


def M(name, file, old, new, what, *tests):
    return Mutation(name, file, old, new, what, tests)


T_DACS, T_CM, T_IIDM = "tests/test_dacs.py", "tests/test_classmix_ssl.py", "tests/test_iidm.py"
T_CAMIX, T_ASSS, T_DLDM = "tests/test_camix.py", "tests/test_asss.py", "tests/test_dldm.py"
T_TOOL, T_MODEL = "tests/test_toolkit.py", "tests/test_model.py"

EMA_AFTER = ("        amp.step(optimizer)\n        lr = scheduler.get_last_lr()[0]\n        scheduler.step()\n"
             "        if teacher is not None:{}\n"
             "            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)\n")
EMA_BEFORE = ("        if teacher is not None:\n"
              "            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)\n"
              "        amp.step(optimizer)\n        lr = scheduler.get_last_lr()[0]\n        scheduler.step()\n")
CAMIX_EMA_COMMENT = "                                                    # Eq. 3, after the step"

MUTATIONS = [
    # ------------------------------------------------------------------ dacs.py
    M("dacs_tau_default", "dacs.py", 'p.add_argument("--tau", type=float, default=0.968,',
      'p.add_argument("--tau", type=float, default=0.9,', "--tau default 0.968 -> 0.9",
      f"{T_DACS}::test_defaults_are_the_released_configuration"),
    M("dacs_jitter_gate_default", "dacs.py", 'p.add_argument("--jitter-gate", type=float, default=0.2,',
      'p.add_argument("--jitter-gate", type=float, default=0.5,', "--jitter-gate default 0.2 (80 %) -> 0.5",
      f"{T_DACS}::test_defaults_are_the_released_configuration"),
    M("dacs_ema_bn_buffers", "dacs.py",
      "common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)",
      "common.ema_update(teacher, student, i, args.ema_alpha, buffers=True)",
      "EMA also averages the BN buffers by default",
      f"{T_DACS}::test_teacher_is_updated_after_the_step_without_bn_buffers"),
    M("dacs_ema_before_step", "dacs.py", EMA_AFTER.format(""), EMA_BEFORE, "EMA update moved before the optimiser step",
      f"{T_DACS}::test_teacher_is_updated_after_the_step_without_bn_buffers"),
    M("dacs_weight_direction", "dacs.py", "w = common.one_mix(M, torch.ones_like(q), q)",
      "w = common.one_mix(M, q, torch.ones_like(q))", "weight q on the pasted source pixels, 1 on the target ones",
      f"{T_DACS}::test_cross_domain_mix_pastes_source_classes_onto_target"),
    M("dacs_mask_from_pseudo_label", "dacs.py",
      "M = common.class_mix_mask(y_s, g, rule=args.mask_rounding, drop_ignore=args.mask_exclude_ignore,",
      "M = common.class_mix_mask(y_t, g, rule=args.mask_rounding, drop_ignore=args.mask_exclude_ignore,",
      "ClassMix mask from the teacher's target pseudo-label instead of the source GT",
      f"{T_DACS}::test_cross_domain_mix_pastes_source_classes_onto_target"),
    M("dacs_intra_q_unmixed", "dacs.py", "conf, y_m = common.mix_pairs(M, teacher_prob).max(1)",
      "conf, y_m = teacher_prob.max(1)", "IntraMix targets and q from the un-mixed teacher maps",
      f"{T_DACS}::test_intra_domain_mix_uses_teacher_argmax_and_mixed_soft_maps"),
    M("dacs_p_model_momentum", "dacs.py", "p_model.lerp_(batch_mean, 0.01)", "p_model.lerp_(batch_mean, 0.99)",
      "distribution-alignment running mean with momentum 0.01 instead of 0.99",
      f"{T_DACS}::test_distribution_alignment_running_mean_has_momentum_0_99"),
    M("dacs_loss_u_unweighted", "dacs.py",
      "loss_u = args.consistency_weight * common.ce_pixel_weighted(logits_m, y_m, w)",
      "loss_u = args.consistency_weight * common.ce_loss(logits_m, y_m)",
      "L_u as plain CE over valid pixels: the pixel weight w (q) dropped", T_DACS, "-k", "pixel-weight"),
    M("dacs_jitter_order_per_call", "dacs.py",
      "x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=True)",
      "x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=False)",
      "one jitter op order per call instead of per image (D6)", f"{T_CAMIX}::test_phase_a_is_dacs_py_exactly"),
    # ------------------------------------------------------------------ classmix_ssl.py
    M("cm_q_from_unmixed", "classmix_ssl.py", "w = unsupervised_weight(conf, i, args)",
      "w = unsupervised_weight(P.max(1).values, i, args)", "q from the un-mixed instead of the mixed confidences",
      f"{T_CM}::test_targets_and_q_come_from_the_mixed_teacher_maps"),
    M("cm_targets_unmixed", "classmix_ssl.py", "return common.mix_pairs(M, x_u), common.mix_pairs(M, P)",
      "return common.mix_pairs(M, x_u), P", "mixed images trained against the un-mixed teacher maps",
      f"{T_CM}::test_class_mix_pastes_pseudo_label_classes_onto_the_next_image_and_mixes_soft_maps"),
    M("cm_ema_before_step", "classmix_ssl.py", EMA_AFTER.format(""), EMA_BEFORE,
      "EMA update moved before the optimiser step", f"{T_CM}::test_teacher_is_updated_after_the_step"),
    M("cm_sigmoid_rampup", "classmix_ssl.py", "return math.exp(-c * (1 - i / length) ** 2) if i < length else 1.0",
      "return math.exp(-c * (1 - i / length)) if i < length else 1.0", "sigmoid ramp-up without the square",
      f"{T_CM}::test_unsupervised_weights"),
    M("cm_mse_without_q", "classmix_ssl.py",
      "loss_u = common.mse_softmax(logits_m, P_m) * (conf >= args.tau).float().mean()",
      "loss_u = common.mse_softmax(logits_m, P_m)", "MSE consistency no longer scaled by q",
      f"{T_CM}::test_mse_consistency_is_scaled_by_q_whatever_the_pixel_weight"),
    M("cm_mask_rounding_default", "classmix_ssl.py",
      'p.add_argument("--mask-rounding", choices=["floor", "ceil"], default="floor",',
      'p.add_argument("--mask-rounding", choices=["floor", "ceil"], default="ceil",',
      "--mask-rounding default floor(n/2) -> ceil(n/2)", f"{T_CM}::test_defaults_are_the_table_4_1_configuration"),
    M("cm_cutmix_area", "common.py", "area = h * w / 2", "area = h * w / 4",
      "CutMix box of a quarter of the image",
      f"{T_CM}::test_cutmix_and_cowmix_masks"),
    M("cm_norm_imagenet_mean", "classmix_ssl.py", '        norm = "cityscapes_bgr"', '        norm = "imagenet_bgr"',
      "ImageNet BGR mean instead of ClassMix's Cityscapes mean (C9)",
      f"{T_CM}::test_training_images_carry_the_cityscapes_mean_subtracted_from_bgr"),
    M("cm_extra_aug_order_per_image", "classmix_ssl.py",
      "x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=False)",
      "x_m = common.color_jitter(x_m, norm, g, gate=args.jitter_gate, per_image_order=True)",
      "--extra-aug jitter op order per image instead of one per call",
      f"{T_CM}::test_extra_aug_jitter_is_kornia_0_3_with_one_op_order_per_call"),
    # ------------------------------------------------------------------ iidm.py
    M("iidm_sup_ce_valid_pixels", "iidm.py", "return fused_scale * common.ce_pixel_weighted(up(model(x), y.shape[1:]), y, w)",
      "return fused_scale * common.ce_loss(up(model(x), y.shape[1:]), y)", "L_s/L_t averaged over valid instead of all pixels",
      f"{T_IIDM}::test_supervised_losses_average_over_all_pixels"),
    M("iidm_ema_alpha_index", "iidm.py",
      "            common.ema_update(teacher, student, i, args.ema_alpha, buffers=args.teacher_eval_bn)",
      "            common.ema_update(teacher, student, i - 1, args.ema_alpha, buffers=args.teacher_eval_bn)",
      "EMA momentum of the previous iteration (alpha(i-1))", f"{T_IIDM}::test_teacher_is_updated_before_the_step",
      f"{T_IIDM}::test_teacher_ema_uses_the_momentum_of_its_iteration"),
    M("iidm_mu_default", "iidm.py", 'p.add_argument("--mu", type=float, default=2.0,',
      'p.add_argument("--mu", type=float, default=1.0,', "--mu default 2 -> 1",
      f"{T_IIDM}::test_defaults_are_the_papers_and_daformers"),
    M("iidm_weight_direction", "iidm.py", "common.one_mix(M, torch.ones_like(M), q.expand_as(M))",
      "common.one_mix(M, q.expand_as(M), torch.ones_like(M))", "q on the pasted GT pixels, 1 on the pseudo-labels",
      f"{T_IIDM}::test_streams_paste_ground_truth_classes_onto_the_same_unlabeled_image"),
    M("iidm_intra_mask_from_pseudo", "iidm.py", "M2 = common.class_mix_mask(y_t, g, **select)",
      "M2 = common.class_mix_mask(y_u, g, **select)", "intra mask from the pseudo-label instead of the labeled GT",
      f"{T_IIDM}::test_masks_never_come_from_pseudo_labels"),
    M("iidm_no_warmup", "iidm.py", "lambda i: common.warmup_poly_factor(i, args.iters, args.warmup_iters)",
      "lambda i: common.poly_factor(i, args.iters, 1.0)", "linear warm-up dropped",
      f"{T_IIDM}::test_learning_rate_table"),
    M("iidm_jitter_strength", "iidm.py", "strength=0.2, gate=0.2, per_image_order=True",
      "strength=0.25, gate=0.2, per_image_order=True", "DAFormer colour jitter strength 0.2 -> DACS's 0.25",
      f"{T_IIDM}::test_mixed_images_get_daformers_colour_jitter"),
    M("iidm_stream_slice", "iidm.py", "losses[name] = seg_loss(x_all[k * B:(k + 1) * B], y, w)",
      "losses[name] = seg_loss(x_all[:B], y, w)", "both streams' losses on the first stream's augmented images",
      f"{T_IIDM}::test_each_stream_loss_sees_its_own_augmented_images"),
    # ------------------------------------------------------------------ camix.py
    M("camix_mix_direction", "camix.py", "return (common.one_mix(T, x_t, x_s), common.one_mix(T, y_raw, y_s),",
      "return (common.one_mix(T, x_s, x_t), common.one_mix(T, y_raw, y_s),",
      "images pasted source onto target while labels go target onto source",
      f"{T_CAMIX}::test_mixing_pastes_target_onto_source_with_raw_labels"),
    M("camix_meta_light_absent", "camix.py", "chosen[:, LIGHT] |= chosen[:, POLE] & present[:, LIGHT]",
      "chosen[:, LIGHT] |= chosen[:, POLE]", "meta-class expansion adds an absent traffic light",
      f"{T_CAMIX}::test_meta_class_expansion_adds_present_classes_in_the_codes_directions"),
    M("camix_half_floor", "camix.py", "k = (present.sum(1) + 1) // 2", "k = present.sum(1) // 2",
      "floor(n/2) classes instead of the code's ceil(n/2)", f"{T_CAMIX}::test_half_of_the_classes_is_ceil"),
    M("camix_threshold_ksup", "camix.py", "return (beta + (1 - beta) * ramp) * k_sup",
      "return beta + (1 - beta) * ramp * k_sup", "Eq. 7 with K_sup on the second term only (as typeset)",
      T_CAMIX, "-k", "threshold_is_eq7"),
    M("camix_entropy_eps", "camix.py", "entropy = -(mean * mean.log()).sum(1, keepdim=True)",
      "entropy = -(mean * (mean + 1e-8).log()).sum(1, keepdim=True)", "entropy with an epsilon",
      f"{T_CAMIX}::test_entropy_without_epsilon_masks_zero_probabilities"),
    M("camix_phase_boundary", "camix.py", 'phase = "dacs" if i < args.warmup_iters else args.mix',
      'phase = "dacs" if i <= args.warmup_iters else args.mix', "phase B starts one iteration late",
      f"{T_CAMIX}::test_two_iterations_enter_phase_b[gta5]"),
    M("camix_ema_before_step", "camix.py", EMA_AFTER.format(CAMIX_EMA_COMMENT), EMA_BEFORE,
      "EMA update moved before the optimiser step", f"{T_CAMIX}::test_teacher_is_updated_after_the_step"),
    M("camix_prior_ignored", "camix.py", "modulated = (prob_t if prior is None else prior * prob_t).argmax(1)",
      "modulated = prob_t.argmax(1)", "contextual mask from the raw argmax (Q not applied)",
      f"{T_CAMIX}::test_contextual_mask_uses_the_prior_modulated_map"),
    M("camix_jitter_order_per_call", "camix.py",
      "x_m = common.color_jitter(x_m, norm, g, gate=0.2, per_image_order=True)",
      "x_m = common.color_jitter(x_m, norm, g, gate=0.2, per_image_order=False)",
      "one jitter op order per call instead of per image (as dacs.py)", f"{T_CAMIX}::test_phase_a_is_dacs_py_exactly"),
    M("camix_prior_norm_swapped", "camix.py",
      'total = q.sum((1, 2), keepdim=True) if norm == "class" else q.sum(0, keepdim=True)',
      'total = q.sum(0, keepdim=True) if norm == "class" else q.sum((1, 2), keepdim=True)',
      "prior normalised per pixel for 'class' and per class for 'pixel'",
      f"{T_CAMIX}::test_built_prior_counts_smooths_and_normalises"),
    # ------------------------------------------------------------------ asss.py
    M("asss_s2t_label", "asss.py", 'losses["loss_adv1"] = gan_loss(discs["D_g1"](P1), TARGET)',
      'losses["loss_adv1"] = gan_loss(discs["D_g1"](P1), SOURCE)', "s2t GA (aux level) labels the source maps 'source'",
      T_ASSS, "-k", "ga_losses"),
    M("asss_d_target_label", "asss.py", '+ args.lambda_gd * gan_loss(discs[name](saved["P_tu"][level]), TARGET))',
      '+ args.lambda_gd * gan_loss(discs[name](saved["P_tu"][level]), SOURCE))',
      "D_g trained with the unlabeled target maps labelled 'source'", T_ASSS, "-k", "ga_losses"),
    M("asss_lambda_adv_swapped", "asss.py", "lam1, lam2 = args.lambda_adv", "lam2, lam1 = args.lambda_adv",
      "aux/main GA weights swapped (0.001 on aux, 0.0002 on main)", T_ASSS, "-k",
      "ga_gradient_weights"),
    M("asss_sa_features_not_detached", "asss.py", 'saved["F_s"] = (feat.detach(), y_f)', 'saved["F_s"] = (feat, y_f)',
      "D_s's loss back-propagates into the generator", T_ASSS, "-k", "backward_touches or sa_losses_use"),
    M("asss_seg_heads_swapped", "common.py",
      "loss = ce_loss(upsample(main, size), y)\n    return loss + aux_weight * ce_loss(upsample(aux, size), y)",
      "loss = ce_loss(upsample(aux, size), y)\n    return loss + aux_weight * ce_loss(upsample(main, size), y)",
      "lambda_seg 0.1 on the main head instead of the aux head",
      f"{T_ASSS}::test_seg_loss_weights_the_aux_head_by_lambda_seg"),
    M("asss_adam_betas", "asss.py", "betas=(0.9, 0.99)", "betas=(0.9, 0.999)", "discriminator Adam betas (0.9, 0.999)",
      f"{T_ASSS}::test_optimisers_and_poly_schedule"),
    M("asss_poly_horizon", "asss.py", "args.poly_iters = round(args.iters / 0.6)", "args.poly_iters = args.iters",
      "poly horizon = stop iteration (150k) instead of 250k", f"{T_ASSS}::test_defaults_are_the_papers"),
    M("asss_softmax_before_upsample", "asss.py", "return common.upsample(logits, size).float().softmax(1)",
      "return common.upsample(logits.float().softmax(1), size)", "D_g input: softmax before the upsampling",
      T_ASSS, "-k", "ga_losses"),
    M("asss_tl_features_source_label", "asss.py",
      '+ args.lambda_sd * sa_loss(discs["D_s"], args.sa, *saved["F_tl"], TARGET))',
      '+ args.lambda_sd * sa_loss(discs["D_s"], args.sa, *saved["F_tl"], SOURCE))',
      "D_s learns labeled-target features as class k (source half)", T_ASSS, "-k", "sa_losses_use"),
    # ------------------------------------------------------------------ dldm.py
    M("dldm_kd_t_not_squared", "dldm.py", "return kl * temperature ** 2 if t2 else kl",
      "return kl * temperature if t2 else kl", "KD scaled by T instead of T^2", f"{T_DLDM}::test_kl_term_by_hand"),
    M("dldm_region_mix_direction", "dldm.py", "x_rl = mask * x_t + (1 - mask) * x_s",
      "x_rl = mask * x_s + (1 - mask) * x_t",
      "target box pasted onto the source image (labels the other way)",
      f"{T_DLDM}::test_box_pastes_source_onto_target_and_mixes_labels_identically"),
    M("dldm_box_no_sqrt", "dldm.py", "cut = math.sqrt(1.0 - u[0])", "cut = 1.0 - u[0]",
      "CutMix box sides scaled by (1 - lambda) instead of its square root", f"{T_DLDM}::test_cutmix_box_rule_by_hand",
      f"{T_DLDM}::test_cutmix_box_sides_follow_sqrt_of_one_minus_lambda_for_many_draws"),
    M("dldm_bdl_index_floor", "dldm.py", "k = min(int(np.round(n * portion)), n - 1)",
      "k = min(int(n * portion), n - 1)",
      "BDL median index floor(n/2) instead of round(n/2)", f"{T_DLDM}::test_bdl_rule_on_a_toy_map"),
    M("dldm_pseudo_upsample_first", "dldm.py", "return common.upsample(F.softmax(z.float(), 1), (h, w))",
      "return F.softmax(common.upsample(z.float(), (h, w)), 1)", "pseudo-label softmax after the upsampling (BDL: before)",
      f"{T_DLDM}::test_pseudo_labels_come_from_the_student_softmax_then_upsampled"),
    M("dldm_ensemble_no_temperature", "dldm.py",
      "return torch.stack([F.softmax(z.float() / temperature, 1) for z in logits]).mean(0)",
      "return torch.stack([F.softmax(z.float(), 1) for z in logits]).mean(0)", "teacher ensemble not softened by T",
      f"{T_DLDM}::test_ensembles_by_hand"),
    M("dldm_weight_decay_default", "dldm.py", 'default=1e-4, help="SGD weight decay',
      'default=5e-4, help="SGD weight decay', "weight decay 1e-4 (paper) -> 5e-4 (AdvEnt config)",
      f"{T_DLDM}::test_defaults_match_the_paper_and_the_authors_config"),
    M("dldm_merge_pseudo_wins", "dldm.py",
      "{s: p for s, p in self.check_pseudo(r).items() if s not in labeled}", "dict(self.check_pseudo(r))",
      "pseudo-labels replace the ground truth of labeled images in the merge",
      f"{T_DLDM}::test_merge_ground_truth_wins"),
    M("dldm_frozen_models_train_mode", "dldm.py", "return training.prepare_model(model, self.device, self.amp).eval()",
      "return training.prepare_model(model, self.device, self.amp)",
      "teachers (and the pseudo-labelling student) predict with train-mode BN",
      f"{T_DLDM}::test_frozen_models_predict_with_running_statistics"),
    M("dldm_kl_weight_dropped", "dldm.py", "run.amp.backward(a.lambda_kl * loss_kl)", "run.amp.backward(loss_kl)",
      "lambda_kl not applied to the KL term", f"{T_DLDM}::test_student_gradient_weights_kl_and_ce_by_lambda"),
    # ------------------------------------------------------------------ common.py, training.py
    M("common_bottleneck_relu", "common.py", "return self.relu(out + identity)", "return out + identity",
      "Bottleneck without the ReLU after the residual sum", T_MODEL),
    M("common_blur_sigma_range", "common.py",
      "def gaussian_blur(x, generator, gate=0.5, sigma_range=(0.15, 1.15), per_image=True):",
      "def gaussian_blur(x, generator, gate=0.5, sigma_range=(0.15, 2.15), per_image=True):",
      "blur sigma range U(0.15, 1.15) widened to 2.15", f"{T_TOOL}::test_blur_sigma_is_uniform_on_0_15_to_1_15"),
    M("common_mix_pairs_direction", "common.py", "return one_mix(mask, a, a.roll(-1, 0))",
      "return one_mix(mask, a, a.roll(1, 0))",
      "ClassMix pastes image k onto k-1 instead of k+1", f"{T_TOOL}::test_mix_operators_direction"),
    M("common_head_lr", "common.py", '{"params": head, "lr": lr * head_mult}', '{"params": head, "lr": lr}',
      "classifier without its 10x learning rate", f"{T_IIDM}::test_learning_rate_table"),
    M("common_ema_alpha_offset", "common.py", "return min(1 - 1 / (i + 1), alpha_max)",
      "return min(1 - 1 / (i + 2), alpha_max)",
      "EMA ramp alpha(i) = 1 - 1/(i+2)", f"{T_TOOL}::test_ema_alpha_and_update"),
    M("common_ema_lerp_weight", "common.py",
      "torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - a)",
      "torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), a)",
      "EMA keeps 1 - alpha of the teacher", T_DACS, "-k", "teacher_is_updated"),
    M("common_poly_power", "common.py", "def poly_factor(i, max_iter, power=0.9):",
      "def poly_factor(i, max_iter, power=1.0):",
      "poly schedule power 0.9 -> 1", f"{T_TOOL}::test_poly_lr_with_head_and_scheduler"),
    M("common_warmup_no_decay", "common.py",
      "return factor * (1 - (1 - i / warmup) * (1 - warmup_ratio)) if i < warmup else factor",
      "return (1 - (1 - i / warmup) * (1 - warmup_ratio)) if i < warmup else factor",
      "warm-up ramps to the base lr instead of the decayed value", f"{T_TOOL}::test_warmup_poly_table"),
    M("common_weighted_ce_valid_mean", "common.py", "return (ce * weight).mean()",
      "return (ce * weight).sum() / (target != ignore).sum().clamp(min=1)",
      "pixel-weighted CE averaged over valid pixels only",
      f"{T_TOOL}::test_pixel_weighted_ce_averages_over_all_pixels"),
    M("common_q_per_image_ignored", "common.py",
      "q = confident.mean((1, 2), keepdim=True) if per_image else confident.mean()", "q = confident.mean()",
      "per-image q computed over the batch", f"{T_TOOL}::test_pseudo_label_weights"),
    M("common_resume_skips_optimizer", "training.py", '        optimizer.load_state_dict(ckpt["optimizer"])\n', "",
      "resume does not restore the optimiser state (momentum)", f"{T_DACS}::test_resume_from_checkpoint_is_exact"),
    M("common_authors_resume_schedule", "training.py", "scheduler.last_epoch = start - 1",
      "scheduler.last_epoch = start",
      "authors' checkpoint resumes one poly step late", f"{T_DACS}::test_resume_from_an_authors_checkpoint"),
    M("common_iou_union", "common.py", "union = cm.sum(0) + cm.sum(1) - tp", "union = cm.sum(0) + cm.sum(1)",
      "IoU union counts the true positives twice", "tests/test_eval.py::test_confusion_and_iou_match_naive"),
    M("common_fcdisc_slope", "common.py", "self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)",
      "self.leaky_relu = nn.LeakyReLU(0.01, inplace=True)", "discriminator LeakyReLU slope 0.2 -> 0.01",
      f"{T_MODEL}::test_fc_discriminator_is_five_strided_convs_with_leaky_relu_0_2"),
    M("common_aspp_one_branch", "common.py", "branches = self.conv2d_list if self.full else self.conv2d_list[:2]",
      "branches = self.conv2d_list if self.full else self.conv2d_list[:1]", "ASPP quirk sums one branch instead of two",
      f"{T_MODEL}::test_aspp_two_branch_quirk_and_full"),
    M("common_layer4_dilation", "common.py", "self.layer4 = self._make_layer(8 * width, layers[3], dilation=4)",
      "self.layer4 = self._make_layer(8 * width, layers[3], dilation=2)", "layer4 dilation 4 -> 2",
      f"{T_MODEL}::test_stride_placement_and_dilations"),
    M("common_teacher_always_train", "common.py", "return teacher.train(train_bn)", "return teacher.train()",
      "the eval-BN teacher is left in train mode", f"{T_TOOL}::test_ema_teacher_buffers_per_bn_mode"),
    M("common_is_due_offset", "training.py", "return (every > 0 and (i + 1) % every == 0) or i + 1 == max_iter",
      "return (every > 0 and i % every == 0) or i + 1 == max_iter", "periodic checkpoints one iteration early",
      f"{T_TOOL}::test_keep_checkpoints", f"{T_TOOL}::test_is_due_after_every_nth_iteration_and_the_last"),
    # ------------------------------------------------------------------ found by the flag-level reviews
    M("dacs_intra_pixel_weight_ignored", "dacs.py", '"threshold": confident,',
      '"threshold": q * torch.ones_like(conf),',
      "--pixel-weight threshold ignored under --mix intra",
      f"{T_DACS}::test_intra_domain_mix_honours_pixel_weight"),
    M("iidm_rcs_target_counts_cached", "iidm.py", 'cache = out_dir / "rcs_counts_0.json" if stream == 0 else None',
      'cache = out_dir / f"rcs_counts_{stream}.json"', "the labeled target's RCS counts of another split reused",
      f"{T_IIDM}::test_rcs_class_counts_follow_the_split_and_the_source"),
    M("camix_mask_from_raw_argmax", "camix.py", "modulated = (prob_t if prior is None else prior * prob_t).argmax(1)",
      "modulated = prob_t.argmax(1)", "CAMix classes drawn from the raw teacher argmax, not argmax(Q . P)",
      f"{T_CAMIX}::test_training_step_feeds_each_stage_the_codes_tensors"),
    M("asss_fcsa_lambda_fixed", "asss.py", '"fcsa": 0.04 if args.n_labeled == 500 else 1.0', '"fcsa": 1.0',
      "FCSA lambda_sadv not Table 2(a)'s 0.04 at N = 500", f"{T_ASSS}::test_fcsa_lambda_follows_the_split_file"),
    M("dldm_pl_portion_inverted", "dldm.py", "    portion = 1 - keep ", "    portion = keep ",
      "--pl-portion p keeps the least confident share",
      f"{T_DLDM}::test_pl_portion_is_the_share_of_most_confident_pixels_kept"),
    M("dldm_eval_res_ignored", "dldm.py", "target_val(self.target_kind, self.target_root, size, args.eval_res,",
      'target_val(self.target_kind, self.target_root, size, "full",', "--eval-res ignored by dldm.py",
      f"{T_DLDM}::test_eval_res_is_honoured_and_a_crop_is_refused"),
    M("training_eval_only_fp32", "training.py", 'amp = Amp(device, args.amp, args.amp_dtype)', "amp = None",
      "--eval-only ignores --amp", f"{T_TOOL}::test_eval_only_evaluates_under_amp_as_training_does"),
    M("training_fp16_unscale_per_entry", "training.py", "views = [OncePerTensor(o) for o in optimizers]",
      "views = list(optimizers)", "fp16 GradScaler unscales a duplicated param-group entry once per listing",
      "tests/test_amp.py::test_fp16_step_moves_every_parameter_as_fp32_does"),
    M("training_split_file_n_ignored", "training.py", "    args.n_labeled = n\n", "",
      "--split-file does not give N (run folder, config.json)",
      f"{T_CM}::test_split_file_gives_n_and_excludes_the_seed_flags"),
]


def check(mutations, root=ROOT):
    """Raise ValueError unless every mutation's snippet occurs exactly once, changes something and the
    mutated file compiles; names must be unique."""
    problems, names = [], set()
    for m in mutations:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        path = Path(root) / m.file
        text = path.read_text() if path.is_file() else ""
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.name}: {m.file} holds the original snippet {count} times, expected once: {m.old!r}")
            continue
        if m.old == m.new:
            problems.append(f"{m.name}: the replacement equals the original")
            continue
        try:
            compile(text.replace(m.old, m.new), m.file, "exec")
        except SyntaxError as exc:
            problems.append(f"{m.name}: the mutated {m.file} does not compile ({exc})")
    if problems:
        raise ValueError("invalid mutation list:\n  " + "\n  ".join(problems))


def scratch_copy(root=ROOT):
    """A temporary copy of the working tree: tracked and untracked files that git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="mutation_"))
    for rel in filter(None, files):
        src = Path(root) / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(copy, tests, timeout):
    """(pytest exit status or 'timeout', seconds, failing test ids) of `tests` in the copy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # pytest and anything it started
        out, _ = proc.communicate()
        status = "timeout"
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return status, round(time.time() - t0, 1), failed, out


def mutate(copy, m, timeout):
    """Apply one mutation in the copy, run its tests, restore the file; the result record."""
    path = copy / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new))
    try:
        status, seconds, failed, out = run_tests(copy, list(m.tests), timeout)
    finally:
        path.write_text(original)
    if status not in (0, 1, 5, "timeout"):
        raise RuntimeError(f"{m.name}: pytest exit status {status} (a wrong test list?)\n{out[-3000:]}")
    result = {0: "missed", 1: "caught", 5: "missed", "timeout": "timeout"}[status]   # 5: no test selected
    return {"name": m.name, "file": m.file, "what": m.what, "tests": " ".join(m.tests), "result": result,
            "caught_by": failed[:1] or (["timeout"] if status == "timeout" else []), "seconds": seconds}


def git_commit(root=ROOT):
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()


def table(records):
    """Markdown table of the records plus the caught count."""
    caught = sum(r["result"] != "missed" for r in records)
    lines = [f"**{caught} of {len(records)} caught** ({100 * caught / max(len(records), 1):.0f} %)", "",
             "| mutation | file | the bug | caught by |", "|---|---|---|---|"]
    for r in records:
        by = r["caught_by"][0].replace("tests/", "") if r["caught_by"] else "**missed**"
        lines.append(f"| `{r['name']}` | {r['file']} | {r['what']} | {by.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only (merged into --json)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutation's test run")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "mutation.json"), help="results file (merged)")
    p.add_argument("--table", action="store_true", help="print the table of --json and exit")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = p.parse_args(argv)
    json_path = Path(args.json)
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {"records": []}
    order = {m.name: k for k, m in enumerate(MUTATIONS)}
    if args.table:
        print(table(saved["records"]))
        return saved
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34s} {m.file:16s} {m.what}")
        return None
    check(MUTATIONS)
    unknown = sorted(set(args.only or ()) - set(order))
    if unknown:
        p.error(f"--only: unknown mutation(s) {', '.join(unknown)}")
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    import torch
    stamp = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
             "command": " ".join(["python", "benchmarks/mutation.py", *(argv if argv is not None else sys.argv[1:])])}
    records = {r["name"]: r for r in saved["records"] if r["name"] in order}
    copy = scratch_copy()
    try:
        for k, m in enumerate(chosen, 1):
            records[m.name] = {**mutate(copy, m, args.timeout), **stamp}
            r = records[m.name]
            print(f"[{k}/{len(chosen)}] {m.name}: {r['result']} ({r['seconds']} s) {' '.join(r['caught_by'])}",
                  flush=True)
            saved = {"records": sorted(records.values(), key=lambda r: order[r["name"]])}
            json_path.write_text(json.dumps(saved, indent=1) + "\n")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print(table(saved["records"]))
    return saved


if __name__ == "__main__":
    main()
