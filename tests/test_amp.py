"""fp16 autocast with a GradScaler (what --amp runs on GPUs without bf16), checked on the CPU: one step gives the
update of an fp32 step for every optimiser the scripts build, duplicated param-group entries included."""
import copy

import pytest
import torch
import torch.nn.functional as F

import common
import training

CPU = torch.device("cpu")


def fp16_amp(init_scale=1024.0):
    """training.Amp with fp16 autocast and a CPU GradScaler (a moderate scale: no overflow in one step)."""
    amp = training.Amp(CPU, True, "fp16")
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return amp


def one_step(model, build_optimisers, amp, x, y, disc=None):
    """One segmentation step (plus, with `disc`, an output-space discriminator loss) under `amp`."""
    optimisers = build_optimisers(model, disc)
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    with amp.autocast():
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
        if disc is not None:
            d_out = disc(common.upsample(out, (64, 64)).softmax(1)).float()
            loss = loss + F.binary_cross_entropy_with_logits(d_out, torch.ones_like(d_out))
    amp.backward(loss)
    amp.step(*optimisers)


OPTIMISERS = {  # the optimisers the method scripts build
    "legacy_sgd_duplicates": lambda m, d: [common.deeplab_optimizer(m, 1e-2)],            # dacs/classmix/camix/dldm/asss
    "legacy_sgd_clean": lambda m, d: [common.deeplab_optimizer(m, 1e-2, official_duplicates=False)],
    "adam_demo": lambda m, d: [common.deeplab_optimizer(m, 1e-3, "adam")],
    "adam_camix_paper": lambda m, d: [torch.optim.Adam(common.param_groups(m, 1e-3, official_duplicates=False),
                                                       lr=1e-3, weight_decay=5e-5)],
    "adamw_iidm": lambda m, d: [torch.optim.AdamW(common.param_groups(m, 1e-3, 10.0, official_duplicates=False),
                                                  lr=1e-3, weight_decay=0.01)],
    "asss_sgd_and_discriminator_adam": lambda m, d: [common.deeplab_optimizer(m, 1e-2),
                                                     torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.9, 0.99))],
}


@pytest.mark.parametrize("kind", sorted(OPTIMISERS))
def test_fp16_step_moves_every_parameter_as_fp32_does(kind):
    torch.manual_seed(0)
    model = common.DeepLabV2(num_classes=5, layers=(1, 1, 1, 1), width=8)
    disc = common.FCDiscriminator(5, ndf=8) if kind.startswith("asss") else None
    x, y = torch.randn(2, 3, 33, 33), torch.randint(0, 5, (2, 5, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = {}
    for name, amp in (("fp32", training.Amp(CPU, False)), ("fp16", fp16_amp())):
        m, d = copy.deepcopy(model), copy.deepcopy(disc)
        one_step(m, OPTIMISERS[kind], amp, x, y, d)
        moved[name] = {n: p.detach() - before[n] for n, p in m.named_parameters()}
    trained = [n for n, dw in moved["fp32"].items() if dw.norm() > 0]
    assert any(n.startswith("layer1") for n in trained) and any(n.startswith("layer5") for n in trained)
    for n in trained:
        a, b = moved["fp32"][n].flatten(), moved["fp16"][n].flatten()
        ratio = float(b.norm() / a.norm())
        assert 0.9 < ratio < 1.1, f"{kind}: {n} moved {ratio:.3g} x its fp32 update"
        assert float(F.cosine_similarity(a, b, dim=0)) > 0.9, n  # Adam: sign(g) flips where g ~ 0


def test_fp16_step_is_skipped_on_inf_gradients_and_the_scale_backs_off():
    torch.manual_seed(0)
    model = common.DeepLabV2(num_classes=5, layers=(1, 1, 1, 1), width=8)
    opt = common.deeplab_optimizer(model, 1e-2)
    amp = fp16_amp()
    before = [p.detach().clone() for p in model.parameters()]
    with amp.autocast():
        loss = F.cross_entropy(model(torch.randn(2, 3, 33, 33)).float(), torch.randint(0, 5, (2, 5, 5)))
    amp.backward(loss)
    model.layer1[0].conv1.weight.grad[0, 0, 0, 0] = float("inf")
    amp.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert amp.scaler.get_scale() == 512.0
    assert not opt.state  # LegacySGD never ran: no momentum buffer was made


def test_amp_dtype_without_amp_is_refused(capsys):
    import dacs
    with pytest.raises(SystemExit) as exc:
        training.run_script(lambda: dacs.main(["--source", "demo", "--amp-dtype", "fp16"]))
    assert exc.value.code == 2
    assert "--amp-dtype fp16 has an effect with --amp only" in capsys.readouterr().err


def test_amp_dtype_picks_the_autocast_type():
    conv = torch.nn.Conv2d(3, 4, 3)
    for dtype, want in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("auto", torch.bfloat16)):
        amp = training.Amp(CPU, True, dtype)
        with amp.autocast():
            assert conv(torch.rand(1, 3, 8, 8)).dtype == want
        assert amp.scaler.is_enabled() == (dtype == "fp16")
