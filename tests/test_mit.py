"""MiT encoder, DAFormer head and segmentor, their parameter groups and weight loaders (CPU, tiny variant)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import write_malicious_checkpoint

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def mit_names(variant):
    """SegFormer's encoder names (the `mit_bX.pth` keys less `head.*`) in their registration order."""
    cfg = common.MIT_VARIANTS[variant]
    names = [f"patch_embed{i}.{m}.{p}" for i in range(1, 5) for m in ("proj", "norm") for p in ("weight", "bias")]
    for i in range(4):
        for j in range(cfg["depths"][i]):
            mods = ["norm1", "attn.q", "attn.kv", "attn.proj"]
            mods += ["attn.sr", "attn.norm"] if cfg["sr_ratios"][i] > 1 else []
            mods += ["norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            names += [f"block{i + 1}.{j}.{m}.{p}" for m in mods for p in ("weight", "bias")]
        names += [f"norm{i + 1}.weight", f"norm{i + 1}.bias"]
    return names


def daformer_head_names():
    """The authors' DAFormer head names (conv_seg first: mmseg's BaseDecodeHead registers it)."""
    names = ["conv_seg.weight", "conv_seg.bias"]
    names += [f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")]
    names += ["fuse_layer.aspp_modules.0.conv.weight"] + [f"fuse_layer.aspp_modules.0.bn.{p}" for p in BN]
    for i in (1, 2, 3):
        for part in ("depthwise_conv", "pointwise_conv"):
            names += [f"fuse_layer.aspp_modules.{i}.{part}.conv.weight"]
            names += [f"fuse_layer.aspp_modules.{i}.{part}.bn.{p}" for p in BN]
    names += ["fuse_layer.bottleneck.conv.weight"] + [f"fuse_layer.bottleneck.bn.{p}" for p in BN]
    return names


def tiny(**kw):
    torch.manual_seed(0)
    return common.DAFormer(variant="tiny", **kw)


def test_b5_state_dict_keys_are_the_authors_student_names_and_shapes():
    with torch.device("meta"):
        model = common.DAFormer(num_classes=19, variant="b5")
    state = model.state_dict()
    assert list(state) == (["backbone." + k for k in mit_names("b5")]
                           + ["decode_head." + k for k in daformer_head_names()])
    shapes = {"backbone.patch_embed1.proj.weight": (64, 3, 7, 7), "backbone.patch_embed4.proj.weight": (512, 320, 3, 3),
              "backbone.block1.0.attn.q.weight": (64, 64), "backbone.block1.0.attn.kv.weight": (128, 64),
              "backbone.block1.2.attn.sr.weight": (64, 64, 8, 8), "backbone.block3.39.attn.sr.weight": (320, 320, 2, 2),
              "backbone.block2.5.mlp.dwconv.dwconv.weight": (512, 1, 3, 3),
              "backbone.block4.2.mlp.fc2.weight": (512, 2048),
              "decode_head.embed_layers.3.proj.weight": (256, 512),
              "decode_head.fuse_layer.aspp_modules.0.conv.weight": (256, 1024, 1, 1),
              "decode_head.fuse_layer.aspp_modules.3.depthwise_conv.conv.weight": (1024, 1, 3, 3),
              "decode_head.fuse_layer.aspp_modules.3.pointwise_conv.conv.weight": (256, 1024, 1, 1),
              "decode_head.fuse_layer.bottleneck.conv.weight": (256, 1024, 3, 3),
              "decode_head.conv_seg.weight": (19, 256, 1, 1)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    dilations = [model.decode_head.fuse_layer.aspp_modules[i].depthwise_conv.conv.dilation for i in (1, 2, 3)]
    assert dilations == [(6, 6), (12, 12), (18, 18)]
    rates = [b.drop_path.p for i in range(1, 5) for b in getattr(model.backbone, f"block{i}")]
    assert len(rates) == 52 and rates[0] == 0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * k / 51 for k in range(52)])


def test_every_variant_matches_segformer_names_and_eps():
    for variant in common.MIT_VARIANTS:
        with torch.device("meta"):
            encoder = common.MixVisionTransformer(variant)
        assert list(encoder.state_dict()) == mit_names(variant), variant
    encoder = tiny().backbone
    assert encoder.patch_embed1.norm.eps == 1e-5 and encoder.block2[0].attn.norm.eps == 1e-5
    assert encoder.block1[0].norm1.eps == 1e-6 and encoder.block1[0].norm2.eps == 1e-6 and encoder.norm4.eps == 1e-6
    assert encoder.block1[0].mlp.act.approximate == "none"
    assert [encoder.block1[0].attn.num_heads, encoder.block2[0].attn.num_heads] == [1, 2]
    assert not hasattr(encoder.block4[0].attn, "sr")


def test_hrda_attention_fusion_is_one_1x1_conv_module():
    head = common.DAFormerHead((16, 32, 64, 128), num_classes=19, fusion="conv1x1")
    fuse = [k for k in head.state_dict() if k.startswith("fuse_layer.")]
    assert fuse == ["fuse_layer.conv.weight"] + [f"fuse_layer.bn.{p}" for p in BN]
    assert head.fuse_layer.conv.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="fusion"):
        common.DAFormerHead(fusion="mlp")


@pytest.mark.parametrize("size", [(64, 64), (67, 93), (33, 31)])
def test_stage_shapes_strides_and_stride4_logits(size):
    model = tiny().eval()
    h, w = size
    expect = []
    for k, s in common.MIT_PATCH_EMBEDS:  # floor((H + 2p - k) / s) + 1, p = k // 2
        h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        expect.append((h, w))
    with torch.no_grad():
        feats, logits = model.forward_features(torch.randn(2, 3, *size))
        plain = model(torch.randn(2, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(2, c, *hw) for c, hw in zip((16, 32, 64, 128), expect)]
    assert tuple(logits.shape) == (2, 19, *expect[0]) == tuple(plain.shape)


def test_b5_gives_128_64_32_16_maps_for_512():
    with torch.device("meta"):
        model = common.DAFormer(variant="b5")
        feats, logits = model.forward_features(torch.empty(1, 3, 512, 512))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 128, 128), (1, 128, 64, 64), (1, 320, 32, 32), (1, 512, 16, 16)]
    assert tuple(logits.shape) == (1, 19, 128, 128)


@pytest.mark.parametrize("sr,heads", [(4, 2), (1, 4)])
def test_efficient_attention_equals_explicit_softmax_with_spatial_reduction(sr, heads):
    torch.manual_seed(0)
    attn = common.EfficientSelfAttention(32, heads, sr).double()
    h, w, c, d = 8, 12, 32, 32 // heads
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    kv_in = x
    if sr > 1:
        reduced = F.conv2d(x.transpose(1, 2).reshape(2, c, h, w), attn.sr.weight, attn.sr.bias, stride=sr)
        kv_in = F.layer_norm(reduced.flatten(2).transpose(1, 2), (c,), attn.norm.weight, attn.norm.bias, 1e-5)
        assert kv_in.shape[1] == (h // sr) * (w // sr)
    q = (x @ attn.q.weight.T + attn.q.bias).reshape(2, -1, heads, d).transpose(1, 2)
    kv = kv_in @ attn.kv.weight.T + attn.kv.bias
    k = kv[..., :c].reshape(2, -1, heads, d).transpose(1, 2)
    v = kv[..., c:].reshape(2, -1, heads, d).transpose(1, 2)
    out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
    expected = out.transpose(1, 2).reshape(2, h * w, c) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-10, atol=1e-10)


def test_block_is_prenorm_residual_with_mix_ffn():
    torch.manual_seed(0)
    block = common.MiTBlock(16, 2, 2, drop_path=0.0).double().eval()
    h, w = 6, 4
    x = torch.randn(3, h * w, 16, dtype=torch.float64)

    def ln(t, m):
        return F.layer_norm(t, (16,), m.weight, m.bias, 1e-6)

    y = x + block.attn(ln(x, block.norm1), h, w)
    mlp = block.mlp
    hidden = mlp.fc1(ln(y, block.norm2))
    hidden = F.conv2d(hidden.transpose(1, 2).reshape(3, 64, h, w), mlp.dwconv.dwconv.weight, mlp.dwconv.dwconv.bias,
                      padding=1, groups=64).flatten(2).transpose(1, 2)
    expected = y + mlp.fc2(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))))
    torch.testing.assert_close(block(x, h, w), expected, rtol=1e-10, atol=1e-10)


def test_drop_path_is_per_sample_with_rescale_and_off_in_eval():
    drop = common.DropPath(0.25)
    x = torch.ones(4000, 3, 2)
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one draw per sample
    values = per_sample[:, 0].unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.75)
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(drop.eval()(x), x)


def test_teacher_copy_has_no_drop_path_or_dropout_but_train_mode_bn():
    student = tiny(drop_path_rate=0.5)
    teacher = tiny(drop_path_rate=0.5, stochastic=False)
    teacher.load_state_dict(student.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(student.train()(x), student(x))  # DropPath and Dropout2d draw
        t1, t2 = teacher.train()(x), teacher(x)
        assert torch.equal(t1, t2)
        student.eval()
        assert torch.equal(student(x), student(x))
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns) and int(bns[0].num_batches_tracked) == 2
    assert not any(m.training for m in teacher.modules() if isinstance(m, (common.DropPath, nn.Dropout2d)))
    assert student.set_stochastic(False).train() is student
    with torch.no_grad():
        assert torch.equal(student(x), student(x))
    student.set_stochastic(True)
    assert student.training and student.decode_head.dropout.training


def test_param_groups_follow_mmcv_custom_keys():
    model = tiny()
    groups = common.daformer_param_groups(model, 6e-5)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [sorted(by_id[id(p)] for p in g["params"]) for g in groups]
    ln_params = sorted(f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                       for pn, _ in m.named_parameters())
    assert names[0] == sorted(n for n in by_id.values() if n.startswith("decode_head."))
    assert names[1] == ln_params and all(n.startswith("backbone.") for n in ln_params)
    assert "backbone.block2.0.attn.norm.weight" in names[1] and "backbone.patch_embed1.norm.bias" in names[1]
    assert sum(map(len, names)) == len(by_id)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(pytest.approx(6e-4), 0.01), (6e-5, 0.0), (6e-5, 0.01)]
    assert "decode_head.fuse_layer.bottleneck.bn.weight" in names[0]  # head wins over everything, BN included
    toy = nn.ModuleDict({"decode_head": nn.ModuleDict({"norm": nn.LayerNorm(2)}), "norm": nn.LayerNorm(2)})
    toy_groups = common.daformer_param_groups(toy, 1.0, head_mult=3.0)
    assert [len(g["params"]) for g in toy_groups] == [2, 2, 0]  # 'head' is matched first in 'decode_head.norm'
    opt = torch.optim.AdamW(groups, lr=6e-5)
    assert len(opt.param_groups) == 3


def encoder_file(tmp_path, name="mit.pth", wrap=None, drop=None, extra=None, narrow=None):
    torch.manual_seed(1)
    state = dict(common.MixVisionTransformer("tiny").state_dict())
    state.update({"head.weight": torch.randn(1000, 128), "head.bias": torch.randn(1000)})
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(1)
    if narrow:
        state[narrow] = state[narrow][:8]
    path = tmp_path / name
    torch.save({wrap: state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_mit_imagenet_file_fills_every_encoder_tensor(tmp_path, wrap):
    path, state = encoder_file(tmp_path, wrap=wrap)
    encoder = common.MixVisionTransformer("tiny")
    common.load_mit_imagenet(encoder, path)
    own = encoder.state_dict()
    assert sorted(own) == sorted(k for k in state if not k.startswith("head."))
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_mit_imagenet_file_with_a_missing_or_foreign_tensor_is_refused(tmp_path):
    path, _ = encoder_file(tmp_path, drop="block2.1.attn.sr.weight")
    with pytest.raises(common.DataError, match=r"mit\.pth: .*missing 1 .*block2\.1\.attn\.sr\.weight"):
        common.load_mit_imagenet(common.MixVisionTransformer("tiny"), path)
    path, _ = encoder_file(tmp_path, name="extra.pth", extra="backbone.norm1.weight")
    with pytest.raises(common.DataError, match=r"unexpected 1 .*backbone\.norm1\.weight"):
        common.load_mit_imagenet(common.MixVisionTransformer("tiny"), path)
    path, _ = encoder_file(tmp_path, name="narrow.pth", narrow="patch_embed1.proj.weight")
    with pytest.raises(common.DataError, match=r"patch_embed1\.proj\.weight has shape \(8, 3, 7, 7\), expected \(16"):
        common.load_mit_imagenet(common.MixVisionTransformer("tiny"), path)
    path, _ = encoder_file(tmp_path, name="tiny.pth")
    with pytest.raises(common.DataError, match=r"tiny\.pth: not a SegFormer ImageNet MiT file .*missing 36"):
        common.load_mit_imagenet(common.MixVisionTransformer("b0"), path)
    marker = tmp_path / "pwned"
    bad = write_malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(common.DataError, match="evil.pth"):
        common.load_mit_imagenet(common.MixVisionTransformer("tiny"), bad)
    assert not marker.exists()


def authors_archive(tmp_path, meta_extra=None):
    """An mmcv checkpoint as DAFormer saves it: the UDA module's student, EMA teacher and ImageNet copy."""
    student, teacher, imnet = tiny(), tiny(), tiny()
    opt = torch.optim.AdamW(student.parameters(), lr=6e-5)
    student(torch.randn(2, 3, 32, 32)).mean().backward()
    opt.step()
    for i, m in enumerate((student, teacher, imnet)):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(i + 1)
    state = {}
    for prefix, m in (("model.", student), ("ema_model.", teacher), ("imnet_model.", imnet)):
        state.update({prefix + k: v for k, v in m.state_dict().items()})
    meta = {"mmcv_version": "1.3.7", "time": "Sat Jan  1 00:00:00 2022", "config": "model = dict()",
            "CLASSES": tuple(common.CLASS_NAMES), "PALETTE": common.PALETTE.tolist(), "iter": 40000, "epoch": 1,
            "hook_msgs": {"last_ckpt": "work_dirs/x/iter_40000.pth"}, **(meta_extra or {})}
    path = tmp_path / "latest.pth"
    torch.save({"meta": meta, "state_dict": state, "optimizer": opt.state_dict()}, path)
    return path, student


def test_authors_archive_gives_the_student_for_strict_loading(tmp_path):
    path, student = authors_archive(tmp_path)
    state = common.load_authors_segmentor(path)
    fresh = tiny()
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), student.state_dict().values()))
    assert all(torch.all(p == 1) for p in fresh.parameters())  # the student, not ema_x / imnet_x
    other = tiny()
    common.load_authors_segmentor(path, model=other)
    assert all(torch.all(p == 1) for p in other.parameters())
    plain = tmp_path / "student.pth"
    torch.save(student.state_dict(), plain)
    assert list(common.load_authors_segmentor(plain)) == list(student.state_dict())


def test_authors_archive_errors(tmp_path):
    path, _ = authors_archive(tmp_path)
    with pytest.raises(common.DataError, match=r"latest\.pth: .*missing 36 .*backbone\.block1\.1\."):
        common.load_authors_segmentor(path, model=common.DAFormer(variant="b0"))
    with pytest.raises(common.DataError, match=r"conv_seg\.weight has shape \(19, 256, 1, 1\), expected \(7, 256"):
        common.load_authors_segmentor(path, model=common.DAFormer(variant="tiny", num_classes=7))
    only_ema = tmp_path / "ema.pth"
    torch.save({"state_dict": {"ema_model.backbone.norm1.weight": torch.ones(2)}}, only_ema)
    with pytest.raises(common.DataError, match=r"ema\.pth: not a DAFormer/HRDA checkpoint .*'ema_model\."):
        common.load_authors_segmentor(only_ema)
    odd = tmp_path / "odd.pth"
    torch.save({0: torch.ones(1)}, odd)
    with pytest.raises(common.DataError, match=r"odd\.pth: not a DAFormer/HRDA checkpoint .*found '0'"):
        common.load_authors_segmentor(odd)
    with pytest.raises(common.DataError, match=r"odd\.pth: not a SegFormer ImageNet MiT .*unexpected 1 \(first \[0\]"):
        common.load_mit_imagenet(common.MixVisionTransformer("tiny"), odd)
    project = tmp_path / "checkpoint.pth"
    torch.save({"model": tiny().state_dict(), "iteration": 3}, project)
    with pytest.raises(common.DataError, match="checkpoint.pth: not a DAFormer/HRDA checkpoint"):
        common.load_authors_segmentor(project)
    import numpy as np
    path, _ = authors_archive(tmp_path, meta_extra={"best_score": np.float64(0.68)})
    with pytest.raises(common.DataError,
                       match=r"latest\.pth: not a readable .*Weights only.*mmcv checkpoint .*meta. holds built-in"):
        common.load_authors_segmentor(path)
    with pytest.raises(common.DataError, match="file not found"):
        common.load_authors_segmentor(tmp_path / "nope.pth")


def test_init_follows_segformer_and_mmcv():
    torch.manual_seed(0)
    model = common.DAFormer(variant="tiny")
    enc, head = model.backbone, model.decode_head
    assert torch.all(enc.norm1.weight == 1) and torch.all(enc.block1[0].attn.q.bias == 0)
    assert enc.block3[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    dw = enc.block2[0].mlp.dwconv.dwconv.weight  # fan_out = 3*3*128/128 groups = 9
    assert dw.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    assert enc.patch_embed1.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (49 * 16)), rel=0.1)
    assert torch.all(enc.patch_embed1.proj.bias == 0)
    sep = head.fuse_layer.aspp_modules[1].depthwise_conv.conv.weight  # kaiming fan_out = 1024 * 9 (no group divide)
    assert sep.std().item() == pytest.approx(math.sqrt(2 / (1024 * 9)), rel=0.1)
    assert head.fuse_layer.bottleneck.conv.bias is None and torch.all(head.fuse_layer.bottleneck.bn.weight == 1)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.15) and torch.all(head.conv_seg.bias == 0)
    embed = head.embed_layers[3].proj.weight  # PyTorch's default: U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert embed.abs().max() <= 1 / math.sqrt(128) and embed.std().item() == pytest.approx(1 / math.sqrt(384), rel=0.05)


def test_stage_maps_end_with_a_layer_norm():
    model = tiny().eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 40, 56))
    for f in feats:  # norm{i} (weight 1, bias 0 at init) is the last op: per-position mean 0, variance 1
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.var(1, unbiased=False), torch.ones_like(f[:, 0]), atol=1e-3, rtol=0)


def test_head_is_embed_resize_concat_sep_aspp_dropout_conv_seg():
    torch.manual_seed(0)
    head = common.DAFormerHead((4, 6, 8, 10), num_classes=3, embed_dim=4, channels=5).double().eval()
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    feats = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip((4, 6, 8, 10),
                                                                              ((20, 22), (10, 11), (5, 6), (3, 3)))]

    def conv_bn_relu(x, mod, **kw):
        bn = mod.bn
        return F.relu(F.batch_norm(F.conv2d(x, mod.conv.weight, **kw), bn.running_mean, bn.running_var, bn.weight,
                                   bn.bias, eps=1e-5))

    maps = []
    for f, embed in zip(feats, head.embed_layers):
        e = torch.einsum("bchw,oc->bohw", f, embed.proj.weight) + embed.proj.bias[:, None, None]
        maps.append(F.interpolate(e, size=(20, 22), mode="bilinear", align_corners=False))
    x = torch.cat(maps, 1)
    aspp = head.fuse_layer.aspp_modules
    branches = [conv_bn_relu(x, aspp[0])]
    for i, d in zip((1, 2, 3), (6, 12, 18)):
        dw = conv_bn_relu(x, aspp[i].depthwise_conv, padding=d, dilation=d, groups=16)
        branches.append(conv_bn_relu(dw, aspp[i].pointwise_conv))
    fused = conv_bn_relu(torch.cat(branches, 1), head.fuse_layer.bottleneck, padding=1)
    expected = F.conv2d(fused, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(head(feats), expected, rtol=1e-10, atol=1e-10)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1


def test_every_parameter_gets_a_gradient_and_fd_needs_no_second_pass():
    model = tiny(stochastic=False)  # no DropPath draw may zero a block's gradient
    feats, logits = model.forward_features(torch.randn(2, 3, 64, 64))
    (common.ce_loss(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False),
                    torch.randint(0, 19, (2, 64, 64))) + feats[-1].norm(dim=1).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert tuple(feats[-1].shape) == (2, 128, 2, 2)
