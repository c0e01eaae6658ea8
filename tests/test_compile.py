"""--compile (training.compile_networks): a compiled step equals the eager one within tolerance (the real inductor
backend for dacs.py, aot_eager for every script and stack), every network a step runs is compiled, checkpoints and
exact resume are the same with and without --compile, and the flags that would change nothing are refused."""
import argparse
import json

import pytest
import torch
import torch.nn as nn

import asss
import camix
import classmix_ssl
import common
import dacs
import dldm
import iidm
import training
from conftest import make_blocky, same_state

DEEPLAB = ["--iters", "2", "--layers", "1", "1", "1", "1", "--init", "none", "--source-size", "64", "32",
           "--target-size", "64", "32", "--lr", "0.01", "--workers", "0", "--log-every", "1", "--device", "cpu"]
MIT = ["--iters", "2", "--mit", "tiny", "--init", "none", "--source-size", "128", "64", "--target-size", "128", "64",
       "--crop-size", "64", "64", "--rcs-min-pixels", "40", "--tau", "0.01", "--warmup-iters", "0", "--lr", "1e-3",
       "--workers", "0", "--log-every", "1", "--device", "cpu"]
AOT = ["--compile", "--compile-backend", "aot_eager"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA5 and Cityscapes trees of 64x128 images with pure thing-class cells (the MiT stacks' feature distance)."""
    return make_blocky(tmp_path_factory.mktemp("blocky"))


@pytest.fixture
def compiled(monkeypatch):
    """The class names of the modules nn.Module.compile is called on, in order."""
    names, original = [], nn.Module.compile

    def spy(self, *args, **kwargs):
        names.append(type(self).__name__)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(nn.Module, "compile", spy)
    return names


def train(module, out, *flags, run_dir="."):
    """(checkpoint, logged losses per iteration) of one run of a script (its files in <out>/<run_dir>)."""
    module.main([*map(str, flags), "--out-dir", str(out)])
    log = [json.loads(line) for line in (out / run_dir / "log.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k.startswith("loss")} for r in log]
    return torch.load(out / run_dir / "checkpoint.pth", weights_only=True), losses


def assert_same_run(a, b, rtol, atol, mean_only=False):
    """Equal logged losses and weights (student, teacher) within tolerance, the same tensor names. `mean_only`: each
    tensor's mean absolute difference within atol (AdamW: see CASES)."""
    (ckpt_a, losses_a), (ckpt_b, losses_b) = a, b
    assert [list(r) for r in losses_a] == [list(r) for r in losses_b]
    for ra, rb in zip(losses_a, losses_b):
        assert [ra[k] for k in ra] == pytest.approx([rb[k] for k in ra], rel=rtol, abs=atol)
    for key in ("model", "ema_model"):
        assert list(ckpt_a.get(key, {})) == list(ckpt_b.get(key, {}))
        for name, tensor in ckpt_a.get(key, {}).items():
            if mean_only and tensor.is_floating_point():
                assert (tensor - ckpt_b[key][name]).abs().mean() <= atol, f"{key}.{name}"
            else:
                torch.testing.assert_close(tensor, ckpt_b[key][name], rtol=rtol, atol=atol,
                                           msg=lambda m, where=f"{key}.{name}": f"{where}: {m}")


def test_inductor_step_equals_the_eager_step(root, tmp_path, monkeypatch, compiled):
    """The real backend (C++ kernels built with the machine's compiler): one source-only DACS step of the tiny
    DeepLabv2 (its forward and backward graphs). One step: from the second on, a max-pool tie broken the other way
    by float rounding sends conv1's gradient to another pixel (eager vs compiled differ there by ~1e-4)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))   # a cold compile
    flags = [*DEEPLAB, "--iters", "1", "--crop-size", "32", "32", "--source-only", "--data-root", root]
    eager = train(dacs, tmp_path / "eager", *flags)
    assert compiled == []
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    fast = train(dacs, tmp_path / "inductor", *flags, "--compile")
    assert compiled == ["DeepLabV2"] and torch._dynamo.utils.counters["frames"]["ok"] > frames
    assert_same_run(eager, fast, rtol=1e-4, atol=1e-5)
    assert not any(k.startswith("_orig_mod") for k in fast[0]["model"])


# SGD at lr 0.01 moves a weight by 0.01 x its gradient: a wrong gradient shows beyond 1e-6. AdamW's first steps
# move every weight by about its lr (1e-3, head 1e-2) whatever the gradient's size, so a gradient of ~1e-8 moves
# by the lr times its float noise: the MiT stacks compare each tensor's mean difference, within 1e-5 (a wrong
# gradient: ~1e-3).
CASES = {   # script, flags, the networks compiled (student, teacher, discriminators, ImageNet encoder)
    "classmix_ssl": (classmix_ssl, [*DEEPLAB, "--n-labeled", "2", "--tau", "0.01"], ["DeepLabV2"] * 2),
    "camix": (camix, [*DEEPLAB, "--warmup-iters", "1", "--val-size", "64", "32", "--crop-size", "32", "32",
                      "--build-prior"],
              ["DeepLabV2"] * 2),
    "asss": (asss, [*DEEPLAB, "--n-labeled", "2", "--preset", "ga-csa"],
             ["Segmenter", "FCDiscriminator", "FCDiscriminator", "Sequential"]),
    "dacs_daformer": (dacs, [*MIT, "--stack", "daformer"],
                      ["MixVisionTransformer", "DAFormerHead"] * 2 + ["MixVisionTransformer"]),
    "iidm_hrda": (iidm, [*MIT, "--stack", "hrda", "--n-labeled", "2"],
                  ["MixVisionTransformer", "HRDAHead"] * 2 + ["MixVisionTransformer"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_the_eager_step(root, tmp_path, compiled, case):
    module, flags, networks = CASES[case]
    eager = train(module, tmp_path / "eager", *flags, "--data-root", root)
    fast = train(module, tmp_path / "compiled", *flags, "--data-root", root, *AOT)
    assert compiled == networks
    mit = "--mit" in flags
    assert_same_run(eager, fast, rtol=1e-5, atol=1e-5 if mit else 1e-6, mean_only=mit)


def test_dldm_student_stage_compiles_its_teachers(root, tmp_path, compiled):
    flags = [*DEEPLAB, "--n-labeled", "2", "--poly-iters", "10", "--pl-bins", "4096", "--data-root", root]
    dldm.main([*map(str, flags), "--out-dir", str(tmp_path / "t"), "--stage", "rl"])
    teacher = tmp_path / "t" / "round1" / "rl" / "checkpoint.pth"
    student = ["--stage", "student", "--teachers", teacher, teacher]
    eager = train(dldm, tmp_path / "eager", *flags, *student, run_dir="round1/student")
    fast = train(dldm, tmp_path / "compiled", *flags, *student, *AOT, run_dir="round1/student")
    assert compiled == ["DeepLabV2"] * 3
    assert_same_run(eager, fast, rtol=1e-5, atol=1e-6)


def test_resume_across_compile_is_exact(root, tmp_path, compiled):
    """A run saved with --compile continues without it and vice versa: the same weights as one uninterrupted run;
    the checkpoints hold the networks' own tensor names (in-place compile: no `_orig_mod.`)."""
    flags = [*DEEPLAB, "--iters", "3", "--crop-size", "32", "32", "--tau", "0.01", "--data-root", root]
    keep = ["--save-every", "1", "--keep-checkpoints"]
    eager = train(dacs, tmp_path / "eager", *flags, *keep)
    fast = train(dacs, tmp_path / "compiled", *flags, *keep, *AOT)
    assert compiled == ["DeepLabV2"] * 2
    assert list(fast[0]["model"]) == list(common.DeepLabV2(19, layers=(1, 1, 1, 1)).state_dict())
    assert_same_run(eager, fast, rtol=1e-5, atol=1e-6)
    to_eager = train(dacs, tmp_path / "to_eager", *flags, "--resume", tmp_path / "compiled" / "checkpoint_2.pth")
    to_compiled = train(dacs, tmp_path / "to_compiled", *flags, *AOT,
                        "--resume", tmp_path / "eager" / "checkpoint_2.pth")
    for resumed, whole in ((to_eager, fast), (to_compiled, eager)):
        for key in ("model", "ema_model"):
            assert same_state(resumed[0][key], whole[0][key])


def test_evaluation_runs_eagerly_and_training_forwards_compiled(root):
    """common.evaluate runs a compiled network eagerly (no compile for eval mode); a training forward compiles."""
    torch._dynamo.reset()   # no graph of an earlier test's network to reuse
    model = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    training.compile_networks(argparse.Namespace(compile=True, compile_mode="default", compile_backend="aot_eager"),
                              model)
    val = training.target_val("cityscapes", root / "cityscapes", (64, 32), "half", "imagenet_bgr")
    frames = torch._dynamo.utils.counters["frames"]["total"]
    common.evaluate(model, val, torch.device("cpu"))
    assert torch._dynamo.utils.counters["frames"]["total"] == frames
    model.train()(torch.randn(2, 3, 32, 32))
    assert torch._dynamo.utils.counters["frames"]["total"] > frames


@pytest.mark.parametrize("flags, words", [
    (["--compile-mode", "max-autotune"], "--compile-mode max-autotune has an effect with --compile only"),
    (["--compile-backend", "aot_eager"], "--compile-backend aot_eager has an effect with --compile only"),
    (["--compile", "--compile-mode", "reduce-overhead", "--compile-backend", "aot_eager"], "is an inductor mode")])
def test_compile_flags_without_effect_are_refused(flags, words):
    with pytest.raises(common.DataError, match=words):
        dacs.parse_args(["--source", "gta5", *flags])
