"""DeepLabv2: official key names/shapes, output sizes, ASPP quirk, inits, parameter groups, LegacySGD."""
import pytest
import torch

import common
from conftest import write_malicious_checkpoint
from common import DataError, DeepLabV2, LegacySGD, initialise, load_init, param_groups

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_keys(num_classes=19, multi_level=False):
    """Key -> shape of the official Res_Deeplab / DeeplabMulti, written out from the authors' deeplab_multi.py / model.py."""
    keys = {"conv1.weight": (64, 3, 7, 7)}
    keys.update({f"bn1.{s}": (64,) for s in BN})
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 23), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            keys[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            for i, ch in ((1, planes), (2, planes), (3, planes * 4)):
                keys.update({p + f"bn{i}.{s}": (ch,) for s in BN})
            if b == 0:
                keys[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update({p + f"downsample.1.{s}": (planes * 4,) for s in BN})
            inplanes = planes * 4
    heads = [("layer5", 1024), ("layer6", 2048)] if multi_level else [("layer5", 2048)]
    for name, cin in heads:
        for k in range(4):
            keys[f"{name}.conv2d_list.{k}.weight"] = (num_classes, cin, 3, 3)
            keys[f"{name}.conv2d_list.{k}.bias"] = (num_classes,)
    return {k: (() if k.endswith("num_batches_tracked") else v) for k, v in keys.items()}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("multi_level", [False, True])
@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_state_dict_matches_official(multi_level, style):
    model = DeepLabV2(19, multi_level=multi_level, style=style)
    assert shapes(model) == official_keys(19, multi_level)
    # an official-format state dict (same keys, other values) loads strictly
    other = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    DeepLabV2(19, multi_level=multi_level).load_state_dict(other, strict=True)


def test_stride_placement_and_dilations():
    caffe, torchstyle = DeepLabV2(style="caffe"), DeepLabV2(style="pytorch")
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert torchstyle.layer2[0].conv1.stride == (1, 1) and torchstyle.layer2[0].conv2.stride == (2, 2)
    assert all(b.conv2.dilation == (2, 2) for b in caffe.layer3)
    assert all(b.conv2.dilation == (4, 4) for b in caffe.layer4)
    assert caffe.maxpool.ceil_mode
    assert [c.dilation[0] for c in caffe.layer5.conv2d_list] == [6, 12, 18, 24]


def test_bn_affine_frozen_and_init():
    model = DeepLabV2(layers=(1, 1, 1, 1))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.01) < 0.001
    trainable = DeepLabV2(layers=(1, 1, 1, 1), freeze_bn_affine=False)
    assert trainable.bn1.weight.requires_grad


def test_width_scales_every_stage_and_keeps_the_names():
    narrow, full = DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1), width=16), DeepLabV2(19, multi_level=True,
                                                                                            layers=(1, 1, 1, 1))
    assert list(narrow.state_dict()) == list(full.state_dict())
    assert narrow.conv1.out_channels == 16 and full.conv1.out_channels == 64
    assert [s[0].conv3.out_channels for s in (narrow.layer1, narrow.layer2, narrow.layer3, narrow.layer4)] == \
        [64, 128, 256, 512]
    assert narrow.layer5.conv2d_list[0].in_channels == 256 and narrow.layer6.conv2d_list[0].in_channels == 512
    with torch.no_grad():
        assert narrow.eval()(torch.zeros(1, 3, 64, 64))[1].shape == (1, 19, 9, 9)


@pytest.mark.parametrize("hw,out", [((512, 512), (65, 65)), ((512, 1024), (65, 129)), ((720, 1280), (91, 161))])
def test_output_size(hw, out):
    model = DeepLabV2(layers=(1, 1, 1, 1)).eval()  # output size does not depend on the block count
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *hw)).shape == (1, 19, *out)


def test_resnet101_forward_and_multi_level():
    model = DeepLabV2(7, multi_level=True).eval()
    with torch.no_grad():
        aux, main = model(torch.zeros(1, 3, 64, 64))
    assert aux.shape == main.shape == (1, 7, 9, 9)


def test_aspp_two_branch_quirk_and_full():
    torch.manual_seed(0)
    model = DeepLabV2(layers=(1, 1, 1, 1))
    x = torch.randn(2, 3, 48, 48)
    model(x).sum().backward()
    grads = [c.weight.grad for c in model.layer5.conv2d_list]
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None
    feat = torch.randn(1, 2048, 5, 5)
    head = model.layer5
    two = head.conv2d_list[0](feat) + head.conv2d_list[1](feat)
    assert torch.allclose(head(feat), two)
    head.full = True
    assert torch.allclose(head(feat), sum(c(feat) for c in head.conv2d_list), atol=1e-6)


def test_load_init_both_key_formats(tmp_path, capsys):
    src = DeepLabV2(21, layers=(1, 1, 1, 1))  # a 21-class head, like a VOC/COCO file
    state = src.state_dict()
    for prefix in ("", "Scale."):
        dst = DeepLabV2(19, layers=(1, 1, 1, 1))
        path = tmp_path / f"init{prefix or 'bare'}.pth"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        head_before = dst.layer5.conv2d_list[0].weight.clone()
        n = initialise(dst, str(path))
        assert n == len(state) - 8  # every tensor but the 8 classifier tensors of another shape
        assert capsys.readouterr().out == (f"--init {path}: {n} of {len(state)} tensors loaded (matched by name and "
                                           f"shape; the others keep their initialisation)\n")
        assert torch.equal(dst.layer1[0].conv2.weight, src.layer1[0].conv2.weight)
        assert torch.equal(dst.layer5.conv2d_list[0].weight, head_before)


def test_load_init_same_head_is_copied_and_multi_level_aux_is_not():
    src = DeepLabV2(19, layers=(1, 1, 1, 1))
    dst = DeepLabV2(19, multi_level=True, layers=(1, 1, 1, 1))
    load_init(dst, src.state_dict())
    # the 2048-in layer5 of the single-level file must not land in the 1024-in aux head
    assert not torch.equal(dst.layer5.conv2d_list[0].weight[:, :1], src.layer5.conv2d_list[0].weight[:, :1])
    assert load_init(DeepLabV2(19, layers=(1, 1, 1, 1)), src.state_dict()) == len(src.state_dict())


def test_zero_copy_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(DataError, match="no tensor matched"):
        initialise(DeepLabV2(layers=(1, 1, 1, 1)), str(path))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(DataError, match="not a readable plain weights file"):
        common.load_state_file(path)
    assert not marker.exists()


def test_param_groups_official_duplicates():
    model = DeepLabV2()
    groups = param_groups(model, 2.5e-4)
    backbone = groups[0]["params"]
    assert len(backbone) == 314 and len({id(p) for p in backbone}) == 104
    assert sum(p is model.layer1[0].downsample[0].weight for p in backbone) == 4
    assert sum(p is model.layer3[7].conv2.weight for p in backbone) == 3
    assert sum(p is model.conv1.weight for p in backbone) == 1
    assert len(groups[1]["params"]) == 8 and groups[1]["lr"] == pytest.approx(2.5e-3)
    clean = param_groups(model, 2.5e-4, official_duplicates=False)
    assert len(clean[0]["params"]) == 104
    multi = param_groups(DeepLabV2(multi_level=True), 1.0)
    assert len(multi[1]["params"]) == 16


def test_legacy_sgd_matches_hand_computation_with_duplicates():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    lr, m, wd = 0.1, 0.9, 0.01
    opt = LegacySGD([{"params": [p, p, p], "lr": lr}], lr=lr, momentum=m, weight_decay=wd)
    g = torch.tensor([0.5, 0.25])
    ref, buf = p.detach().clone(), None
    for _ in range(2):  # two optimisation steps, three sub-steps each
        p.grad = g.clone()
        opt.step()
        for _ in range(3):
            d = g + wd * ref
            buf = d.clone() if buf is None else m * buf + d
            ref = ref - lr * buf
    assert torch.allclose(p.detach(), ref)
    torch_sgd_p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    torch_sgd_p.grad = g.clone()
    with pytest.warns(UserWarning):
        torch.optim.SGD([torch_sgd_p] * 3, lr=lr, momentum=m, weight_decay=wd, foreach=False).step()
    # after one step the modern SGD differs from the 1.5 rule (why LegacySGD exists)
    q = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q.grad = g.clone()
    LegacySGD([q, q, q], lr=lr, momentum=m, weight_decay=wd).step()
    assert not torch.allclose(q.detach(), torch_sgd_p.detach())


def test_fc_discriminator_shape():
    d = common.FCDiscriminator(19)
    assert d(torch.zeros(1, 19, 64, 64)).shape == (1, 1, 2, 2)
    assert len(d.state_dict()) == 10


def test_init_convention_pairs_weights_with_stride_style_and_input():
    assert common.init_convention("imagenet") == ("pytorch", "imagenet_rgb")
    assert common.init_convention("coco") == ("caffe", "imagenet_bgr")
    assert common.init_convention("none", ("caffe", "cityscapes_bgr")) == ("caffe", "cityscapes_bgr")
    assert common.init_convention("/some/file.pth") == ("caffe", "imagenet_bgr")


def test_offline_init_download_is_a_one_line_error(tmp_path, monkeypatch):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = common.DeepLabV2(19, layers=(1, 1, 1, 1))
    for init in ("coco", "imagenet"):
        with pytest.raises(common.DataError, match=f"--init {init}: could not fetch .*no network"):
            common.initialise(model, init)
    import asss
    import dldm
    for name, url in (("adaptsegnet", asss.ADAPTSEGNET_INIT_URL), ("advent", dldm.ADVENT_INIT_URL)):
        with pytest.raises(common.DataError, match=f"--init {name}: could not fetch {url} .*no network"):
            common.download_init(name, url)
    assert not any(tmp_path.rglob("*.pth"))


def test_torchvision_resnet101_weights_fill_the_pytorch_style_backbone():
    """--init imagenet: every torchvision ResNet-101 tensor but `fc` lands in the backbone of the same name."""
    import torchvision
    tv = torchvision.models.resnet101(weights=None).state_dict()
    model = DeepLabV2(19, style="pytorch")
    assert load_init(model, tv) == len(tv) - 2                      # all but fc.weight / fc.bias
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in tv.items() if not k.startswith("fc."))
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # as torchvision


def test_pytorch_style_backbone_computes_torchvision_resnet101_layers():
    """With torchvision's weights the pytorch-style backbone gives torchvision's layer1-4 outputs (eval mode);
    for layer3/4 torchvision is built with dilation instead of stride and its first block dilated too, as
    DeepLabv2 dilates every block (65x65: ceil- and floor-mode max-pool agree)."""
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    for layer, d in ((tv.layer3, 2), (tv.layer4, 4)):
        layer[0].conv2.dilation, layer[0].conv2.padding = (d, d), (d, d)
    with torch.no_grad():
        for m in tv.modules():   # non-trivial BN statistics and affine parameters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = DeepLabV2(19, style="pytorch").eval()
    load_init(model, tv.state_dict())
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        a = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        b = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            a, b = getattr(tv, name)(a), getattr(model, name)(b)
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4), name


def per_entry_sgd_step(entries, state, lr, m, wd, nesterov, in_place=False):
    """The old PyTorch SGD loop written out entry by entry (the reference for LegacySGD's foreach waves):
    PyTorch 1.5 adds the weight decay out of place, 0.3-1.4 into p.grad (`d_p.add_(weight_decay, p.data)`)."""
    with torch.no_grad():
        for p in entries:
            d = p.grad.add_(p, alpha=wd) if in_place else p.grad.add(p, alpha=wd)
            if p not in state:
                state[p] = d.clone()
            else:
                state[p].mul_(m).add_(d)
            p.sub_(d.add(state[p], alpha=m) if nesterov else state[p], alpha=lr)


@pytest.mark.parametrize("rule", ["torch1.5", "torch0.4"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_legacy_sgd_waves_equal_the_per_entry_loop_bitwise(nesterov, rule):
    torch.manual_seed(0)
    fast, ref = DeepLabV2(width=8), DeepLabV2(width=8)
    ref.load_state_dict(fast.state_dict())
    groups = param_groups(fast, 0.01)
    ref_groups = param_groups(ref, 0.01)
    assert len(groups[0]["params"]) > len(set(groups[0]["params"]))  # duplicates present
    opt, state = LegacySGD(groups, lr=0.01, nesterov=nesterov, rule=rule), {}
    for step in range(3):
        for p, q in zip(fast.parameters(), ref.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        next(fast.parameters()).grad = None if step == 1 else next(fast.parameters()).grad  # a grad-less step
        next(ref.parameters()).grad = None if step == 1 else next(ref.parameters()).grad
        opt.step()
        for g in ref_groups:
            per_entry_sgd_step([p for p in g["params"] if p.grad is not None], state, g["lr"], 0.9, 5e-4, nesterov,
                               in_place=rule == "torch0.4")
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("k,extra", [(1, 1.0), (2, 1.5), (3, 2.0), (4, 2.5)])
def test_in_place_decay_compounds_over_duplicates_by_k_plus_1_over_2(k, extra):
    """docs/quirks.md Q4's magnitude: at steady state a tensor listed k times decays k(k+1)/2 times as fast
    under the torch0.4 rule, k times under torch1.5 (as its gradient does under both)."""
    shrink = {}
    for rule in ("torch0.4", "torch1.5"):
        p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = LegacySGD([p] * k, lr=2.5e-4, weight_decay=5e-4, rule=rule)
        for _ in range(300):
            before = p.detach().clone()
            p.grad = torch.zeros_like(p)
            opt.step()
        shrink[rule] = float(1 - p.detach() / before)
    assert shrink["torch0.4"] / shrink["torch1.5"] == pytest.approx(extra, rel=2e-3)


def test_legacy_sgd_waves_keep_each_tensors_occurrences_in_order():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    assert LegacySGD.waves([a, b, a, c, a, b]) == [[a, b, c], [a, b], [a]]


def test_fc_discriminator_is_five_strided_convs_with_leaky_relu_0_2():
    """AdaptSegNet model/discriminator.py by hand: conv 4x4/s2/p1 x4 each followed by LeakyReLU(0.2), then the
    4x4/s2/p1 classifier, no activation on the logits."""
    F = torch.nn.functional
    torch.manual_seed(0)
    d = common.FCDiscriminator(19, ndf=8)
    x = torch.randn(1, 19, 64, 64)

    def by_hand(slope):
        h = x
        for conv in (d.conv1, d.conv2, d.conv3, d.conv4):
            h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1), slope)
        return F.conv2d(h, d.classifier.weight, d.classifier.bias, stride=2, padding=1)
    with torch.no_grad():
        out = d(x)
        assert out.shape == (1, 1, 2, 2) and torch.allclose(out, by_hand(0.2), atol=1e-6)
        assert not torch.allclose(out, by_hand(0.01), atol=1e-4)
