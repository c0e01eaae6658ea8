"""HRDA multi-resolution training and inference, pseudo-label margins v2 and MIC masking (CPU, tiny MiT)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import make_cityscapes
from test_mit import BN, daformer_head_names, mit_names


def tiny_hrda(num_classes=5, detail_crop=(32, 32), **kw):
    torch.manual_seed(0)
    return common.HRDA(num_classes, variant="tiny", head_channels=32, detail_crop=detail_crop, **kw)


def one_hot_logits(label, num_classes, scale=100.0):
    """Logits whose argmax is `label` with ~0 cross-entropy (ignored pixels get class 0)."""
    return scale * F.one_hot(label.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------- crop geometry

def test_detail_window_offsets_are_multiples_of_8_inside_the_crop():
    g = torch.Generator().manual_seed(0)
    boxes = {common.hr_crop_box((1024, 1024), (512, 512), g) for _ in range(3000)}
    y0s, x0s = {b[0] for b in boxes}, {b[2] for b in boxes}
    assert y0s == x0s == set(range(0, 505, 8))                       # randint(0, 513 // 8) * 8: 0 ... 504
    assert all(b[1] - b[0] == 512 and b[3] - b[2] == 512 for b in boxes)
    y0, y1, x0, x1 = common.hr_crop_box((64, 96), (32, 40), g)      # non-square: rows and columns apart
    assert (y1 - y0, x1 - x0) == (32, 40) and y1 <= 64 and x1 <= 96 and y0 % 8 == x0 % 8 == 0
    assert common.hr_crop_box((36, 36), (32, 32), g) == (0, 32, 0, 32)  # margin 4 < 7: the only position
    with pytest.raises(ValueError, match="does not fit"):
        common.hr_crop_box((32, 32), (40, 16), g)


def test_training_forward_sees_the_half_scale_context_and_the_full_resolution_window():
    model = tiny_hrda()
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(2, 3, 64, 96)
    box = (8, 40, 48, 80)
    out = model(x, box)
    context, detail = seen
    assert torch.equal(context, F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False))
    assert torch.equal(detail, x[:, :, 8:40, 48:80])
    assert tuple(out.fused.shape) == (2, 5, 16, 24) and tuple(out.detail.shape) == (2, 5, 8, 8)
    assert out.box == box and [tuple(f.shape[2:]) for f in out.features] == [(8, 12), (4, 6), (2, 3), (1, 2)]


def test_hrda_loss_aligns_fused_and_detail_logits_with_the_label_and_weights_0_9_0_1():
    torch.manual_seed(0)
    label = torch.randint(0, 5, (2, 64, 96))
    label[:, :4] = common.IGNORE
    box = (8, 40, 16, 80)                                            # non-square: a y/x swap would misalign
    perfect_fused, perfect_detail = one_hot_logits(label, 5), one_hot_logits(common.crop_box(label, box), 5)
    flat_fused, flat_detail = torch.zeros(2, 5, 16, 24), torch.zeros(2, 5, 8, 16)
    valid = (label != common.IGNORE).float().mean().item()
    valid_box = (common.crop_box(label, box) != common.IGNORE).float().mean().item()
    loss = lambda fused, detail, **kw: common.hrda_loss(common.HRDAOutput(fused, detail, box, []), label, **kw)  # noqa
    assert loss(perfect_fused, perfect_detail).item() < 1e-6
    # mmseg averaging: ignored pixels count in the mean with a zero loss
    assert loss(flat_fused, perfect_detail).item() == pytest.approx(0.9 * math.log(5) * valid, rel=1e-5)
    assert loss(perfect_fused, flat_detail).item() == pytest.approx(0.1 * math.log(5) * valid_box, rel=1e-5)
    assert loss(perfect_fused, flat_detail, hr_weight=0.0).item() < 1e-6
    # the pixel weight is cropped with the label; fused_scale (MIC's mask_lambda) scales the fused term only
    weight = torch.ones(2, 64, 96)
    weight[:, 8:40, 16:80] = 0
    assert loss(perfect_fused, flat_detail, weight=weight).item() < 1e-6
    both = loss(flat_fused, flat_detail, fused_scale=2.0).item()
    assert both == pytest.approx(2 * 0.9 * math.log(5) * valid + 0.1 * math.log(5) * valid_box, rel=1e-5)


# ---------------------------------------------------------------- scale attention and fusion

class Pick(nn.Module):
    """A stand-in head returning one of its input maps, so the fusion sees chosen logits."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def forward(self, feats):
        return feats[self.level]


def toy_head():
    head = common.HRDAHead((4, 4), 3, channels=8, attention_channels=8)
    head.head, head.scale_attention = Pick(0), Pick(1)
    return head


def test_fusion_is_att_times_detail_plus_one_minus_att_times_context_with_the_window_mask():
    torch.manual_seed(0)
    lr, a, hr = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    box = (16, 48, 8, 40)                                            # input pixels: context cells 2..6, 1..5
    fused, detail = toy_head()([lr, a], [hr, None], box=box)
    att = torch.sigmoid(a) * F.pad(torch.ones(1, 1, 4, 4), (1, 3, 2, 2))  # zero outside box / 8
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    pasted = torch.zeros(2, 3, 16, 16)
    pasted[..., 4:12, 2:10] = hr                                     # at box / 4
    assert torch.equal(detail, hr)
    torch.testing.assert_close(fused, up(att) * pasted + up((1 - att) * lr))
    # saturated attention: the detail logits inside the window, the upsampled context far outside it
    fused, _ = toy_head()([lr, torch.full_like(a, 30.0)], [hr, None], box=box)
    torch.testing.assert_close(fused[..., 5:11, 3:9], hr[..., 1:7, 1:7])
    torch.testing.assert_close(fused[..., 13:, :], up(lr)[..., 13:, :])
    torch.testing.assert_close(fused[..., :, 11:], up(lr)[..., :, 11:])


def test_attention_is_unmasked_without_a_window():
    torch.manual_seed(0)
    lr, a, hr = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    fused, _ = toy_head()([lr, a], [hr, None])
    torch.testing.assert_close(fused, up(torch.sigmoid(a)) * hr + up((1 - torch.sigmoid(a)) * lr))


def test_every_parameter_gets_a_gradient_and_attention_learns_through_the_fused_loss_only():
    model = tiny_hrda(stochastic=False)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    out = model(x, (8, 40, 24, 56))
    out.detail.retain_grad()
    (common.hrda_loss(out, y) + out.features[-1].norm(dim=1).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    out = model(x, (8, 40, 24, 56))
    out.detail.retain_grad()
    common.hrda_loss(out, y, hr_weight=0.0).backward()              # the fused term alone
    assert out.detail.grad.abs().sum() > 0                          # nothing detached: detail learns via fusion
    model.zero_grad()
    common.hrda_loss(model(x, (8, 40, 24, 56)), y, hr_weight=1.0).backward()  # the detail term alone
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decode_head.scale_attention.parameters())


def test_teacher_copy_is_deterministic_in_train_mode():
    model = tiny_hrda(stochastic=False).train()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), model(x))
    student = tiny_hrda().train()
    assert not torch.equal(student(x), student(x))                  # Dropout2d in both heads, DropPath


# ---------------------------------------------------------------- inference

def test_slide_windows_follow_mmseg_grid():
    boxes = common.slide_boxes((1024, 1024), (512, 512), (256, 256))
    assert len(boxes) == 9
    count = torch.zeros(1024, 1024)
    for y0, y1, x0, x1 in boxes:
        count[y0:y1, x0:x1] += 1
    assert set(count.unique().tolist()) == {1, 2, 4}
    assert common.slide_boxes((1024, 2048), (1024, 1024), (512, 512)) == [(0, 1024, 0, 1024), (0, 1024, 512, 1536),
                                                                          (0, 1024, 1024, 2048)]
    assert common.slide_boxes((20, 30), (32, 32), (16, 16)) == [(0, 20, 0, 30)]  # smaller: one window, no padding


@pytest.mark.parametrize("size", [(37, 53), (16, 16), (50, 17)])
def test_slide_inference_covers_every_pixel_and_places_windows_at_their_boxes(size):
    torch.manual_seed(0)
    img = torch.randn(2, 3, *size)
    calls = []

    def forward(windows):
        calls.append(windows.shape)
        return windows * 2                                           # a pixel-wise "network"
    out = common.slide_inference(forward, img, crop=(16, 16), stride=(10, 10))
    torch.testing.assert_close(out, img * 2)                         # an average of equal values at every pixel
    assert len(calls) == 1                                          # all windows as one batch


def test_slide_inference_equals_whole_image_inference_when_one_window_covers_it():
    model = tiny_hrda().eval()
    img = torch.randn(1, 3, 64, 64)
    forward = lambda w: common.upsample(model(w), w.shape[2:], align_corners=False)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(common.slide_inference(forward, img, crop=(64, 64), stride=(32, 32)), forward(img))
        torch.testing.assert_close(common.slide_inference(forward, img, crop=(128, 128), stride=(64, 64)),
                                   forward(img))


def test_slide_evaluation_wrapper_averages_window_logits_resized_to_each_window(tmp_path):
    model = tiny_hrda(num_classes=19).eval()
    slide = common.SlideInference(model, crop=(64, 64), stride=(32, 32))
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        windows = [common.upsample(model(x[..., x0:x0 + 64]), (64, 64), align_corners=False) for x0 in (0, 32, 64)]
        expected = torch.cat([windows[0][..., :32], (windows[0][..., 32:] + windows[1][..., :32]) / 2,
                              (windows[1][..., 32:] + windows[2][..., :32]) / 2, windows[2][..., 32:]], dim=3)
        torch.testing.assert_close(slide(x), expected)
    base = make_cityscapes(tmp_path, n_train=1, n_val=2, h=64, w=128)
    val = common.SegmentationDataset("cityscapes", base, split="val", norm="imagenet_rgb")
    metrics = common.evaluate(slide, val, torch.device("cpu"), align_corners=False)
    assert 0 <= metrics["mIoU"] <= 100 and metrics["num_classes"] == 19


def test_pseudo_label_path_averages_overlapping_detail_windows():
    model = tiny_hrda().eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    with torch.no_grad():
        fused = model(x)
    hook.remove()
    assert seen == [(2, 3, 32, 32), (18, 3, 32, 32)]                 # context, then 9 windows x batch 2 at once
    head = model.decode_head
    with torch.no_grad():
        context = model.backbone(common.context_view(x))
        total, count = torch.zeros(2, 5, 16, 16), torch.zeros(16, 16)
        for y0 in (0, 16, 32):                                       # windows of 32 every 16 pixels
            for x0 in (0, 16, 32):
                total[..., y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8] += head.head(
                    model.backbone(x[..., y0:y0 + 32, x0:x0 + 32]))
                count[y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8] += 1
        att = torch.sigmoid(head.scale_attention(context))
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        expected = up(att) * total / count + up((1 - att) * head.head(context))
    torch.testing.assert_close(fused, expected)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 3, 60, 60))


# ---------------------------------------------------------------- checkpoints

def hrda_names(variant):
    """The authors' HRDA student names (spec of HRDAHead: `head` + `scale_attention`, no own conv_seg)."""
    attention = ["conv_seg.weight", "conv_seg.bias"]
    attention += [f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")]
    attention += ["fuse_layer.conv.weight"] + [f"fuse_layer.bn.{p}" for p in BN]
    return (["backbone." + k for k in mit_names(variant)] + ["decode_head.head." + k for k in daformer_head_names()]
            + ["decode_head.scale_attention." + k for k in attention])


def test_b5_hrda_state_dict_keys_are_the_authors_names():
    with torch.device("meta"):
        model = common.HRDA(variant="b5")
    assert sorted(model.state_dict()) == sorted(hrda_names("b5"))
    assert tuple(model.state_dict()["decode_head.scale_attention.fuse_layer.conv.weight"].shape) == (256, 1024, 1, 1)


def test_authors_hrda_archive_loads_strictly(tmp_path):
    reference = tiny_hrda()
    shapes = reference.state_dict()
    state = {}
    for i, prefix in enumerate(("model.", "ema_model.", "imnet_model.")):
        state.update({prefix + k: torch.full_like(shapes[k], i + 1) for k in hrda_names("tiny")})
    path = tmp_path / "latest.pth"
    torch.save({"meta": {"mmcv_version": "1.3.7", "iter": 40000}, "state_dict": state}, path)
    model = tiny_hrda()
    common.load_authors_segmentor(path, model=model)
    assert all(torch.all(v == 1) for k, v in model.state_dict().items())  # the student
    daformer = common.DAFormer(5, variant="tiny", head_channels=32)
    with pytest.raises(common.DataError, match="missing"):
        common.load_authors_segmentor(path, model=daformer)


# ---------------------------------------------------------------- pseudo-label margins v2

def test_margin_mask_zeroes_top_bottom_left_right():
    valid = common.pseudo_margin_mask((1024, 2048))
    rows, cols = valid.any(1).nonzero()[0], valid.any(0).nonzero()[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (30, 1024 - 241, 30, 2048 - 31)
    assert valid[30:784, 30:2018].all() and valid.sum() == (1024 - 270) * (2048 - 60)
    assert common.pseudo_margin_mask((8, 8), (0, 0, 0, 0)).all()


def test_margin_mask_is_cropped_and_flipped_with_the_image(tmp_path):
    base = make_cityscapes(tmp_path, n_train=2, n_val=1, h=64, w=128)
    data = common.SegmentationDataset("cityscapes", base, resize=(64, 32), crop=(16, 16), flip=True,
                                      norm="imagenet_rgb")
    wrapped = common.PseudoMarginDataset(data, margins=(4, 30, 6, 2))  # at 64x128; halved by the resize
    flips = set()
    for seed in range(12):
        item, plain = wrapped[(seed % 2, seed, -1)], data[(seed % 2, seed, -1)]
        assert torch.equal(item["image"], plain["image"]) and torch.equal(item["label"], plain["label"])
        full = common.normalise(data.load(seed % 2)[0], "imagenet_rgb")
        mask = torch.from_numpy(common.pseudo_margin_mask((32, 64), (2, 15, 3, 1))).float()
        found = [(y0, x0, flip) for y0 in range(17) for x0 in range(49) for flip in (False, True)
                 if torch.equal(item["image"], (full[..., y0:y0 + 16, x0:x0 + 16].flip(-1) if flip
                                                else full[..., y0:y0 + 16, x0:x0 + 16]))]
        assert len(found) == 1
        y0, x0, flip = found[0]
        flips.add(flip)
        expected = mask[y0:y0 + 16, x0:x0 + 16]
        assert torch.equal(item["valid"], expected.flip(-1) if flip else expected)
    assert flips == {False, True}


# ---------------------------------------------------------------- MIC

def test_mic_mask_keeps_blocks_above_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = common.mic_block_mask(2, 1024, 1024, g)
    blocks = mask.view(2, 16, 64, 16, 64)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))  # constant 64x64 blocks
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = torch.cat([common.mic_block_mask(64, 64, 64, g, block=4).mean((1, 2, 3)) for _ in range(10)])
    assert kept.mean().item() == pytest.approx(0.3, abs=0.01)
    assert tuple(common.mic_block_mask(1, 100, 1000, g).shape) == (1, 1, 100, 1000)
    assert common.mic_block_mask(1, 100, 1000, g, ratio=0.0).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    grid = torch.rand(1, 1, 2, 16, generator=g2) > 0.7              # round(100/64)=2 x round(1000/64)=16 cells
    torch.testing.assert_close(common.mic_block_mask(1, 100, 1000, g1),
                               F.interpolate(grid.float(), size=(100, 1000), mode="nearest"))


def test_mic_masked_input_zeroes_masked_pixels_after_fresh_colour_aug():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    g = torch.Generator().manual_seed(0)
    out = common.mic_masked_input(x, "imagenet_rgb", g)
    zero = (out == 0).all(1)
    blocks = zero.view(2, 2, 64, 2, 64)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert 0 < zero.float().mean() < 1
    changed = [not torch.equal(common.mic_masked_input(x, "imagenet_rgb", g, ratio=0.0), x) for _ in range(10)]
    assert any(changed)                                              # jitter/blur drawn inside, at times off
    same = x[:1].expand(2, -1, -1, -1)                               # two equal images, blur only:
    for _ in range(10):                                              # one sigma per call, as MIC's batched call
        out = common.mic_masked_input(same, "imagenet_rgb", g, ratio=0.0, jitter_gate=1.0)
        assert torch.equal(out[0], out[1])
