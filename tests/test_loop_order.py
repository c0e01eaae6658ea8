"""The order of a step's passes: DACS, ClassMix and CAMix backpropagate the supervised loss right after its
forward, before the mixed forward (one graph alive at a time); the gradient equals the one backward of the
summed loss (the authors' order), rebuilt here by deferring every backward of a step to one backward of
their sum. And one autocast cast cache per step (training.cast_once): fewer casts, the same numbers."""
import contextlib

import pytest
import torch

import camix
import classmix_ssl
import common
import dacs
import training

BASE = ["--iters", "1", "--layers", "1", "1", "1", "1", "--init", "none", "--target-size", "64", "32",
        "--workers", "0", "--log-every", "1", "--device", "cpu", "--eval-every", "0", "--save-every", "0"]
CASES = {  # id: (module, flags, the logged losses that make up the summed loss)
    "dacs": (dacs, ["--source-size", "64", "32", "--crop-size", "32", "32"], ("loss_l", "loss_u")),
    "dacs-mic": (dacs, ["--source-size", "64", "32", "--crop-size", "32", "32", "--mic", "--mask-block", "8"],
                 ("loss_l", "loss_u", "loss_mic")),
    "classmix": (classmix_ssl, ["--n-labeled", "2"], ("loss_l", "loss_u")),
    "camix": (camix, ["--source-size", "64", "32", "--val-size", "64", "32", "--crop-size", "32", "32",
                      "--warmup-iters", "0", "--build-prior"], ("loss_seg", "loss_con")),
}


def run_step(case, root, out, monkeypatch, old_order=False, amp=False):
    """One step of a script: {"grads": the gradients at the optimiser step, "backwards": (student forwards
    so far, loss) per amp.backward call, "logged": the logged losses}. old_order: each amp.backward only
    collects its loss and the step backpropagates their sum once (both graphs alive: the authors' order),
    each pass casting the weights itself (no training.cast_once, as before it)."""
    module, flags, _ = CASES[case]
    rec = {"forwards": 0, "backwards": [], "pending": [], "grads": None, "logged": None}
    real_forward, real_backward, real_step = common.DeepLabV2.forward, training.Amp.backward, training.Amp.step
    real_log = training.Logger.log

    def forward(self, x):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):   # the student's
            rec["forwards"] += 1
        return real_forward(self, x)

    def backward(self, loss, retain_graph=False):
        rec["backwards"].append((rec["forwards"], float(loss.detach())))
        if old_order:
            rec["pending"].append(loss)
        else:
            real_backward(self, loss, retain_graph)

    def step(self, *optimizers):
        if rec["pending"]:
            real_backward(self, sum(rec["pending"]))
        params = dict.fromkeys(p for o in optimizers for g in o.param_groups for p in g["params"])
        rec["grads"] = [p.grad.clone() for p in params if p.grad is not None]
        real_step(self, *optimizers)

    def log(self, i, losses, lr):
        rec["logged"] = {k: float(v.detach()) for k, v in losses.items()}
        real_log(self, i, losses, lr)

    with monkeypatch.context() as m:
        m.setattr(common.DeepLabV2, "forward", forward)
        m.setattr(training.Amp, "backward", backward)
        m.setattr(training.Amp, "step", step)
        m.setattr(training.Logger, "log", log)
        if old_order:
            m.setattr(training, "cast_once", lambda amp: contextlib.nullcontext())
        module.main([*BASE, *flags, *(["--amp"] if amp else []), "--data-root", str(root), "--out-dir", str(out)])
    return rec


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("case", list(CASES))
def test_supervised_backward_comes_before_the_mixed_forward_with_the_same_gradient(case, amp, root, tmp_path,
                                                                                   monkeypatch):
    new = run_step(case, root, tmp_path / "new", monkeypatch, amp=amp)
    old = run_step(case, root, tmp_path / "old", monkeypatch, old_order=True, amp=amp)
    # the supervised loss is backpropagated after the first student forward, the rest after the last one
    assert [f for f, _ in new["backwards"]] == ([1, 2, 3] if case == "dacs-mic" else [1, 2])
    # each logged loss is backpropagated once: none dropped, none twice
    parts = CASES[case][2]
    assert sum(v for _, v in new["backwards"]) == pytest.approx(sum(new["logged"][k] for k in parts), rel=1e-6)
    assert new["logged"] == old["logged"]                       # the same step: data, mixing, teacher
    assert len(new["grads"]) == len(old["grads"]) > 0
    for a, b in zip(new["grads"], old["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in new["grads"])


def test_the_gradient_check_sees_a_dropped_or_doubled_backward(root, tmp_path, monkeypatch):
    """What the test above would catch: L_l dropped (or backpropagated twice) changes the gradient."""
    old = run_step("classmix", root, tmp_path / "old", monkeypatch, old_order=True)
    for scale in (0.0, 2.0):
        real = training.Amp.backward
        calls = []

        def backward(self, loss, retain_graph=False, scale=scale):
            calls.append(loss)
            real(self, loss * scale if len(calls) == 1 else loss, retain_graph)
        monkeypatch.setattr(training.Amp, "backward", backward)
        bad = run_step("classmix", root, tmp_path / f"bad{scale}", monkeypatch)
        monkeypatch.undo()
        assert max((a - b).abs().max() for a, b in zip(bad["grads"], old["grads"])) > 1e-4


def count_casts(case, root, out, monkeypatch, amp, one_cache=True):
    """(number of float->low-precision casts, gradients) of one step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                Casts.n += 1
            return func(*args, **kwargs)

    with monkeypatch.context() as m:
        if not one_cache:
            m.setattr(training, "cast_once", lambda amp: contextlib.nullcontext())
        with Casts():
            rec = run_step(case, root, out, m, amp=amp)
    return Casts.n, rec["grads"]


@pytest.mark.parametrize("case", ["dacs", "classmix"])
def test_one_cast_cache_per_step_casts_the_weights_once_with_the_same_numbers(case, root, tmp_path, monkeypatch):
    few, grads = count_casts(case, root, tmp_path / "one", monkeypatch, amp=True)
    many, ref = count_casts(case, root, tmp_path / "each", monkeypatch, amp=True, one_cache=False)
    student = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    trainable_weights = sum(p.requires_grad and p.dim() > 1 for p in student.parameters())   # cast per pass
    assert many - few >= trainable_weights > 0             # the second student pass reuses the first's casts
    assert all(torch.equal(a, b) for a, b in zip(grads, ref)) and len(grads) == len(ref)
    fp32 = [count_casts(case, root, tmp_path / f"fp32{k}", monkeypatch, amp=False, one_cache=k == 0)
            for k in (0, 1)]                                # autocast off: no cast, bit-identical gradients
    assert fp32[0][0] == fp32[1][0] == 0
    assert all(torch.equal(a, b) for a, b in zip(fp32[0][1], fp32[1][1]))


OTHERS = {  # script: (flags, checkpoint under the run folder); ASS: its no-grad pass on x_u shares the casts too
    "iidm": (["--source-size", "64", "32", "--crop-size", "32", "32", "--n-labeled", "2", "--rcs-min-pixels", "40"],
             "checkpoint.pth"),
    "asss": (["--source-size", "64", "32", "--n-labeled", "2"], "checkpoint.pth"),
    "dldm": (["--source-size", "64", "32", "--n-labeled", "2", "--poly-iters", "10", "--pl-bins", "4096", "--stage",
              "sl", "--round", "1"], "round1/sl/checkpoint.pth"),
}


@pytest.mark.parametrize("script", list(OTHERS))
def test_one_cast_cache_leaves_the_other_scripts_amp_steps_unchanged(script, root, tmp_path, monkeypatch):
    import importlib
    from conftest import weights_digest
    module, (flags, ckpt) = importlib.import_module(script), OTHERS[script]
    digests = []
    for one_cache in (True, False):
        out = tmp_path / str(one_cache)
        with monkeypatch.context() as m:
            if not one_cache:
                m.setattr(training, "cast_once", lambda amp: contextlib.nullcontext())
            module.main([*BASE, *flags, "--iters", "2", "--save-every", "2", "--amp", "--data-root", str(root),
                         "--out-dir", str(out)])
        digests.append(weights_digest(torch.load(out / ckpt, weights_only=True)["model"]))
    assert digests[0] == digests[1]
