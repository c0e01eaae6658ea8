"""Shared foundation of the six domain-adaptation scripts.

Facts follow the authors' code (vikolss/DACS, WilhelmT/ClassMix, wasidennis/AdaptSegNet,
lhoyer/DAFormer); each function names its source. Sections: model, data, mixing and augmentation,
losses, training utilities (schedules, EMA, seeding), evaluation, data checking
(``python common.py check-data``). The run machinery (device, AMP, multi-GPU, logging, checkpoints, the
shared command line and run folder) is in training.py.
"""
import argparse
import contextlib
import copy
import errno
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IGNORE = 255  # the single internal void value; every loss and the evaluation skip it

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
               "truck", "bus", "train", "motorcycle", "bicycle")
# SYNTHIA protocols (DACS/BDL evaluation): 16 classes drop terrain/truck/train; 13 drop wall/fence/pole too.
TRAIN_IDS_16 = tuple(c for c in range(19) if c not in (9, 14, 16))
TRAIN_IDS_13 = tuple(c for c in TRAIN_IDS_16 if c not in (3, 4, 5))
PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

# The ImageNet+COCO DeepLab init used by AdvSemiSeg, DACS and ClassMix. Its file name carries the first
# 8 hex digits of its sha256 (torch.hub convention); the full digest is not published by the authors.
COCO_INIT_URL = "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/resnet101COCO-41f33a49.pth"
COCO_INIT_SHA256_PREFIX = "41f33a49"


class DataError(Exception):
    """Bad user data or arguments: scripts print `error: <message>` and exit 2."""


# OSErrors of the user's paths (disk full, read-only, no permission, a file where a folder is expected, ...):
# reported as `error: <path>: <reason>`, exit 2, instead of a traceback
FILESYSTEM_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                     errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line `error: ...` on stderr, exit 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """main()'s result; bad data or arguments (also raised in a data-loading worker) and filesystem errors of the
    user's paths -> one line `error: ...` on stderr and exit 2."""
    try:
        return main()
    except DataError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):  # re-raised from a DataLoader worker
            lines = [lines[-1].split(": ", 1)[-1]]
        print(f"error: {lines[0]}", file=sys.stderr)
    except OSError as exc:
        if exc.errno not in FILESYSTEM_ERRORS:
            raise
        print(f"error: {exc.filename or 'writing a file'}: {exc.strerror}", file=sys.stderr)
    sys.exit(2)


# ======================================================================================
# Model: DeepLabv2-ResNet101 exactly as Res_Deeplab / DeeplabMulti (AdaptSegNet, DACS)
# ======================================================================================

class Bottleneck(nn.Module):
    """ResNet bottleneck; `style='caffe'` puts the stride on the 1x1 conv (official), 'pytorch' on the 3x3."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="caffe"):
        super().__init__()
        s1, s3 = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ClassifierModule(nn.Module):
    """ASPP head: four dilated 3x3 convs; the official forward sums only the first two (docs/quirks.md Q1)."""

    def __init__(self, inplanes, num_classes, dilations=(6, 12, 18, 24), full=False):
        super().__init__()
        self.full = full
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            conv.weight.data.normal_(0, 0.01)

    def forward(self, x):
        branches = self.conv2d_list if self.full else self.conv2d_list[:2]
        out = branches[0](x)
        for conv in branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabv2-ResNet; state_dict keys equal the official `Res_Deeplab` (or `DeeplabMulti` when multi_level).

    `layers` sets the Bottleneck count per stage and `width` the channels of the stem and first stage
    (default ResNet-101: 3 4 23 3, 64; the demo uses a light one with the same names, strides, dilations and
    head). `freeze_bn_affine` keeps BN gamma/beta out of training as the
    official code does; BN still uses batch statistics in train mode.
    """

    def __init__(self, num_classes=19, multi_level=False, aspp_full=False, style="caffe",
                 layers=(3, 4, 23, 3), freeze_bn_affine=True, width=64):
        super().__init__()
        if style not in ("caffe", "pytorch"):
            raise ValueError(f"style must be 'caffe' or 'pytorch', got {style!r}")
        self.num_classes, self.multi_level, self.style = num_classes, multi_level, style
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], dilation=2)
        self.layer4 = self._make_layer(8 * width, layers[3], dilation=4)
        if multi_level:  # AdaptSegNet: aux head on layer3 is `layer5`, main head on layer4 is `layer6`
            self.layer5 = ClassifierModule(16 * width, num_classes, full=aspp_full)
            self.layer6 = ClassifierModule(32 * width, num_classes, full=aspp_full)
        else:
            self.layer5 = ClassifierModule(32 * width, num_classes, full=aspp_full)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
                m.weight.requires_grad_(not freeze_bn_affine)
                m.bias.requires_grad_(not freeze_bn_affine)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4 or dilation in (2, 4):
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        mods = [Bottleneck(self.inplanes, planes, stride, dilation, downsample, self.style)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes, 1, dilation, None, self.style) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def backbone_modules(self):
        """The modules of the 1x learning-rate group, in the official order."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def head_modules(self):
        """The classifier(s) of the 10x learning-rate group."""
        return [self.layer5, self.layer6] if self.multi_level else [self.layer5]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        if self.multi_level:
            return self.layer5(x3), self.layer6(x4)
        return self.layer5(x4)


class FCDiscriminator(nn.Module):
    """AdaptSegNet's output-space discriminator: five 4x4/s2 convs, LeakyReLU 0.2, raw logits."""

    def __init__(self, num_classes, ndf=64):
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        self.conv1, self.conv2, self.conv3, self.conv4 = (
            nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(4))
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)


# ======================================================================================
# Model: MiT encoder + DAFormer head (NVlabs/SegFormer mix_transformer.py, lhoyer/DAFormer daformer_head.py)
# ======================================================================================

# SegFormer's mit_b0..b5 (mix_transformer.py); every variant uses mlp_ratio 4, qkv bias, LayerNorm eps 1e-6.
# `tiny` is this project's narrow one for tests and the demo (same names, strides and structure).
MIT_VARIANTS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1)),
    "b1": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1)),
    "b2": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1)),
    "b3": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 4, 18, 3), sr_ratios=(8, 4, 2, 1)),
    "b4": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 8, 27, 3), sr_ratios=(8, 4, 2, 1)),
    "b5": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 6, 40, 3), sr_ratios=(8, 4, 2, 1)),
    "tiny": dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 1), sr_ratios=(8, 4, 2, 1)),
}
MIT_PATCH_EMBEDS = ((7, 4), (3, 2), (3, 2), (3, 2))  # (kernel, stride) per stage; padding kernel // 2


def mit_init(m):
    """SegFormer's from-scratch init: trunc-normal(.02) Linear, LayerNorm 1/0, Conv2d N(0, sqrt(2/fan_out))."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """timm's stochastic depth: zero the residual branch per sample with probability p, scale kept ones by 1/(1-p)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
        return x / keep * mask

    def extra_repr(self):
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Conv(k, s, pad k//2) then LayerNorm (eps 1e-5) over the flattened tokens; returns (tokens, H, W)."""

    def __init__(self, in_chans, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map reduced by a stride-`sr` conv + LayerNorm."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, as SegFormer's scale
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TokenDWConv(nn.Module):
    """Depth-wise 3x3 conv applied to tokens laid out as their H x W map (SegFormer's DWConv)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depth-wise 3x3 conv -> exact GELU -> fc2 (SegFormer's Mlp; its dropouts are 0)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = TokenDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN1 x)), then x + DropPath(MixFFN(LN2 x)); LN eps 1e-6."""

    def __init__(self, dim, num_heads, sr_ratio, drop_path, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """SegFormer's MiT encoder; returns the 4 stage maps (B, C_i, H_i, W_i) at strides 4, 8, 16, 32.

    Module names equal SegFormer's (`patch_embed1`, `block1.0.attn.q`, `norm1`, ...), so `mit_b5.pth`
    loads by name. Stochastic depth rises linearly from 0 to `drop_path_rate` over all blocks in order.
    """

    def __init__(self, variant="b5", drop_path_rate=0.1, in_chans=3):
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"MiT variant must be one of {sorted(MIT_VARIANTS)}, got {variant!r}")
        cfg = MIT_VARIANTS[variant]
        self.embed_dims = cfg["embed_dims"]
        rates = torch.linspace(0, drop_path_rate, sum(cfg["depths"]), device="cpu").tolist()
        chans = (in_chans,) + self.embed_dims
        for i, (kernel, stride) in enumerate(MIT_PATCH_EMBEDS):  # registration order as SegFormer's
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(chans[i], chans[i + 1], kernel, stride))
        for i, dim in enumerate(self.embed_dims):
            first = sum(cfg["depths"][:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MiTBlock(dim, cfg["num_heads"][i], cfg["sr_ratios"][i], rates[first + j])
                for j in range(cfg["depths"][i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
        self.apply(mit_init)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class ConvBNReLU(nn.Module):
    """mmcv ConvModule with BN and ReLU: conv without bias (`conv`), `bn`, ReLU; kaiming fan_out init, BN 1/0."""

    def __init__(self, in_ch, out_ch, kernel, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvBNReLU(nn.Module):
    """mmcv DepthwiseSeparableConvModule: dilated depth-wise 3x3 ConvModule, then point-wise 1x1 ConvModule."""

    def __init__(self, in_ch, out_ch, dilation):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch)
        self.pointwise_conv = ConvBNReLU(in_ch, out_ch, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SeparableASPP(nn.Module):
    """DAFormer's ASPPWrapper (sep=True, pool=False): a 1x1 branch and depth-wise separable dilated branches,
    concatenated, then a 3x3 bottleneck ConvModule."""

    def __init__(self, in_ch, channels, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_ch, channels, 1) if d == 1 else DepthwiseSeparableConvBNReLU(in_ch, channels, d)
            for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x):
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class LinearEmbed(nn.Module):
    """SegFormer's MLP embed: one Linear on the flattened tokens of a map, back to a (B, C, H, W) map."""

    def __init__(self, in_ch, dim):
        super().__init__()
        self.proj = nn.Linear(in_ch, dim)

    def forward(self, x):
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class DAFormerHead(nn.Module):
    """DAFormer's decoder: per-level Linear embed, bilinear resize to level 0, concat, fuse, Dropout2d, 1x1 conv.

    fusion='aspp' is DAFormer's context-aware fusion (`daformer_sepaspp`); 'conv1x1' is one 1x1 ConvModule
    (`fuse_layer.conv`/`fuse_layer.bn`), the fusion of HRDA's scale-attention head. Logits are at level 0's
    resolution (stride 4), not upsampled.
    """

    def __init__(self, in_channels=(64, 128, 320, 512), num_classes=19, embed_dim=256, channels=256,
                 fusion="aspp", dropout_ratio=0.1):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # registered first, as mmseg's BaseDecodeHead
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.embed_layers = nn.ModuleList(LinearEmbed(c, embed_dim) for c in in_channels)
        if fusion == "aspp":
            self.fuse_layer = SeparableASPP(len(in_channels) * embed_dim, channels)
        elif fusion == "conv1x1":
            self.fuse_layer = ConvBNReLU(len(in_channels) * embed_dim, channels, 1)
        else:
            raise ValueError(f"fusion must be 'aspp' or 'conv1x1', got {fusion!r}")
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        size = feats[0].shape[2:]
        maps = []
        for x, embed in zip(feats, self.embed_layers):
            x = embed(x)
            if x.shape[2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            maps.append(x)
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(maps, dim=1))))


class DAFormer(nn.Module):
    """MiT encoder (`backbone`) + DAFormer head (`decode_head`); state_dict keys equal the authors' student.

    `forward` returns stride-4 logits (not upsampled). `head_channels` (DAFormer: 256) sets the head's
    embed and fusion width; the demo narrows it. With `stochastic=False` (a teacher copy) DropPath and
    the head's Dropout2d stay off in train mode too, while BN keeps its train-mode batch statistics, as
    DAFormer's teacher (`uda/dacs.py`: `m.training = False` for dropout and DropPath only).
    """

    def __init__(self, num_classes=19, variant="b5", drop_path_rate=0.1, dropout_ratio=0.1, stochastic=True,
                 head_channels=256):
        super().__init__()
        self.backbone = MixVisionTransformer(variant, drop_path_rate)
        self.decode_head = DAFormerHead(self.backbone.embed_dims, num_classes, head_channels, head_channels,
                                        dropout_ratio=dropout_ratio)
        self.set_stochastic(stochastic)

    def set_stochastic(self, enabled):
        """Switch DropPath and Dropout on (student) or off (teacher) for every later train()/eval(); returns self."""
        self.stochastic = enabled
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if not self.stochastic:
            for m in self.modules():
                if isinstance(m, (DropPath, nn.Dropout2d)):
                    m.training = False
        return self

    def forward_features(self, x):
        """(the 4 encoder maps, stride-4 logits) from one encoder pass (FD uses the last map)."""
        feats = self.backbone(x)
        return feats, self.decode_head(feats)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def daformer_param_groups(model, lr, weight_decay=0.01, head_mult=10.0):
    """mmcv DefaultOptimizerConstructor with DAFormer's paramwise_cfg: the first matching key, longest first, of
    `head` (lr x head_mult) and `norm` (weight decay 0) decides; every other parameter gets lr and weight_decay."""
    head, norm, rest = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "head" in name else norm if "norm" in name else rest).append(p)
    return [{"params": head, "lr": lr * head_mult, "weight_decay": weight_decay},
            {"params": norm, "lr": lr, "weight_decay": 0.0},
            {"params": rest, "lr": lr, "weight_decay": weight_decay}]


def check_state_keys(state, expected, path, what):
    """DataError naming the first missing and unexpected keys (and a shape mismatch) against `expected`."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {len(missing)} (first {missing[:3]})"] if missing else []
        parts += [f"unexpected {len(unexpected)} (first {unexpected[:3]})"] if unexpected else []
        raise DataError(f"{path}: not {what}: {', '.join(parts)}; expected keys like {list(expected)[:2]}")
    for k, v in expected.items():
        if not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(v.shape):
            got = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            raise DataError(f"{path}: {k} has shape {got}, expected {tuple(v.shape)} ({what})")


def load_mit_imagenet(encoder, path):
    """Load SegFormer's ImageNet `mit_bX.pth` (flat, or under `state_dict`/`model`) into a MixVisionTransformer.

    Every encoder tensor must be filled and only the classifier `head.*` may be left over (the authors load
    with strict=False, which would silently keep random weights on a name mismatch).
    """
    state = load_state_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k: v for k, v in state.items() if not str(k).startswith("head.")}
    check_state_keys(state, encoder.state_dict(), path, "a SegFormer ImageNet MiT file for this encoder")
    encoder.load_state_dict(state)


def load_authors_segmentor(path, model=None):
    """The student state dict of an authors' DAFormer/HRDA/MIC checkpoint file (see authors_checkpoint),
    loaded strictly into `model` when given."""
    state = authors_checkpoint(load_state_file(path), path)["model"]
    if model is not None:
        check_state_keys(state, model.state_dict(), path, "a checkpoint of this network")
        model.load_state_dict(state)
    return state


def authors_checkpoint(obj, path):
    """{'model': student, 'ema_model': teacher (if saved)} of a loaded authors' DAFormer/HRDA/MIC mmcv
    checkpoint (`state_dict` with `model.*`, `ema_model.*`, `imnet_model.*`; their tools/test.py evaluates the
    student) or of a plain student state dict; `path` names the file in errors."""
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    teacher = {k.removeprefix("ema_model."): v for k, v in state.items() if k.startswith("ema_model.")}
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not state or not all(k.startswith(("backbone.", "decode_head.")) for k in state):
        first = next((k for k in state if not k.startswith(("backbone.", "decode_head."))), None)
        raise DataError(f"{path}: not a DAFormer/HRDA checkpoint (expected an mmcv `state_dict` with `model.*` "
                        f"keys or `backbone.*`/`decode_head.*` keys; found {first!r})")
    return {"model": state, **({"ema_model": teacher} if teacher else {})}


# ======================================================================================
# HRDA multi-resolution training and inference (lhoyer/HRDA) and MIC masking (lhoyer/MIC)
# ======================================================================================

HRDA_CONTEXT_SCALE = 0.5  # HRDA's scales [0.5, 1]: the context view is the crop at half resolution


class HRDAOutput(NamedTuple):
    """A training forward: fused logits over the whole crop and detail logits over `box`, both at stride 4 of
    the full-resolution crop; `box` (y0, y1, x0, x1) in crop pixels; the 4 context encoder maps (FD)."""
    fused: torch.Tensor
    detail: torch.Tensor
    box: tuple
    features: list


def context_view(x):
    """HRDA's low-resolution context input: bilinear x0.5, align_corners False (mmseg resize)."""
    return F.interpolate(x, scale_factor=HRDA_CONTEXT_SCALE, mode="bilinear", align_corners=False)


def hr_crop_box(size, crop, generator, divisible=8):
    """Random detail window (y0, y1, x0, x1) of size `crop` inside `size` with offsets randint(0, (margin + 1) //
    divisible) * divisible (HRDA get_crop_bbox; at least one position: offset 0 for a margin under 7)."""
    (h, w), (ch, cw) = size, crop
    if ch > h or cw > w:
        raise ValueError(f"detail crop {ch}x{cw} does not fit the {h}x{w} crop")
    y0, x0 = (int(torch.randint(max((m + 1) // divisible, 1), (), generator=generator)) * divisible
              for m in (h - ch, w - cw))
    return y0, y0 + ch, x0, x0 + cw


def crop_box(t, box):
    """The (y0, y1, x0, x1) window of the last two dims of an image, label or weight map."""
    y0, y1, x0, x1 = box
    return t[..., y0:y1, x0:x1]


def scale_box(box, factor):
    """A box in another grid: each coordinate divided by `factor` and truncated (HRDA scale_box)."""
    return tuple(int(c / factor) for c in box)


def slide_boxes(size, crop, stride):
    """mmseg's sliding-window grid: windows of min(crop, size) every `stride`, the last one moved back inside."""
    (h, w), (ch, cw), (sh, sw) = size, crop, stride
    boxes = []
    for i in range(max(h - ch + sh - 1, 0) // sh + 1):
        for j in range(max(w - cw + sw - 1, 0) // sw + 1):
            y1, x1 = min(i * sh + ch, h), min(j * sw + cw, w)
            boxes.append((max(y1 - ch, 0), y1, max(x1 - cw, 0), x1))
    return boxes


def merge_windows(window_logits, boxes, n, size):
    """Sum window logits (window-major batches of n) into a (n, C, *size) map, divided by each pixel's count."""
    out = window_logits.new_zeros((n, window_logits.shape[1], *size))
    count = window_logits.new_zeros((1, 1, *size))
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[:, :, y0:y1, x0:x1] += window_logits[i * n:(i + 1) * n]
        count[:, :, y0:y1, x0:x1] += 1
    return out / count


def slide_inference(forward, img, crop=(1024, 1024), stride=(512, 512)):
    """mmseg batched slide inference: all windows through `forward` (logits at window size) as one batch,
    summed into the image and divided by the overlap count; full-resolution logits (HRDA test_cfg)."""
    boxes = slide_boxes(img.shape[2:], crop, stride)
    logits = forward(torch.cat([crop_box(img, b) for b in boxes]))
    return merge_windows(logits, boxes, img.shape[0], img.shape[2:])


class SlideInference(nn.Module):
    """A segmentor evaluated by `slide_inference`: each window's logits resized bilinearly to the window, then
    merged at full resolution (HRDA's test mode: crop 1024, stride 512); for `evaluate`."""

    def __init__(self, model, crop=(1024, 1024), stride=(512, 512)):
        super().__init__()
        self.model, self.crop, self.stride = model, tuple(crop), tuple(stride)
        self.num_classes = model.num_classes

    def forward(self, x):
        return slide_inference(lambda w: upsample(self.model(w), w.shape[2:], align_corners=False), x,
                               self.crop, self.stride)


class HRDAHead(nn.Module):
    """HRDA's decode head: one DAFormer head `head` for context and detail, a scale-attention head
    `scale_attention` (DAFormer head, 1x1 conv fusion) on the context features; no own conv_seg."""

    def __init__(self, in_channels=(64, 128, 320, 512), num_classes=19, channels=256, attention_channels=256,
                 dropout_ratio=0.1):
        super().__init__()
        self.head = DAFormerHead(in_channels, num_classes, channels, channels, "aspp", dropout_ratio)
        self.scale_attention = DAFormerHead(in_channels, num_classes, attention_channels, attention_channels,
                                            "conv1x1", dropout_ratio)

    def forward(self, context_feats, detail_feats, box=None, windows=None):
        """Fused logits at stride 4 of the full-resolution input and the detail logits (HRDAHead.forward).

        Training (`box`: the detail window in input pixels): the attention is zeroed outside the window's
        footprint and the detail logits are pasted at box/4. Inference (`windows`: the overlapping detail
        boxes, window-major in `detail_feats`): the detail logits are averaged over the windows.
        """
        lr = self.head(context_feats)                                   # stride 8 w.r.t. the input
        hr = self.head(detail_feats)                                    # stride 4
        att = torch.sigmoid(self.scale_attention(context_feats))
        up = 1 / HRDA_CONTEXT_SCALE
        if box is not None:
            mask = torch.zeros_like(att[:, :1])
            y0, y1, x0, x1 = scale_box(box, 4 * up)                     # the window on the context grid
            mask[..., y0:y1, x0:x1] = 1
            att = att * mask
        lr = F.interpolate((1 - att) * lr, scale_factor=up, mode="bilinear", align_corners=False)
        att = F.interpolate(att, scale_factor=up, mode="bilinear", align_corners=False)
        if box is not None:
            detail_map = torch.zeros_like(lr)
            y0, y1, x0, x1 = scale_box(box, 4)
            detail_map[..., y0:y1, x0:x1] = hr
        elif windows is not None:
            boxes = [scale_box(b, 4) for b in windows]
            detail_map = merge_windows(hr, boxes, lr.shape[0], (max(b[1] for b in boxes), max(b[3] for b in boxes)))
        else:
            detail_map = hr
        if detail_map.shape != lr.shape:
            raise ValueError(f"context logits {tuple(lr.shape[2:])} and detail logits {tuple(detail_map.shape[2:])} "
                             "differ: HRDA needs input sides divisible by 8")
        return att * detail_map + lr, hr


class HRDA(DAFormer):
    """HRDA's segmentor: the MiT encoder (`backbone`) and HRDAHead (`decode_head`); the authors' state_dict names.

    `model(x)` is the inference path (HRDA encode_decode, the teacher's pseudo-label path): the context view and
    overlapping detail windows of `detail_crop` every half window, batched, fused logits at stride 4 of x.
    `model(x, box)` is the training path: the context view and the one detail window `box` (`hr_crop_box`),
    returning an HRDAOutput. The teacher switch (`stochastic`) is DAFormer's.
    """

    def __init__(self, num_classes=19, variant="b5", drop_path_rate=0.1, dropout_ratio=0.1, stochastic=True,
                 head_channels=256, detail_crop=(512, 512)):
        super().__init__(num_classes, variant, drop_path_rate, dropout_ratio, stochastic, head_channels)
        self.decode_head = HRDAHead(self.backbone.embed_dims, num_classes, head_channels, head_channels,
                                    dropout_ratio)
        self.num_classes, self.detail_crop = num_classes, tuple(detail_crop)
        self.set_stochastic(stochastic)

    def forward_features(self, x):
        raise NotImplementedError("HRDA: use model(x, box) for training; its output holds the context features")

    def forward(self, x, box=None):
        context = self.backbone(context_view(x))
        if box is not None:
            fused, detail = self.decode_head(context, self.backbone(crop_box(x, box)), box=box)
            return HRDAOutput(fused, detail, tuple(box), context)
        windows = slide_boxes(x.shape[2:], self.detail_crop, [c // 2 for c in self.detail_crop])
        detail_feats = self.backbone(torch.cat([crop_box(x, b) for b in windows]))
        return self.decode_head(context, detail_feats, windows=windows)[0]


def hrda_loss(out, label, weight=1.0, hr_weight=0.1, fused_scale=1.0):
    """(1 - hr_weight) * CE(fused, label) + hr_weight * CE(detail, label in the box), logits resized bilinearly
    to the labels, weighted CE averaged over all pixels, ignored ones included (HRDAHead.losses, mmseg).

    `weight` is 1 or a (B, H, W) pixel weight, cropped with the label; `fused_scale` multiplies the fused term
    only (MIC's mask_lambda).
    """
    def ce(logits, y, w):
        return ce_pixel_weighted(upsample(logits, y.shape[1:], align_corners=False), y, w)
    fused = ce(out.fused, label, weight)
    if hr_weight == 0:
        return fused_scale * fused
    detail_weight = crop_box(weight, out.box) if torch.is_tensor(weight) and weight.dim() > 1 else weight
    return fused_scale * (1 - hr_weight) * fused + hr_weight * ce(out.detail, crop_box(label, out.box), detail_weight)


def pseudo_margin_mask(size, margins=(30, 240, 30, 30)):
    """(H, W) uint8 map, 0 in the [top, bottom, left, right] pixel margins (HRDA crop_pseudo_margins, v2)."""
    top, bottom, left, right = margins
    h, w = size
    valid = np.ones((h, w), dtype=np.uint8)
    valid[:top], valid[h - bottom:], valid[:, :left], valid[:, w - right:] = 0, 0, 0, 0
    return valid


class PseudoMarginDataset(torch.utils.data.Dataset):
    """A SegmentationDataset whose items also hold "valid": the pseudo-label margin mask built at the image's
    original size (HRDA: 2048x1024 Cityscapes), resized (nearest) and cropped and flipped with the image.

    The crop and flip are the dataset's own (`random_crop` on the image with the mask as a 4th channel, the same
    random draws), so image and label equal the wrapped dataset's item; padding is 0 (not valid).
    """

    def __init__(self, dataset, margins=(30, 240, 30, 30)):
        self.dataset, self.margins = dataset, tuple(margins)

    def uint8_items(self):
        """The same items with the wrapped dataset's uint8 image and label (SegmentationDataset.uint8_items)."""
        return PseudoMarginDataset(self.dataset.uint8_items(), self.margins)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, required_class = (item, 0, -1) if isinstance(item, int) else item
        rgb, label, full = self.dataset.load(index)   # full: None from a prepared root (no full-size label read)
        w, h = image_size(label_or_image(self.dataset.pairs[index])) if full is None else full.shape[::-1]
        valid = pseudo_margin_mask((h, w), self.margins)
        if valid.shape != label.shape:
            valid = resize_label(valid, label.shape[::-1], "cv2")
        stacked = np.concatenate([rgb, valid[..., None]], axis=2)
        rng = np.random.default_rng(seed)
        for _ in range(10 if required_class >= 0 else 1):  # as SegmentationDataset.__getitem__
            x, y = self.dataset.random_crop(stacked, label, rng)
            if required_class < 0 or (y == required_class).sum() > self.dataset.rcs_min_crop_pixels:
                break
        return {**self.dataset.item(np.ascontiguousarray(x[..., :3]), y, index),
                "valid": torch.from_numpy(np.array(x[..., 3])).float()}


def mic_block_mask(n, h, w, generator, block=64, ratio=0.7, device="cpu"):
    """(n,1,H,W) MIC block mask: a round(H/block) x round(W/block) U(0,1) grid, 1 where > ratio, nearest upsampled."""
    grid = torch.rand(n, 1, round(h / block), round(w / block), generator=generator).to(device, non_blocking=True)
    return F.interpolate((grid > ratio).float(), size=(h, w), mode="nearest")


def mic_separate_batch(x_s, y_s, x_t, y_t, w_t):
    """MIC's batch to mask in mask_mode 'separate' (batches of 2 per domain): images [source 0, target 0], labels
    [source GT 0, pseudo-label 0], pixel weights [ones, pseudo-weight 0]; no colour augmentation (mic_mask_image
    masks it)."""
    if x_s.shape[0] != 2 or x_t.shape[0] != 2:
        raise DataError(f"MIC mask_mode 'separate' takes image 0 of a batch of 2 per domain (lhoyer/MIC asserts it): "
                        f"batches of {x_s.shape[0]} source and {x_t.shape[0]} target images")
    return (torch.stack([x_s[0], x_t[0]]), torch.stack([y_s[0], y_t[0]]),
            torch.stack([torch.ones_like(w_t[0]), w_t[0]]))


def mic_masked_input(x, norm, generator, block=64, ratio=0.7, jitter_strength=0.2, jitter_gate=0.2):
    """MIC's masked target image (mask_mode separatetrgaug): colour jitter and blur with fresh draws, as one batch
    (one op order and one blur sigma per call), then the normalised image times the block mask (0 = the mean)."""
    x = color_jitter(x, norm, generator, strength=jitter_strength, gate=jitter_gate, per_image_order=False)
    x = gaussian_blur(x, generator, gate=0.5, per_image=False)
    return mic_mask_image(x, generator, block, ratio)


def mic_mask_image(x, generator, block=64, ratio=0.7):
    """The normalised images times a fresh block mask (MIC's mask_image; masked pixels become 0 = the mean)."""
    return x * mic_block_mask(x.shape[0], x.shape[2], x.shape[3], generator, block, ratio, x.device).to(x.dtype)


def load_init(model, state):
    """Copy every tensor whose name (minus a leading `Scale.`/`module.`) and shape match; return the count.

    Never copies a classifier of another shape (DACS/ClassMix shape rule); AdaptSegNet's skip of
    `layer5` for 19 classes is the same rule because a COCO head never has 19 outputs.
    """
    own = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            name = key.split(".", 1)[1] if key.split(".", 1)[0] in ("Scale", "module") else key
            if name in own and tuple(own[name].shape) == tuple(value.shape):
                own[name].copy_(value)
                copied += 1
    return copied


def load_state_file(path):
    """Load a tensor dict with weights_only=True; a one-line DataError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a PyTorch weights file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip/pickle, or holds non-tensor objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; an mmcv checkpoint loads only when its `meta` holds built-in types alone (for a trusted file, "
                "re-save its `state_dict` alone with torch.save)") if "Weights only" in first else ""
        raise DataError(f"{path}: not a readable plain weights file ({first[:200]}){hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def init_convention(init, default=("caffe", "imagenet_bgr")):
    """(stride style, input normalisation) the weights of `--init` expect: torchvision's ImageNet ResNet
    puts the stride on the 3x3 conv and wants RGB mean/std; the COCO DeepLab init is caffe-style BGR."""
    return {"imagenet": ("pytorch", "imagenet_rgb"), "coco": ("caffe", "imagenet_bgr")}.get(init, default)


def initialise(model, init):
    """Apply `--init` (coco|imagenet|none|PATH); return copied-tensor count, refuse a zero copy."""
    if init == "none":
        return 0
    if init == "imagenet":
        import torchvision  # torchvision's weights API downloads and caches the file (never in tests)
        weights = torchvision.models.ResNet101_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=True)
        except OSError as exc:  # offline, or the download failed
            raise DataError(f"--init imagenet: could not fetch {weights.url} ({exc}); put the file into "
                            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass --init PATH") from None
    else:
        path = download_init("coco", COCO_INIT_URL, COCO_INIT_SHA256_PREFIX) if init == "coco" else init
        state = load_state_file(path)
        state = state.get("model", state.get("state_dict", state))
    copied = load_init(model, state)
    if copied == 0:
        raise DataError(f"--init {init}: no tensor matched the model by name and shape "
                        f"(expected DeepLabv2/ResNet-101 key names such as 'layer1.0.conv1.weight')")
    print(f"--init {init}: {copied} of {len(model.state_dict())} tensors loaded (matched by name and shape; "
          f"the others keep their initialisation)", flush=True)
    return copied


def download_init(name, url, hash_prefix=None):
    """Fetch (once) the init file of `--init name` into torch's hub cache, checking its sha256 prefix when
    one is known; return its path."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix)
        except (OSError, RuntimeError) as exc:  # offline, failed download, or a file with the wrong hash
            raise DataError(f"--init {name}: could not fetch {url} ({exc}); put the file at {path} "
                            f"or pass --init PATH") from None
    return path


def param_groups(model, lr, head_mult=10.0, official_duplicates=True):
    """1x backbone / 10x head groups; `official_duplicates` repeats tensors as `optim_parameters` does (docs/quirks.md Q4)."""
    if official_duplicates:  # every sub-module's recursive parameters: a tensor once per ancestor
        backbone = [p for top in model.backbone_modules() for m in top.modules()
                    for p in m.parameters() if p.requires_grad]
    else:
        backbone = [p for top in model.backbone_modules() for p in top.parameters() if p.requires_grad]
    head = [p for m in model.head_modules() for p in m.parameters() if p.requires_grad]
    return [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * head_mult}]


def deeplab_optimizer(model, lr, kind="sgd", official_duplicates=True, rule="torch1.5", momentum=0.9,
                      weight_decay=5e-4):
    """The authors' optimiser (per-entry SGD of their PyTorch's `rule`, momentum 0.9 and weight decay 5e-4 unless
    given, over the 1x/10x groups) or, for the random-init demo, Adam with one learning rate for all parameters
    (a 10x head diverges with Adam from scratch)."""
    if kind == "adam":
        return torch.optim.Adam(param_groups(model, lr, head_mult=1.0, official_duplicates=False), lr=lr,
                                **adam_kernels(next(model.parameters()).device))
    return LegacySGD(param_groups(model, lr, official_duplicates=official_duplicates), lr=lr, momentum=momentum,
                     weight_decay=weight_decay, rule=rule)


def adam_kernels(device):
    """Adam/AdamW's implementation on `device`: fused (one kernel for all tensors) on CUDA, foreach elsewhere; the
    update rule is torch's in both. A checkpoint keeps its optimiser's choice (torch stores it in the groups)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


SGD_RULES = ("torch0.4", "torch1.5")  # PyTorch <= 1.4 / >= 1.5 per-entry SGD (docs/quirks.md Q4)


class LegacySGD(torch.optim.Optimizer):
    """SGD with the per-entry update of old PyTorch, so duplicated tensors compound as for the authors (docs/quirks.md Q4).

    For each entry in order: d = grad + wd*p (p current), buf = m*buf + d (a copy of d on first use, buffer shared
    per tensor), p -= lr*buf (or lr*(d + m*buf) with `nesterov`). `rule` torch1.5: d is a new tensor (PyTorch 1.5);
    torch0.4: d is p.grad itself, so a tensor's later entries see the decay of the earlier ones added in (PyTorch
    0.3-1.4 `d_p.add_(weight_decay, p.data)`). torch.optim.SGD(foreach=False) collapses duplicates differently.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, nesterov=False, rule="torch1.5"):
        if rule not in SGD_RULES:
            raise ValueError(f"rule must be one of {SGD_RULES}, got {rule!r}")
        with warnings.catch_warnings():  # the duplicates are intentional (official layout)
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.nesterov = nesterov  # p -= lr * (d + m*buf) instead of lr * buf (not a group key: old checkpoints load)
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for wave in self.waves(group["params"]):
                params = [p for p in wave if p.grad is not None]
                if not params:
                    continue
                grads = [p.grad for p in params]
                if self.rule == "torch0.4":
                    if wd:
                        torch._foreach_add_(grads, params, alpha=wd)
                    ds = grads
                else:
                    ds = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
                old = [(self.state[p]["momentum_buffer"], d) for p, d in zip(params, ds) if self.state[p]]
                copy = self.nesterov or self.rule == "torch0.4"  # d is reused (Nesterov) or is p.grad itself
                for p, d in zip(params, ds):  # first use: the buffer is d
                    if not self.state[p]:
                        self.state[p]["momentum_buffer"] = d.clone() if copy else d
                if old:
                    bufs, dd = zip(*old)
                    torch._foreach_mul_(bufs, m)
                    torch._foreach_add_(bufs, dd)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_add_(params, torch._foreach_add(ds, bufs, alpha=m) if self.nesterov else bufs, alpha=-lr)

    @staticmethod
    def waves(entries):
        """Split the entries into waves holding each tensor once: wave k has every tensor's k-th occurrence.

        Updates of different tensors are independent, so applying the waves in turn (one foreach call each)
        gives every tensor its entries in their original order, as the per-entry loop does.
        """
        waves, seen = [], {}
        for p in entries:
            k = seen.get(p, 0)
            seen[p] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(p)
        return waves


# ======================================================================================
# Data: label maps, normalisation, GTA5 / SYNTHIA / Cityscapes, splits, samplers
# ======================================================================================

def _lut(pairs, size=256):
    lut = np.full(size, IGNORE, dtype=np.uint8)
    for k, v in pairs.items():
        lut[k] = v
    return lut


# Cityscapes label id -> train id (GTA5 labels use the same ids); everything else -> ignore.
LABELID_TO_TRAINID = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                           24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})
TRAINID_TO_LABELID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
                              dtype=np.uint8)
# Raw SYNTHIA class id -> train id (DACS/data/synthia_dataset.py).
SYNTHIA_TO_TRAINID = _lut({3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                           17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18})
# 19 train ids -> the 16-class space (IIDM/DLDM 16-way head): terrain/truck/train -> ignore.
TRAINID_TO_16 = _lut({c: i for i, c in enumerate(TRAIN_IDS_16)})
# Raw Mapillary Vistas v1.2 class id (66 classes) -> train id, the table of HRDA (dg branch)
# tools/convert_datasets/mapillary.py and RobustNet datasets/mapillary.py; everything else -> ignore.
MAPILLARY_TO_TRAINID = _lut({13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7,
                             30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15,
                             58: 16, 57: 17, 52: 18})
MAPILLARY_V12_CLASSES = 66
TRAINID_TO_TRAINID = _lut({c: c for c in range(19)})  # labels stored as train ids: 19..254 -> ignore
# kind -> (PNG colour types of its 8-bit labels, what the file should be, value -> train id table)
LABEL_ENCODINGS = {
    "gta5": ((0, 3), "an 8-bit palette or grey PNG of Cityscapes label ids", LABELID_TO_TRAINID),
    "cityscapes": ((0,), "an 8-bit grey PNG of Cityscapes label ids (*_gtFine_labelIds.png)", LABELID_TO_TRAINID),
    "acdc": ((0, 3), "an 8-bit grey PNG of train ids (*_gt_labelTrainIds.png)", TRAINID_TO_TRAINID),
    "dark_zurich": ((0, 3), "an 8-bit grey PNG of train ids (*_gt_labelTrainIds.png)", TRAINID_TO_TRAINID),
    "bdd100k": ((0, 3), "an 8-bit grey PNG of train ids (labels/sem_seg/masks/<split>/<stem>.png)", TRAINID_TO_TRAINID),
    "mapillary": ((0, 3), "an 8-bit palette PNG of Mapillary Vistas v1.2 class ids", MAPILLARY_TO_TRAINID),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DATASET_SPLITS = {"gta5": ("train",), "synthia": ("train",), "cityscapes": ("train", "val", "test"),
                  "acdc": ("train", "val", "test"), "dark_zurich": ("train", "val", "test"),
                  "bdd100k": ("train", "val", "test"), "mapillary": ("train", "val", "test")}
# Splits published without labels: the benchmark test sets, and Dark Zurich train (DAFormer issue #52).
IMAGE_ONLY_SPLITS = {("cityscapes", "test"), ("acdc", "test"), ("dark_zurich", "train"), ("dark_zurich", "test"),
                     ("bdd100k", "test"), ("mapillary", "test")}
MAPILLARY_SPLITS = {"train": "training", "val": "validation", "test": "testing"}

# Normalisations (the authors' loaders; torchvision for ImageNet): (channel order, scale, mean, std) applied to 0-255 RGB.
NORMALISATIONS = {
    "imagenet_bgr": ("bgr", (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0)),   # DACS, ASN
    # ClassMix subtracts the Cityscapes RGB mean from a BGR image (docs/quirks.md Q6, kept).
    "cityscapes_bgr": ("bgr", (73.15835921, 82.90891754, 72.39239876), (1.0, 1.0, 1.0)),
    "imagenet_rgb": ("rgb", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),          # torchvision/DAFormer
}


def normalise(rgb, norm):
    """uint8 HxWx3 RGB array -> float32 3xHxW tensor in the pipeline's channel order, mean and std."""
    order, mean, std = NORMALISATIONS[norm]
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()
    if order == "bgr":
        x = x.flip(0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def normalise_batch(x, norm):
    """uint8 (N,3,H,W) RGB batch on any device -> float32 as `normalise` gives it: the same float32
    subtraction and division, which IEEE arithmetic rounds alike on every device (bit-identical)."""
    order, mean, std = NORMALISATIONS[norm]
    x = x.float()
    if order == "bgr":
        x = x.flip(1)
    return ((x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)).contiguous()


def denormalise(x, norm):
    """Inverse of `normalise` on a batch (N,3,H,W) -> RGB in [0, 1]."""
    order, mean, std = NORMALISATIONS[norm]
    x = x * x.new_tensor(std).view(1, 3, 1, 1) + x.new_tensor(mean).view(1, 3, 1, 1)
    return (x.flip(1) if order == "bgr" else x) / 255.0


def read_png_header(path):
    """(width, height, bit_depth, colour_type) of a PNG from its IHDR chunk, or None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return w, h, head[24], head[25]


def image_size(path):
    """(width, height) of an image file without decoding its pixels."""
    header = read_png_header(path)
    if header:
        return header[:2]
    with Image.open(path) as im:
        return im.size


def read_png_unchanged(path):
    """A PNG with its own bit depth and channel order, CxHxW (PIL would truncate 16-bit RGB to zeros)."""
    from torchvision.io import ImageReadMode, decode_png, read_file
    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_png(read_file(str(path)), ImageReadMode.UNCHANGED).numpy()


def read_rgb(path):
    """An image file as a uint8 HxWx3 RGB array; DataError if unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__})") from None


def check_label_header(path, kind):
    """DataError unless `path` starts as a label PNG of `kind` (its bit depth and colour type; 29 bytes read)."""
    header = read_png_header(path)
    if header is None:
        raise DataError(f"{path}: unreadable label (expected a PNG file)")
    _, _, depth, ctype = header
    if kind == "synthia":  # 16-bit RGB(A), class id in channel 0; or an 8-bit single-channel raw-id map
        if not ((depth == 16 and ctype in (2, 6)) or (depth == 8 and ctype == 0)):
            raise DataError(f"{path}: unexpected label encoding (bit depth {depth}, colour type {ctype}); "
                            f"expected SYNTHIA GT/LABELS 16-bit RGB with the class id in the first channel")
    elif depth != 8 or ctype not in LABEL_ENCODINGS[kind][0]:
        raise DataError(f"{path}: unexpected label encoding (bit depth {depth}, colour type {ctype}); "
                        f"expected {LABEL_ENCODINGS[kind][1]}")
    return header


SAME_SIZE_KINDS = ("cityscapes", "acdc", "dark_zurich")   # every label at its image's size (GTA5 has exceptions)


def check_file_headers(pairs, kind):
    """DataError for the first image that is not a PNG/JPEG, label that is not `kind`'s encoding, or (Cityscapes,
    ACDC, Dark Zurich) label of another size than its image, from the files' first bytes only: damaged or
    misplaced files stop a run before it writes anything (a file cut short after its header is found when it is
    read; check-data reads everything)."""
    for img, lab in pairs:
        image = read_png_header(img)
        if image is None:
            with open(img, "rb") as f:
                if f.read(3) != b"\xff\xd8\xff":
                    raise DataError(f"{img}: unreadable image (expected a PNG or JPEG file)")
        if lab is not None:
            label = check_label_header(lab, kind)
            if kind in SAME_SIZE_KINDS and image is not None and image[:2] != label[:2]:
                raise DataError(f"{lab}: a {label[0]}x{label[1]} label for the {image[0]}x{image[1]} image "
                                f"{Path(img).name} (expected the same size in the {kind} layout)")


def read_label(path, kind):
    """Read a label file of `kind` (DATASET_FOLDERS) as uint8 train ids (19 classes, void=255)."""
    check_label_header(path, kind)
    try:
        if kind == "synthia":
            raw = read_png_unchanged(path)[0]
            return SYNTHIA_TO_TRAINID[np.minimum(raw.astype(np.int64), 255)]
        table = LABEL_ENCODINGS[kind][2]
        with Image.open(path) as im:
            raw = np.asarray(im)
        if kind == "mapillary" and raw.max() >= MAPILLARY_V12_CLASSES:
            raise DataError(f"{path}: class id {raw.max()} is not a Mapillary Vistas v1.2 id (expected 0-65; "
                            f"v2.0 labels have 124 classes and no 19-class mapping)")
        return table[raw]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable label ({exc.__class__.__name__})") from None


def _require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: folder not found (expected {what})")
    return path


class SplitFolder(NamedTuple):
    """One image folder of a split (searched recursively; ACDC/Dark Zurich's `<split>_ref` reference images are
    in sibling folders, never below it) and its labels: the label of
    image <rel>/<stem>.<ext> is labels/<rel>/`label_name` with {stem}; files in `labels` ending in
    `label_name`'s suffix must pair, except those ending in one of `side_suffixes` (converted copies)."""
    images: Path
    labels: Path | None        # None: the split publishes no labels (image-only)
    label_name: str
    images_what: str
    labels_what: str = ""
    side_suffixes: tuple = ()

    def label_of(self, image):
        return self.labels / image.parent.relative_to(self.images) / self.label_name.format(stem=stem_of(image))

    def is_label(self, path):
        name = path.name
        return name.endswith(self.label_name.format(stem="")) and not name.endswith(self.side_suffixes)


def split_folders(kind, root, split, conditions=None):
    """The SplitFolders of one split of a dataset in its official layout (README 'Datasets'); `conditions`
    picks ACDC conditions (default all four) and is ignored for other kinds."""
    root = Path(root)
    if split not in DATASET_SPLITS[kind]:
        raise DataError(f"{root}: {kind} has no split {split!r} (expected {'|'.join(DATASET_SPLITS[kind])})")
    labeled = (kind, split) not in IMAGE_ONLY_SPLITS
    if kind == "gta5":
        return [SplitFolder(root / "images", root / "labels", "{stem}.png", "GTA5 images/*.png", "GTA5 labels/*.png")]
    if kind == "synthia":
        labels = root / "GT" / "LABELS"
        if not labels.is_dir() and (root / "synthia_mapped_to_cityscapes").is_dir():
            labels = root / "synthia_mapped_to_cityscapes"
        return [SplitFolder(root / "RGB", labels, "{stem}.png", "SYNTHIA RGB/*.png", "SYNTHIA GT/LABELS/*.png")]
    if kind == "cityscapes":
        images = next((d for d in (root / "leftImg8bit" / split,
                                   root / "leftImg8bit_trainvaltest" / "leftImg8bit" / split) if d.is_dir()),
                      root / "leftImg8bit" / split)
        labels = next((d for d in (root / "gtFine" / split, root / "gtFine_trainvaltest" / "gtFine" / split)
                       if d.is_dir()), root / "gtFine" / split)
        return [SplitFolder(images, labels if labeled else None, "{stem}_gtFine_labelIds.png",
                            f"Cityscapes leftImg8bit/{split}/<city>/*_leftImg8bit.png",
                            f"Cityscapes gtFine/{split}/<city>/*_gtFine_labelIds.png")]
    if kind == "acdc":
        chosen = [c for c in ACDC_CONDITIONS if c in (conditions or ACDC_CONDITIONS)]
        unknown = sorted(set(conditions or ()) - set(ACDC_CONDITIONS))
        if unknown or not chosen:
            raise DataError(f"ACDC conditions {','.join(conditions)}: expected some of {','.join(ACDC_CONDITIONS)}")
        if any((root / "rgb_anon" / c).is_dir() for c in ACDC_CONDITIONS):   # the official nested layout
            return [SplitFolder(root / "rgb_anon" / c / split, root / "gt" / c / split if labeled else None,
                                "{stem}_gt_labelTrainIds.png", f"ACDC rgb_anon/{c}/{split}/<seq>/*_rgb_anon.png",
                                f"ACDC gt/{c}/{split}/<seq>/*_gt_labelTrainIds.png") for c in chosen]
        if len(chosen) < len(ACDC_CONDITIONS):
            raise DataError(f"{root / 'rgb_anon'}: no condition folders (expected the official rgb_anon/<condition>/"
                            f"{split}/ layout to pick conditions {','.join(chosen)})")
        return [SplitFolder(root / "rgb_anon" / split, root / "gt" / split if labeled else None,
                            "{stem}_gt_labelTrainIds.png", f"ACDC rgb_anon/<condition>/{split}/<seq>/*_rgb_anon.png "
                            f"(or the flattened rgb_anon/{split}/)", f"ACDC gt/{split}/*_gt_labelTrainIds.png")]
    if kind == "dark_zurich":   # night only: the twilight/day train images and *_ref folders are never read
        return [SplitFolder(root / "rgb_anon" / split / "night", root / "gt" / split / "night" if labeled else None,
                            "{stem}_gt_labelTrainIds.png", f"Dark Zurich rgb_anon/{split}/night/<seq>/*_rgb_anon.png",
                            f"Dark Zurich gt/{split}/night/<seq>/*_gt_labelTrainIds.png")]
    if kind == "bdd100k":
        if (root / "images" / "10k").is_dir():   # the current download; else the legacy seg/ layout
            return [SplitFolder(root / "images" / "10k" / split,
                                root / "labels" / "sem_seg" / "masks" / split if labeled else None, "{stem}.png",
                                f"BDD100K images/10k/{split}/*.jpg", f"BDD100K labels/sem_seg/masks/{split}/*.png")]
        return [SplitFolder(root / "images" / split, root / "labels" / split if labeled else None,
                            "{stem}_train_id.png", f"BDD100K images/10k/{split}/*.jpg (or legacy images/{split}/)",
                            f"BDD100K labels/{split}/*_train_id.png")]
    if kind == "mapillary":
        base = root / MAPILLARY_SPLITS[split]
        labels = base / "labels"
        if labeled and not labels.is_dir() and (base / "v1.2" / "labels").is_dir():   # the v2.0 download's v1.2 copy
            labels = base / "v1.2" / "labels"
        elif labeled and not labels.is_dir() and (base / "v2.0").is_dir():
            raise DataError(f"{base / 'v2.0'}: Mapillary Vistas v2.0 labels (124 classes); expected the v1.2 "
                            f"labels (66 classes) in {labels} or {base / 'v1.2' / 'labels'}")
        return [SplitFolder(base / "images", labels if labeled else None, "{stem}.png",
                            f"Mapillary Vistas {base.name}/images/*.jpg",
                            f"Mapillary Vistas v1.2 {base.name}/labels/*.png", ("_labelTrainIds.png",))]
    raise ValueError(kind)


def find_pairs(folder, strict=True):
    """Sorted (image, label) pairs of a SplitFolder ((image, None) for image-only splits); orphans listed both
    ways (DataError when `strict` and any exist)."""
    images_dir = _require_dir(folder.images, folder.images_what)
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if folder.labels is None:
        return [(img, None) for img in images], []
    _require_dir(folder.labels, folder.labels_what)
    pairs, orphans = [], []
    for img in images:
        lab = folder.label_of(img)
        (pairs.append((img, lab)) if lab.is_file() else orphans.append(str(img)))
    labelled = {str(lab) for _, lab in pairs}
    orphans += [str(p) for p in sorted(folder.labels.rglob("*.png")) if str(p) not in labelled and folder.is_label(p)]
    if strict and orphans:
        raise DataError(f"{orphans[0]}: has no matching image/label ({len(orphans)} orphan(s) in {images_dir})")
    return pairs, orphans


def dataset_files(kind, root, split="train", strict=True, conditions=None):
    """(pairs, orphans) for a dataset in its official layout (README 'Datasets'); image-only splits (test
    splits, Dark Zurich train) pair each image with None. A dataset folder of a prepared root lists the original
    it was made from."""
    manifest = read_prepared_manifest(Path(root).parent)
    if manifest is not None:
        root = prepared_original(Path(root).parent, manifest, kind)
    root = _require_dir(root, f"the {kind} dataset root")
    pairs, orphans = [], []
    for folder in split_folders(kind, root, split, conditions):
        found, lost = find_pairs(folder, strict)
        if strict and not found:
            what = "images" if folder.labels is None else "image/label pairs"
            raise DataError(f"{folder.images}: no {what} found (expected {folder.images_what})")
        pairs, orphans = pairs + found, orphans + lost
    return pairs, orphans


def dataset_stems(kind, root, split="train", conditions=None):
    """The stems of a split's images, in dataset_files' order (the labeled split is drawn from them)."""
    return [stem_of(img) for img, _ in dataset_files(kind, root, split, conditions=conditions)[0]]


def stem_of(path):
    """Image stem as used in split.txt and predictions: Cityscapes `<city>_<seq>_<frame>`, ACDC/Dark Zurich
    `<seq>_frame_<NNNNNN>`, else the file name without its image extension."""
    name = Path(path).name
    for suffix in ("_leftImg8bit.png", "_rgb_anon.png", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix.lower()):
            return name[:-len(suffix)]
    return name


def label_or_image(pair):
    """The file whose size is the full label resolution of a pair: its label, or the image of an image-only split."""
    return pair[0] if pair[1] is None else pair[1]


def condition_of(path):
    """The ACDC condition (fog|night|rain|snow) of an image in the nested layout (rgb_anon/<condition>/...), or None."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "rgb_anon" and parts[i + 1] in ACDC_CONDITIONS:
            return parts[i + 1]
    return None


def labeled_split(stems, n_labeled, seed=0, split_file=None):
    """(labeled, unlabeled) stems: sorted list, `RandomState(seed)` permutation, first N labeled (README 'Label spaces and the labeled split').

    The permutation only depends on the seed and the list, so splits are nested across N.
    `split_file` (one stem per line, e.g. a previous run's split.txt) overrides the draw.
    """
    stems = sorted(stems)
    if split_file is not None:
        path = Path(split_file)
        if not path.is_file():
            raise DataError(f"{path}: split file not found (expected one image stem per line)")
        chosen = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        unknown = sorted(set(chosen) - set(stems))
        if unknown:
            raise DataError(f"{path}: stem {unknown[0]!r} is not a Cityscapes train image")
        chosen_set = set(chosen)
        if len(chosen_set) < len(chosen):
            twice = next(s for i, s in enumerate(chosen) if s in chosen[:i])
            raise DataError(f"{path}: stem {twice!r} is listed twice (one stem per labeled image expected)")
        return chosen, [s for s in stems if s not in chosen_set]
    if not 0 <= n_labeled <= len(stems):
        raise DataError(f"--n-labeled {n_labeled}: expected 0..{len(stems)} (train images found)")
    order = np.random.RandomState(seed).permutation(len(stems))
    labeled = sorted(stems[i] for i in order[:n_labeled])
    labeled_set = set(labeled)
    return labeled, [s for s in stems if s not in labeled_set]


def item_seed(seed, stream, iteration, slot):
    """The seed of one sample draw: a function of (run seed, data stream, iteration, batch slot) only."""
    return int(np.random.SeedSequence([seed, stream, iteration, slot]).generate_state(1)[0])


class IterationSampler(torch.utils.data.Sampler):
    """Batch sampler for training: iteration i's images and crop seeds follow from (seed, stream, i, rank).

    Images are drawn epoch by epoch from a seeded permutation; yields lists of (index, item_seed, -1).
    Under torchrun, rank r of `world` takes slots r*b..r*b+b-1 of a global batch of world*b: the K
    processes together draw what one process with batch K*b draws, and rank 0 of 1 is today's draw.
    """

    def __init__(self, n, batch_size, seed, stream, start_iter=0, num_iters=None, rank=0, world=1):
        self.n, self.bs, self.seed, self.stream = n, batch_size, seed, stream
        self.start, self.num_iters, self.rank, self.world = start_iter, num_iters, rank, world
        self._epoch = (None, None)  # (epoch, its permutation): the last one drawn

    def permutation(self, epoch):
        """The image order of one epoch, a function of (seed, stream, epoch) only."""
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n))
        return self._epoch[1]

    def slots(self):
        """This rank's slots of the global batch."""
        return range(self.rank * self.bs, (self.rank + 1) * self.bs)

    def batch(self, i):
        out = []
        for k in self.slots():
            pos = i * self.bs * self.world + k
            index = int(self.permutation(pos // self.n)[pos % self.n])
            out.append((index, item_seed(self.seed, self.stream, i, k), -1))
        return out

    def __iter__(self):
        i = self.start
        while self.num_iters is None or i < self.num_iters:
            yield self.batch(i)
            i += 1

    def __len__(self):
        return (self.num_iters or 2 ** 31) - self.start


def class_pixel_counts(dataset, index):
    """{class: pixels} of one label map at its original resolution, in the dataset's label space."""
    hist = np.bincount(dataset.map_label(read_label(dataset.pairs[index][1], dataset.kind)).ravel(), minlength=256)
    return {c: int(hist[c]) for c in range(dataset.num_classes) if hist[c] > 0}


def rcs_statistics(dataset, cache=None, workers=0):
    """Per-image class pixel counts at original resolution (DAFormer RCS), read by `workers` processes
    (GTA5's 24966 labels take minutes) and cached as JSON."""
    if cache is not None and Path(cache).is_file():
        return [{int(k): v for k, v in d.items()} for d in json.loads(Path(cache).read_text())]
    if workers > 0:
        import functools
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            counts = pool.map(functools.partial(class_pixel_counts, dataset), range(len(dataset)), chunksize=64)
    else:
        counts = [class_pixel_counts(dataset, i) for i in range(len(dataset))]
    if cache is not None:
        atomic_write_text(cache, json.dumps(counts))
    return counts


def rcs_probabilities(counts, num_classes, temperature=0.01, min_pixels=3000):
    """P(c) = softmax((1 - f_c)/T) over occurring classes and images_with(c) (rare-class sampling of DAFormer, Hoyer et al., CVPR 2022)."""
    total = np.zeros(num_classes)
    for d in counts:
        for c, n in d.items():
            total[c] += n
    classes = [c for c in range(num_classes) if total[c] > 0]
    freq = total[classes] / total[classes].sum()
    logits = (1 - freq) / temperature
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    images_with = {c: [i for i, d in enumerate(counts) if d.get(c, 0) > min_pixels] for c in classes}
    keep = [k for k, c in enumerate(classes) if images_with[c]]  # a class with no qualifying image is dropped
    if not keep:
        raise DataError(f"rare-class sampling: no image holds more than {min_pixels} pixels of any class "
                        f"(lower --rcs-min-pixels or use --rcs none)")
    prob = prob[keep] / prob[keep].sum()
    classes = [classes[k] for k in keep]
    return classes, prob, {c: images_with[c] for c in classes}


class RareClassSampler(IterationSampler):
    """Batch sampler for rare-class sampling: c ~ P, then an image with c; yields (index, item_seed, c)."""

    def __init__(self, counts, num_classes, batch_size, seed, stream, start_iter=0, num_iters=None,
                 temperature=0.01, min_pixels=3000, rank=0, world=1):
        super().__init__(len(counts), batch_size, seed, stream, start_iter, num_iters, rank, world)
        self.classes, self.prob, self.images_with = rcs_probabilities(counts, num_classes, temperature,
                                                                      min_pixels)

    def batch(self, i):
        out = []
        for k in self.slots():
            s = item_seed(self.seed, self.stream, i, k)
            rng = np.random.default_rng([s, 1])
            c = self.classes[rng.choice(len(self.classes), p=self.prob)]
            out.append((int(rng.choice(self.images_with[c])), s, int(c)))
        return out


class BalancedSampler(IterationSampler):
    """1:1 stream of two image sets listed one after the other (DLDM's ground-truth then pseudo-labeled
    images): even iterations draw from the first n_a, odd ones from the next n_b, each from its own seeded
    epoch order."""

    def __init__(self, n_a, n_b, batch_size, seed, stream, start_iter=0, num_iters=None, rank=0, world=1):
        super().__init__(n_a + n_b, batch_size, seed, stream, start_iter, num_iters, rank, world)
        self.a = IterationSampler(n_a, batch_size, seed, stream * 10 + 1, rank=rank, world=world)
        self.b = IterationSampler(n_b, batch_size, seed, stream * 10 + 2, rank=rank, world=world)
        self.n_a = n_a

    def batch(self, i):
        if i % 2 == 0:
            return self.a.batch(i // 2)
        return [(self.n_a + index, s, c) for index, s, c in self.b.batch(i // 2)]


def resize_image(rgb, size, interp):
    """HxWx3 uint8 image to size (W, H): PIL's antialiased 'bilinear'/'bicubic', or 'cv2' = OpenCV's
    INTER_LINEAR as mmcv.imresize calls it (half-pixel centres, no antialiasing; float arithmetic, so a
    value can differ from OpenCV's fixed-point result by one grey level)."""
    if interp != "cv2":
        return np.asarray(Image.fromarray(rgb).resize(size, {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interp]))
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label, size, interp):
    """Label map to size (W, H) by nearest neighbour: PIL's (pixel centres) or, for 'cv2', OpenCV's
    INTER_NEAREST (source index floor(i * scale), which torch's 'nearest' also uses)."""
    if interp != "cv2":
        return np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    y = torch.from_numpy(np.array(label))[None, None].float()
    return F.interpolate(y, size=(size[1], size[0]), mode="nearest")[0, 0].to(torch.uint8).numpy()


# Prepared roots (`python common.py prepare-data`, README 'Prepared data'): the deterministic part of a
# pipeline (decode, label mapping, the full-frame resize) written once as raw uint8 .npy files, which the
# loader memory-maps and crops. Layout: <out>/prepared.json (the manifest), and per frame set
# <out>/<kind>/<W>x<H>_<interp>[_keep]/{index.json, <image path relative to the dataset root>.{rgb,label}.npy}.
# The original data root stays the source of the file lists and of full-resolution labels.
PREPARED_MANIFEST = "prepared.json"
PREPARED_KINDS = ("gta5", "synthia", "cityscapes")
INTERPOLATIONS = {"bilinear": "PIL bilinear (antialiased), PIL nearest labels",
                  "bicubic": "PIL bicubic (antialiased), PIL nearest labels",
                  "cv2": "OpenCV-style bilinear (mmcv), OpenCV nearest labels"}
# prepare-data --pipeline: the resize steps of each script's default run; {source} = SOURCE_FRAMES[--source].
SOURCE_FRAMES = {"gta5": "gta5:1280x720", "synthia": "synthia:1280x760"}
PIPELINE_FRAMES = {
    "dacs": ("{source}:bicubic", "cityscapes:1024x512:bilinear"),
    "camix": ("{source}:bicubic", "cityscapes:2048x1024:bilinear", "cityscapes:1024x512:bilinear"),
    "classmix_ssl": ("cityscapes:1024x512:bilinear",),
    "iidm": ("{source}:cv2:keep", "cityscapes:1024x512:cv2"),
    "asss": ("{source}:bicubic", "cityscapes:1024x512:bicubic", "cityscapes:1024x512:bilinear"),
}


def frames_spec(kind, resize, keep_ratio, interp):
    """The key of a frame set: the settings that fix the resized frames, e.g. 'gta5:1280x720:bicubic'."""
    return f"{kind}:{resize[0]}x{resize[1]}:{interp}" + ":keep" * bool(keep_ratio)


def parse_frames_spec(text):
    """(kind, (W, H), keep_ratio, interp) of a frame-set key; DataError naming it if malformed."""
    parts = text.split(":")
    try:
        w, h = (int(v) for v in parts[1].split("x"))
        ok = (parts[0] in PREPARED_KINDS and parts[2] in INTERPOLATIONS and w > 0 and h > 0
              and parts[3:] in ([], ["keep"]))
    except (IndexError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"--frames {text}: expected KIND:WxH:INTERP[:keep] (KIND gta5|synthia|cityscapes, "
                        f"INTERP {'|'.join(INTERPOLATIONS)}; e.g. gta5:1280x720:bicubic)")
    return parts[0], (w, h), parts[3:] == ["keep"], parts[2]


def frames_dir(prepared_root, spec):
    """The folder of one frame set inside a prepared root."""
    kind, (w, h), keep_ratio, interp = parse_frames_spec(spec)
    return Path(prepared_root) / kind / f"{w}x{h}_{interp}{'_keep' * keep_ratio}"


def read_prepared_manifest(folder):
    """The manifest of a prepared root, or None if `folder` is not one."""
    path = Path(folder) / PREPARED_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not {"data_root", "frames"} <= manifest.keys():
        raise DataError(f"{path}: not a prepare-data manifest (prepare the root again)")
    return manifest


def prepared_original(prepared_root, manifest, kind):
    """The original folder of a dataset behind a prepared root; DataError for a kind prepare-data does not make."""
    if kind not in PREPARED_KINDS:
        raise DataError(f"{Path(prepared_root) / PREPARED_MANIFEST}: a prepared root holds "
                        f"{'/'.join(PREPARED_KINDS)} frames only; expected the original data root for {kind} "
                        f"(--data-root {manifest['data_root']} or --{kind.replace('_', '-')}-root)")
    return Path(manifest["data_root"]) / kind


def prepared_frames(prepared_root, manifest, kind, resize, keep_ratio, interp):
    """(original dataset root, frame-set folder or None) for a dataset read from a prepared root: None when
    the pipeline has no resize step; DataError naming the mismatch when no frame set fits its settings."""
    original = prepared_original(prepared_root, manifest, kind)
    if resize is None:
        return original, None
    spec = frames_spec(kind, resize, keep_ratio, interp)
    if spec not in manifest["frames"]:
        made = ", ".join(s for s in manifest["frames"] if s.startswith(kind + ":")) or f"no {kind} frames"
        raise DataError(f"{Path(prepared_root) / PREPARED_MANIFEST}: prepared for {made}; this run needs {spec} "
                        f"(add it: python common.py prepare-data --data-root {manifest['data_root']} "
                        f"--out {prepared_root} --frames {spec})")
    return original, frames_dir(prepared_root, spec)


def load_frame(path):
    """A prepared uint8 frame, memory-mapped (a crop reads only its rows); DataError if unreadable."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable prepared frame ({exc.__class__.__name__}; prepare the root "
                        f"again)") from None


def target_keeps_ratio(stack, kind):
    """Whether a run's target train and val images are fit into its resize keeping their ratio: with the MiT
    stacks (mmseg's Resize) and for ACDC/Dark Zurich (DAFormer's/HRDA's cs2acdc/cs2darkzurich pipelines); a
    DeepLabv2 run resizes Cityscapes exactly (DACS, ClassMix, AdaptSegNet)."""
    return stack != "deeplabv2" or kind != "cityscapes"


def keep_ratio_size(w, h, size):
    """(W, H) of a w x h image fit into `size` keeping its ratio (mmseg Resize, keep_ratio: the long side within
    the long side of `size`, the short within the short)."""
    long_side, short_side = max(size), min(size)
    scale = min(long_side / max(w, h), short_side / min(w, h))
    return int(w * scale + 0.5), int(h * scale + 0.5)


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label pairs of one dataset with one pipeline (README 'Pipelines').

    resize: (W, H) or None; keep_ratio fits the image into (W, H) like mmseg; interp: 'bilinear'/'bicubic'
    (PIL, antialiased, as the AdaptSegNet/DACS loaders) or 'cv2' (mmcv/DAFormer, see resize_image). crop: (h, w) random crop after the
    resize (padded with ignore if larger); cat_max_ratio: mmseg's retry rule; flip: h-flip p=0.5.
    label_res: 'input' (label resized with the image) or 'full' (label at its own resolution, eval only).
    An image-only split (pairs (image, None)) gives an all-ignore label of the size a label would have.
    conditions: the ACDC conditions to read (default all four).
    num_classes 16 maps train ids to the 16-class space. Items are (index, item_seed, rcs_class) tuples
    from a sampler, or plain indices (evaluation: no randomness). A root inside a prepared root (its parent
    holds prepared.json) reads the frame set of exactly these resize settings, bit-identical to resizing
    the original; a prepared root without it is refused.
    """

    def __init__(self, kind, root, split="train", resize=None, keep_ratio=False, interp="bilinear",
                 crop=None, cat_max_ratio=None, flip=False, norm="imagenet_bgr", num_classes=19,
                 label_res="input", stems=None, rcs_min_crop_pixels=1500, conditions=None):
        self.kind, self.split, self.norm, self.num_classes = kind, split, norm, num_classes
        if interp not in INTERPOLATIONS:
            raise ValueError(f"interp {interp!r}")
        self.frames = None  # the prepared frame set read instead of decoding and resizing, if any
        manifest = read_prepared_manifest(Path(root).parent)
        if manifest is not None:
            root, self.frames = prepared_frames(Path(root).parent, manifest, kind, resize, keep_ratio, interp)
        self.root = Path(root)
        self.pairs = dataset_files(kind, root, split, conditions=conditions)[0]
        if self.frames is not None:
            index = json.loads((self.frames / "index.json").read_text()).get(split)
            if index is None:
                raise DataError(f"{self.frames}: holds no {split} frames (prepare-data writes train and val; "
                                f"expected the original data root for the {split} split)")
            if index != [str(img.relative_to(self.root)) for img, _ in self.pairs]:
                raise DataError(f"{self.frames}: prepared from {len(index or [])} {split} images, but {self.root} "
                                f"now holds {len(self.pairs)} or other ones (prepare the root again)")
        if stems is not None:
            by_stem = {stem_of(img): (img, lab) for img, lab in self.pairs}
            self.pairs = [by_stem[s] for s in stems]
        check_file_headers(self.pairs, kind)
        self.resize, self.keep_ratio, self.crop, self.interp = resize, keep_ratio, crop, interp
        self.cat_max_ratio, self.flip, self.label_res = cat_max_ratio, flip, label_res
        self.rcs_min_crop_pixels = rcs_min_crop_pixels
        self.normalise_on_device = False

    def uint8_items(self):
        """A copy whose items hold the uint8 image (3,H,W) and label and the name of the normalisation, which
        training.next_batch applies on the device: a quarter of the bytes to copy, no float work in workers."""
        out = copy.copy(self)
        out.normalise_on_device = True
        return out

    def __len__(self):
        return len(self.pairs)

    def stems(self):
        return [stem_of(img) for img, _ in self.pairs]

    def map_label(self, label):
        """19-class train ids -> this dataset's label space."""
        return TRAINID_TO_16[label] if self.num_classes == 16 else label

    def target_size(self, w, h):
        """Size after the resize step (mmseg keep-ratio rule: fit the long and short sides)."""
        if self.resize is None:
            return w, h
        return keep_ratio_size(w, h, self.resize) if self.keep_ratio else tuple(self.resize)

    def resized(self, rgb, label):
        """The image resized by the pipeline's rule and the label brought to the image's size."""
        h, w = rgb.shape[:2]
        size = self.target_size(w, h)
        if size != (w, h):
            rgb = resize_image(rgb, size, self.interp)
        if label.shape != rgb.shape[:2]:  # also fixes GTA5's size-mismatched pairs, as the resize does there
            label = resize_label(label, rgb.shape[1::-1], self.interp)
        return rgb, label

    def load(self, index):
        """Resized RGB image, label (dataset label space) and the label at its original size (from a
        prepared root read only when label_res is 'full', else None)."""
        img_path, lab_path = self.pairs[index]
        if self.frames is not None:
            base = self.frames / img_path.relative_to(self.root).with_suffix("")
            full = self.map_label(read_label(lab_path, self.kind)) if self.label_res == "full" else None
            return load_frame(f"{base}.rgb.npy"), self.map_label(load_frame(f"{base}.label.npy")), full
        rgb = read_rgb(img_path)
        if lab_path is None:   # image-only split: nothing to score, same shapes as a labeled item
            label = np.full(rgb.shape[:2], IGNORE, dtype=np.uint8)
        else:
            label = self.map_label(read_label(lab_path, self.kind))
        return (*self.resized(rgb, label), label)

    def random_crop(self, rgb, label, rng):
        """Crop box by the pipeline's rules (padding with ignore if too small), then the random flip."""
        if self.crop is None or tuple(self.crop) == (0, 0):
            out = rgb, label
        else:
            ch, cw = self.crop
            if rgb.shape[0] < ch or rgb.shape[1] < cw:  # thesis §3.4: zero-pad the image, ignore the label
                ph, pw = max(ch - rgb.shape[0], 0), max(cw - rgb.shape[1], 0)
                rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)))
                label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
            box = lambda: (int(rng.integers(0, rgb.shape[0] - ch + 1)),  # noqa: E731
                           int(rng.integers(0, rgb.shape[1] - cw + 1)))
            y0, x0 = box()
            for _ in range(10 if self.cat_max_ratio else 0):  # mmseg: after 10 failures the 11th box is kept
                counts = np.bincount(label[y0:y0 + ch, x0:x0 + cw].ravel(), minlength=256)[:IGNORE]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y0, x0 = box()
            out = rgb[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
        if self.flip and rng.random() < 0.5:
            out = out[0][:, ::-1], out[1][:, ::-1]
        return out

    def __getitem__(self, item):
        index, seed, required_class = (item, 0, -1) if isinstance(item, int) else item
        return self.sample(index, seed, required_class, *self.load(index))

    def sample(self, index, seed, required_class, rgb, label, full):
        """The item of a loaded image: seeded crop (retried for RCS), flip, label resolution, normalisation."""
        rng = np.random.default_rng(seed)
        for _ in range(10 if required_class >= 0 else 1):  # RCS: retry the crop on the same image
            x, y = self.random_crop(rgb, label, rng)
            if required_class < 0 or (y == required_class).sum() > self.rcs_min_crop_pixels:
                break
        return self.item(x, full if self.label_res == "full" else y, index)

    def item(self, x, y, index):
        """The item of a cropped HxWx3 uint8 image and its label: uint8 tensors and the normalisation's name
        (uint8_items), or the normalised float image and int64 label."""
        if self.normalise_on_device:
            return {"image": torch.from_numpy(np.array(np.transpose(x, (2, 0, 1)), order="C")),
                    "label": torch.from_numpy(np.array(y, order="C")), "index": index, "norm": self.norm}
        return {"image": normalise(x, self.norm), "label": torch.from_numpy(np.array(y)).long(),
                "index": index}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it onto `path` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, a signal) leaves no temp file behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    """Write a text file via temp file + rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ======================================================================================
# Mixing and augmentation on GPU batches; randomness from a CPU torch.Generator, copied
# to the batch's device with non_blocking=True (a blocking host-to-device copy would sync the stream)
# ======================================================================================

def class_mix_mask(labels, generator, rule="floor", drop_ignore=True, batch_union=False):
    """(N,H,W) float mask of a random half of the classes present in each label map (ClassMix).

    rule 'floor' picks floor(n/2) of the n classes (ClassMix SSL: n=1 gives an empty mask), 'ceil'
    picks ceil(n/2) (DACS). With drop_ignore=False the ignore value is a candidate like a class (DACS).
    batch_union draws each image's classes from the union over the batch (DAFormer get_class_masks).
    """
    n_img = labels.shape[0]
    present = torch.zeros(n_img, 256, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.reshape(n_img, -1).long(), True)
    if batch_union:
        present = present.any(0, keepdim=True).expand(n_img, -1).clone()
    if drop_ignore:
        present[:, IGNORE] = False
    count = present.sum(1)
    k = count // 2 if rule == "floor" else (count + 1) // 2
    scores = torch.rand(n_img, 256, generator=generator).to(labels.device, non_blocking=True)
    scores = scores.masked_fill(~present, 2.0)  # absent classes rank last
    rank = scores.argsort(1).argsort(1)
    chosen = present & (rank < k[:, None])
    return class_mask(labels, chosen)


def class_mask(labels, chosen):
    """1.0 where a pixel's class is chosen: labels (N,H,W), chosen (N,256) bool."""
    return chosen.gather(1, labels.reshape(labels.shape[0], -1).long()).view(labels.shape).float()


def mix_pairs(mask, a):
    """ClassMix: out_i = M_i * a_i + (1 - M_i) * a_{(i+1) mod N}, for images (N,C,H,W) or maps (N,H,W)."""
    return one_mix(mask, a, a.roll(-1, 0))


def one_mix(mask, a, b):
    """DACS: paste the masked pixels of a onto b (M * a + (1 - M) * b), batched over pairs."""
    m = mask if a.dim() == mask.dim() else mask.unsqueeze(1)
    out = m * a + (1 - m) * b
    return out.to(a.dtype) if not a.is_floating_point() else out


def outside_boxes(boxes, h, w, device="cpu"):
    """(n,h,w) float mask, 0 inside each image's box, 1 elsewhere; boxes (n,4) host ints (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = boxes.to(device, non_blocking=True).view(-1, 4, 1, 1).unbind(1)
    ys, xs = torch.arange(h, device=device)[None, :, None], torch.arange(w, device=device)[None, None, :]
    return (~((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))).float()


def cutmix_mask(n, h, w, generator, device="cpu"):
    """CutMix (ClassMix's ablation, CAMix's Table 2): a box of area HW/2, width U{W/2..W}; mask 0 inside, 1 outside."""
    area = h * w / 2
    bw = torch.randint(math.ceil(w / 2), w + 1, (n,), generator=generator)
    bh = (area / bw).round().clamp(max=h).long()
    x0 = (torch.rand(n, generator=generator) * (w - bw + 1)).long()
    y0 = (torch.rand(n, generator=generator) * (h - bh + 1)).long()
    return outside_boxes(torch.stack([y0, y0 + bh, x0, x0 + bw], 1), h, w, device)


def cowmix_mask(n, h, w, generator, device="cpu", sigma_range=(8.0, 32.0), p=0.5):
    """CowMix (ClassMix's ablation, CAMix's Table 2): Gaussian noise smoothed with sigma log-uniform in range, cut where a normal
    distribution with the smoothed noise's mean and std has mass p below (CowMask's erfinv threshold)."""
    log_lo, log_hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    sigma = torch.exp(log_lo + torch.rand(n, generator=generator) * (log_hi - log_lo))
    noise = torch.randn(n, 1, h, w, generator=generator).to(device, non_blocking=True)
    smooth = blur_batch(noise, sigma.to(device, non_blocking=True),
                               kernel=(odd_kernel(h, 1.0), odd_kernel(w, 1.0)))
    flat = smooth.view(n, -1)
    std, mean = torch.std_mean(flat, dim=1, correction=0, keepdim=True)       # numpy's std
    threshold = torch.erfinv(torch.tensor(2 * p - 1.0)) * math.sqrt(2) * std + mean
    return (flat > threshold).float().view(n, h, w)


def odd_kernel(size, fraction=0.1):
    """ceil(fraction * size), minus one if even (DACS: 51 for 512), at least 1."""
    k = math.ceil(fraction * size)
    return max(k - 1 if k % 2 == 0 else k, 1)


def blur_batch(x, sigma, kernel):
    """Separable Gaussian blur with one sigma per image, reflect padding; x (N,C,H,W), kernel (kh, kw)."""
    n, c, h, w = x.shape
    out = x
    for dim, k in ((2, kernel[0]), (3, kernel[1])):
        r = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        g = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
        g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, k)
        weight = g.view(n * c, 1, k, 1) if dim == 2 else g.view(n * c, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2, 0, 0)
        out = F.conv2d(F.pad(out.reshape(1, n * c, h, w), pad, mode="reflect"), weight, groups=n * c)
    return out.view(n, c, h, w)


def gaussian_blur(x, generator, gate=0.5, sigma_range=(0.15, 1.15), per_image=True):
    """DACS blur: applied iff U(0,1) > gate; sigma ~ U(range) per image (or one per call); kernel 0.1 x side."""
    if torch.rand((), generator=generator).item() <= gate:
        return x
    n = x.shape[0]
    sigma = sigma_range[0] + torch.rand(n if per_image else 1, generator=generator) * (
        sigma_range[1] - sigma_range[0])
    return blur_batch(x, sigma.expand(n).to(x.device, non_blocking=True), (odd_kernel(x.shape[2]), odd_kernel(x.shape[3])))


def rgb_to_hsv(x, eps=1e-8):
    """(N,3,H,W) RGB in [0,1] -> hue in radians [0, 2pi), saturation, value (kornia's definition)."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    r, g, b = x.unbind(1)
    hue = torch.stack([(g - b) / (delta + eps) % 6, (b - r) / (delta + eps) + 2,
                       (r - g) / (delta + eps) + 4], 1).gather(1, argmax[:, None])[:, 0]
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue)) * (math.pi / 3) % (2 * math.pi)
    return hue, delta / (maxc + eps), maxc


def hsv_to_rgb(hue, sat, val):
    """Inverse of rgb_to_hsv."""
    h6 = hue / (math.pi / 3)
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], 1)
    return val[:, None] - (val * sat)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, norm, generator, strength=0.25, gate=0.2, per_image_order=False):
    """Kornia-0.3/0.5 ColorJitter on normalised images, applied iff U(0,1) > gate (80 %).

    brightness x + U(-s,s) (additive), contrast x * U(1-s,1+s) (no mean blending), saturation S * U(1-s,1+s)
    in HSV, hue + U(-s,s) turns, each followed by a clamp to [0,1]; factors per image; the op order is one
    random permutation per call (kornia 0.3, ClassMix/DACS) or per image (DAFormer, per_image_order).
    """
    if torch.rand((), generator=generator).item() <= gate:
        return x
    n, dev = x.shape[0], x.device
    f = (torch.rand(4, n, generator=generator) * 2 - 1) * strength  # brightness, contrast, saturation, hue
    order = torch.rand(n if per_image_order else 1, 4, generator=generator).argsort(1).expand(n, 4)
    img = denormalise(x.float(), norm)
    groups = order.unique(dim=0)  # the order is on the host: 4 ops per group of images sharing it, no sync
    out = torch.empty_like(img) if len(groups) > 1 else None
    for perm in groups:
        rows = (order == perm).all(1).nonzero()[:, 0]
        idx = rows.to(dev, non_blocking=True)
        y = img if out is None else img[idx]
        fg = f[:, rows].to(dev, non_blocking=True).view(4, -1, 1, 1, 1)
        for op in perm.tolist():
            if op == 0:
                y = (y + fg[0]).clamp(0, 1)
            elif op == 1:
                y = (y * (1 + fg[1])).clamp(0, 1)
            else:
                hue, sat, val = rgb_to_hsv(y)
                if op == 2:
                    sat = (sat * (1 + fg[2, :, 0])).clamp(0, 1)
                else:
                    hue = (hue + fg[3, :, 0] * 2 * math.pi) % (2 * math.pi)
                y = hsv_to_rgb(hue, sat, val).clamp(0, 1)
        if out is None:
            out = y
        else:
            out[idx] = y
    return renormalise(out, norm).to(x.dtype)


def renormalise(rgb01, norm):
    """RGB [0,1] batch -> the pipeline's normalisation (inverse of `denormalise`)."""
    order, mean, std = NORMALISATIONS[norm]
    x = rgb01 * 255.0
    x = x.flip(1) if order == "bgr" else x
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


# ======================================================================================
# Losses; logits are upsampled to the label size first (`upsample`)
# ======================================================================================

def ce_loss(logits, target, ignore=IGNORE):
    """Cross-entropy averaged over non-ignored pixels; a differentiable 0 when none is valid (no sync)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore, reduction="sum")
    return total / (target != ignore).sum().clamp(min=1)


def seg_loss(aux, main, y, aux_weight):
    """CE of the main head + aux_weight x CE of the aux head, logits upsampled (align_corners=True) to the label
    size (AdaptSegNet/AdvEnt multi-level); at weight 0 the aux head stays out of the graph."""
    size = y.shape[1:]
    loss = ce_loss(upsample(main, size), y)
    return loss + aux_weight * ce_loss(upsample(aux, size), y) if aux_weight else loss


def ce_pixel_weighted(logits, target, weight, ignore=IGNORE):
    """Per-pixel CE times a weight map, averaged over all B*H*W pixels including ignored ones (DACS)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore, reduction="none")
    return (ce * weight).mean()


def mse_softmax(logits, target_prob):
    """Squared error between the softmax of the logits and a soft target, mean over all elements."""
    return F.mse_loss(logits.float().softmax(1), target_prob)


def pseudo_label(teacher_logits, tau=0.968, mode="uniform", per_image=False):
    """(hard pseudo-label, weight map, max prob): weight q = share of pixels with max prob >= tau

    over the batch ('uniform', DACS threshold_uniform; per image with per_image) or the 0/1 map of
    those pixels ('pixel'), or 1 everywhere ('none').
    """
    max_prob, label = teacher_logits.float().softmax(1).max(1)
    confident = (max_prob >= tau).float()
    if mode == "pixel":
        return label, confident, max_prob
    if mode == "none":
        return label, torch.ones_like(max_prob), max_prob
    q = confident.mean((1, 2), keepdim=True) if per_image else confident.mean()
    return label, q * torch.ones_like(max_prob), max_prob


# ======================================================================================
# DAFormer training (Hoyer et al., CVPR 2022; lhoyer/DAFormer mmseg/models/uda/dacs.py):
# ImageNet feature distance on thing classes, pseudo-label crop, a teacher without stochastic depth
# ======================================================================================

FD_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # traffic light/sign, person ... bicycle (DAFormer cfg)


def thing_classes(num_classes=19):
    """The FD thing classes as output indices of a 19-way head, or of a 16-way (SYNTHIA) head."""
    return FD_THING_CLASSES if num_classes == 19 else tuple(TRAIN_IDS_16.index(c) for c in FD_THING_CLASSES
                                                            if c in TRAIN_IDS_16)


def downscale_label_ratio(labels, factor, min_ratio=0.75, num_classes=19):
    """(N,H,W) labels -> (N,H//f,W//f): each f x f cell's most frequent class (ignore counted as a class),
    ignore where that is ignore or its share is below min_ratio (DAFormer mmseg/utils/utils.py)."""
    x = labels.long().masked_fill(labels == IGNORE, num_classes)
    share, cell = F.avg_pool2d(F.one_hot(x, num_classes + 1).permute(0, 3, 1, 2).float(), factor).max(1)
    return cell.masked_fill((cell == num_classes) | (share < min_ratio), IGNORE)


def feature_distance_mask(labels, feature_width, classes, min_ratio=0.75, num_classes=19):
    """(N,h,w) bool: the feature cells whose downscaled source label is one of `classes` (DAFormer FD)."""
    cells = downscale_label_ratio(labels, labels.shape[-1] // feature_width, min_ratio, num_classes)
    return torch.isin(cells, torch.tensor(classes, device=labels.device))


def feature_distance(f_student, f_imnet, mask):
    """Mean over the masked cells of the L2 distance over channels between two feature maps; 0 (with a zero
    gradient) when no cell is masked, where the authors' torch.mean of an empty tensor gives NaN."""
    d = torch.linalg.vector_norm(f_student.float() - f_imnet.float(), dim=1)
    return (d * mask).sum() / mask.sum().clamp(min=1)


def thing_feature_distance(f_student, imnet_encoder, x, labels, num_classes=19, min_ratio=0.75):
    """DAFormer's FD loss before its lambda: the frozen ImageNet encoder (eval mode) encodes the source batch x
    without gradient; distance of the last stage's maps at the thing-class cells of the source labels."""
    with torch.no_grad():
        f_imnet = imnet_encoder(x)[-1]
    mask = feature_distance_mask(labels, f_student.shape[-1], thing_classes(num_classes), min_ratio, num_classes)
    return feature_distance(f_student, f_imnet, mask)


def pseudo_label_crop(weight, top=15, bottom=120, reference_height=512):
    """Weight 0 on the top and bottom rows of pseudo-label weight maps (N,H,W), against rectification artefacts
    (DAFormer: 15 and 120 rows of a 512-row crop); another crop height scales the rows with it."""
    h = weight.shape[-2]
    top, bottom = round(top * h / reference_height), round(bottom * h / reference_height)
    rows = torch.arange(h, device=weight.device)
    keep = (rows >= top) & (rows < h - bottom)
    return weight * keep.view(-1, 1).to(weight.dtype)


def daformer_segmentor(num_classes=19, variant="b5", drop_path_rate=0.1, stochastic=True):
    """DAFormer whose logits come at the input size, bilinear (mmseg encode_decode: the evaluation's resize to
    the label size is then the second of two, as the authors'; at the training crop size the second is an exact
    identity), with `num_classes` for the evaluation; stochastic=False for a teacher. The `tiny` encoder of the
    tests and the demo gets a 64-channel head (DAFormer: 256)."""
    model = DAFormer(num_classes, variant, drop_path_rate, stochastic=stochastic,
                     head_channels=64 if variant == "tiny" else 256)
    model.num_classes = num_classes
    model.register_forward_hook(lambda module, inputs, logits: upsample(logits, inputs[0].shape[2:], False))
    return model



def hrda_segmentor(num_classes=19, variant="b5", drop_path_rate=0.1, stochastic=True, detail_crop=(512, 512)):
    """HRDA on MiT (lhoyer/HRDA gta2cs config): `model(x)` fused logits at stride 4 (the teacher's and the
    evaluation's path), `model(x, box)` the training output; the `tiny` encoder gets a 64-channel head."""
    return HRDA(num_classes, variant, drop_path_rate, stochastic=stochastic,
                head_channels=64 if variant == "tiny" else 256, detail_crop=detail_crop)

# ======================================================================================
# Training utilities: schedules, EMA, seeding, per-iteration generators
# ======================================================================================

def poly_factor(i, max_iter, power=0.9):
    """(1 - i/max_iter)^power: the DeepLab poly schedule as a multiplier of each group's base lr."""
    return (1 - i / max_iter) ** power


def warmup_poly_factor(i, max_iter, warmup=1500, power=1.0, warmup_ratio=1e-6):
    """mmcv linear warm-up on top of poly (DAFormer poly10warm): the warm-up scales the decayed value."""
    factor = poly_factor(i, max_iter, power)
    return factor * (1 - (1 - i / warmup) * (1 - warmup_ratio)) if i < warmup else factor


def lr_scheduler(optimizer, factor):
    """LambdaLR over all groups (so the head keeps its 10x); `factor(i)` is applied before step i."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_alpha(i, alpha_max=0.99):
    """Teacher momentum at loop index i: min(1 - 1/(i+1), alpha_max) (DACS/ClassMix)."""
    return min(1 - 1 / (i + 1), alpha_max)


@torch.no_grad()
def ema_update(teacher, student, i, alpha_max=0.99, buffers=False):
    """theta_t <- a*theta_t + (1-a)*theta_s over parameters only (the authors); `buffers` also averages
    the BN running statistics (and copies the batch counters) for an eval-mode teacher."""
    a = ema_alpha(i, alpha_max)
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - a)
    if buffers:
        sync_buffers(student)  # under torchrun: rank 0's statistics, as DDP's next forward would set them
        pairs = list(zip(teacher.buffers(), student.buffers()))
        floats = [(t, s) for t, s in pairs if t.is_floating_point()]
        if floats:
            torch._foreach_lerp_(*map(list, zip(*floats)), 1 - a)
        for t, s in pairs:
            if not t.is_floating_point():
                t.copy_(s)


def ema_teacher(student, build, train_bn=True):
    """A fresh model from `build()` holding the student's parameters; in train mode as the authors' teacher
    (BN batch statistics, buffers not copied), or in eval mode with `train_bn=False`, which needs and gets
    the student's BN running statistics too."""
    teacher = build().to(next(student.parameters()).device)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(s)
            t.requires_grad_(False)
        if not train_bn:
            for t, s in zip(teacher.buffers(), student.buffers()):
                t.copy_(s)
    return teacher.train(train_bn)


def seed_everything(seed):
    """Seed python, numpy and torch (the authors seed numpy only; this cannot change expected results)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed, i, rank=0):
    """CPU generator for the random draws of iteration i on one rank (mix masks, augmentation): exact on resume."""
    return torch.Generator().manual_seed(item_seed(seed, 1000, i, rank))


class Dist(NamedTuple):
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun); `group` is a gloo group
    for the CPU-side agreements (stop signals, RNG states, barriers), None in one process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None

    @property
    def main(self):
        return self.rank == 0


def sync_buffers(model):
    """Rank 0's buffers (BN running statistics) to every process, as DDP does before each forward; before
    an evaluation or an EMA of the buffers. No-op without a process group."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b, 0)


# ======================================================================================
# Evaluation: confusion matrix, IoU, protocols, predictions
# ======================================================================================

def confusion_matrix(pred, gt, num_classes):
    """num_classes^2 matrix (rows = ground truth) by bincount; pixels with gt outside 0..n-1 are skipped."""
    valid = (gt >= 0) & (gt < num_classes)
    idx = gt[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_iou(cm):
    """TP / (TP + FP + FN) per class, NaN where the union is empty."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).cpu().numpy()


def metrics_from_confusion(cm, train_ids, iteration=None, model_name="student", synthia=False):
    """metrics.json dict; `train_ids[k]` names output k. SYNTHIA: mIoU over 16 classes plus mIoU13. A class in
    neither prediction nor label has IoU None (JSON null; left out of the means, as cityscapesScripts' NaN)."""
    iou = per_class_iou(cm) * 100
    by_id = {t: float(iou[k]) for k, t in enumerate(train_ids)}
    reported = TRAIN_IDS_16 if synthia else tuple(train_ids)
    out = {"iteration": iteration, "model": model_name, "num_classes": len(reported),
           "mIoU": float(np.nanmean([by_id[t] for t in reported]))}
    if synthia:
        out["mIoU13"] = float(np.nanmean([by_id[t] for t in TRAIN_IDS_13]))
    out["per_class"] = {CLASS_NAMES[t]: None if math.isnan(by_id[t]) else by_id[t] for t in reported}
    return out


def colourise(label, train_ids):
    """HxW output indices -> HxWx3 uint8 Cityscapes colours (void black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(train_ids)] = PALETTE[list(train_ids)]
    return lut[label]


def upsample(logits, size, align_corners=True):
    """Bilinear upsampling of logits to (H, W): align_corners=True as the DeepLab-era official code,
    False as mmseg/DAFormer."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")   # --compile: evaluation runs eagerly (one image at a time, eval mode)
def evaluate(model, dataset, device, synthia=False, amp_dtype=None, out_dir=None, save_predictions=False,
             n_vis=4, iteration=None, model_name="student", align_corners=True, dist=Dist()):
    """Evaluate `model` in eval mode on a val dataset, one image at a time, no test-time augmentation.

    The dataset's label_res picks the protocol: 'input' = labels downsampled to the network input
    (DACS/ClassMix 'half'), 'full' = full label resolution (AdaptSegNet). With `save_predictions`, writes
    predictions/<stem>_labelIds.png at full label resolution in Cityscapes label ids. Under torchrun rank
    r takes images r, r+K, ...: the confusion matrices are summed over the ranks (exact, integer counts),
    rank 0 writes the files it gathers from the others. ACDC with more than one condition adds a
    `per_condition` block {condition: {mIoU, per_class, images}} from one confusion matrix per condition.
    """
    was_training = model.training
    model.eval()
    sync_buffers(model)                       # every rank evaluates rank 0's running statistics
    n = model.num_classes
    train_ids = TRAIN_IDS_16 if n == 16 else tuple(range(n))
    cm = torch.zeros(n, n, dtype=torch.long, device=device)
    conditions = [condition_of(img) for img, _ in dataset.pairs] if getattr(dataset, "kind", None) == "acdc" else []
    present = [c for c in ACDC_CONDITIONS if c in conditions]
    cm_condition = torch.zeros(len(present), n, n, dtype=torch.long, device=device)   # ACDC: one per condition
    if out_dir is not None and dist.main:
        (Path(out_dir) / "vis").mkdir(parents=True, exist_ok=True)
        if save_predictions:
            (Path(out_dir) / "predictions").mkdir(parents=True, exist_ok=True)
    for first in range(0, len(dataset), dist.world):
        index, files = first + dist.rank, []
        if index < len(dataset):
            image_cm = evaluate_image(model, dataset, index, device, amp_dtype, align_corners, train_ids, files,
                                      out_dir is not None and save_predictions, out_dir is not None and index < n_vis)
            cm += image_cm
            if len(present) > 1:
                cm_condition[present.index(conditions[index])] += image_cm
        if dist.world > 1 and out_dir is not None and (save_predictions or first < n_vis):
            gathered = [None] * dist.world if dist.main else None
            torch.distributed.gather_object(files, gathered, dst=0, group=dist.group)
            files = [f for part in gathered for f in part] if dist.main else []
        for name, array in files:
            save_png(Path(out_dir) / name, array)
    if dist.world > 1:
        torch.distributed.all_reduce(cm)
        if len(present) > 1:
            torch.distributed.all_reduce(cm_condition)
    model.train(was_training)
    metrics = metrics_from_confusion(cm, train_ids, iteration, model_name, synthia)
    if len(present) > 1:
        metrics["per_condition"] = {}
        for c, c_cm in zip(present, cm_condition):
            m = metrics_from_confusion(c_cm, train_ids, synthia=synthia)
            metrics["per_condition"][c] = {"mIoU": m["mIoU"], "per_class": m["per_class"],
                                           "images": conditions.count(c)}
    return metrics


def evaluate_image(model, dataset, index, device, amp_dtype, align_corners, train_ids, files, prediction, vis):
    """Confusion matrix of one val image; appends (relative path, uint8 array) of its prediction / vis PNGs."""
    item = dataset[index]
    x, y = item["image"][None].to(device), item["label"].to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = main_logits(model(x)).float()
    pred = upsample(logits, y.shape, align_corners).argmax(1)[0]
    stem = stem_of(dataset.pairs[index][0])
    if prediction:
        w, h = image_size(label_or_image(dataset.pairs[index]))
        full = upsample(logits, (h, w), align_corners).argmax(1)[0].cpu().numpy()
        files.append((f"predictions/{stem}_labelIds.png", TRAINID_TO_LABELID[np.asarray(train_ids)[full]]))
    if vis:
        rgb = (denormalise(x, dataset.norm)[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        gt, pr = (np.asarray(Image.fromarray(a.astype(np.uint8)).resize(rgb.shape[1::-1], Image.NEAREST))
                  for a in (y.cpu().numpy(), pred.cpu().numpy()))
        files.append((f"vis/{stem}.png", np.concatenate([rgb, colourise(gt, train_ids), colourise(pr, train_ids)],
                                                        axis=1)))
    return confusion_matrix(pred, y, model.num_classes)


def save_png(path, array):
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# ======================================================================================
# Test-server export: one prediction PNG per test image at its original size, checked as the server reads it,
# zipped (README 'Submitting to the test servers')
# ======================================================================================

class SubmissionFormat(NamedTuple):
    """What one benchmark server reads: the dataset, the folders at the zip root ('' = flat), each folder's file
    name for an image stem and the name pattern the server matches."""
    kind: str
    folders: tuple
    file_name: str
    pattern: str


SUBMISSION_FORMATS = {
    # cityscapesScripts evalPixelLevelSemanticLabeling.py: label ids, <city>_<seq>_<frame>*.png anywhere in the zip
    "cityscapes": SubmissionFormat("cityscapes", ("",), "{stem}_labelIds.png", r"[a-z]+_\d{6}_\d{6}.*\.png"),
    # DAFormer/HRDA/MIC --format-only and Refign: train ids named after the input, flat
    "acdc": SubmissionFormat("acdc", ("",), "{stem}_rgb_anon.png", r"[A-Za-z0-9]+_frame_\d{6}.*\.png"),
    # Dark Zurich Codalab: three folders at the zip root, files matching {sequence}_frame_{frame:0>6}*.png
    "dark_zurich": SubmissionFormat("dark_zurich", ("labelTrainIds", "labelTrainIds_invalid", "confidence"),
                                    "{stem}_rgb_anon.png", r"[A-Za-z0-9]+_frame_\d{6}.*\.png"),
}


def main_logits(out):
    """The segmentation logits of a model's output (DeepLabv2's (aux, main) pair gives main)."""
    return out[1] if isinstance(out, tuple) else out


def submission_arrays(server, prob, train_ids):
    """{folder: uint8/uint16 array} of one image for `server` from its (C, H, W) class probabilities: argmax over
    the model's classes (never 255) as train ids, label ids for Cityscapes; Dark Zurich's invalid copy and
    confidence = 65535 * max softmax, truncated to uint16 (Attila94/CIConv predict_dz.py)."""
    conf, index = prob.max(0)
    train = train_ids[index.cpu().numpy()]
    if server == "cityscapes":
        return {"": TRAINID_TO_LABELID[train]}
    if server == "acdc":
        return {"": train}
    return {"labelTrainIds": train, "labelTrainIds_invalid": train,
            "confidence": (conf.double() * 65535).cpu().numpy().astype(np.uint16)}


def check_submission(folder, server, expected_stems, sizes):
    """Check a submission folder as the server reads it: exactly one file per test image in each folder, names
    unique and matching the server's pattern, one channel (8-bit; 16-bit confidence), the image's original size
    (`sizes[i]` = (W, H) of `expected_stems[i]`), values allowed (Cityscapes label ids of the 19 classes, else
    train ids 0-18); Dark Zurich's labelTrainIds_invalid equal to labelTrainIds. DataError naming the first problem."""
    fmt, folder = SUBMISSION_FORMATS[server], Path(folder)
    if len(set(expected_stems)) != len(expected_stems):
        twice = next(s for s in expected_stems if list(expected_stems).count(s) > 1)
        raise DataError(f"{folder}: two test images share the stem {twice} (expected unique image names)")
    expected = {(Path(sub) / fmt.file_name.format(stem=stem)).as_posix(): tuple(size)
                for sub in fmt.folders for stem, size in zip(expected_stems, sizes)}
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    extra = [f for f in found if f not in expected]
    if extra:
        raise DataError(f"{folder / extra[0]}: not the prediction of a test image ({len(extra)} unexpected file(s); "
                        f"the {server} server expects exactly one file per image)")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DataError(f"{folder / missing[0]}: missing ({len(missing)} of {len(expected)} files; the {server} "
                        f"server expects one file per test image, {len(expected_stems)} images)")
    allowed = set(TRAINID_TO_LABELID.tolist()) if server == "cityscapes" else set(range(19))
    for name, size in expected.items():
        path = folder / name
        if not re.fullmatch(fmt.pattern, path.name):
            raise DataError(f"{path}: name does not match the {server} server's pattern {fmt.pattern}")
        header = read_png_header(path)
        confidence = name.startswith("confidence/")
        if header is None or header[2:] != ((16, 0) if confidence else (8, 0)):
            got = "not a PNG" if header is None else f"bit depth {header[2]}, colour type {header[3]}"
            raise DataError(f"{path}: {got}; expected a one-channel {16 if confidence else 8}-bit grey PNG")
        if header[:2] != size:
            raise DataError(f"{path}: {header[0]}x{header[1]}; expected the test image's size {size[0]}x{size[1]}")
        if confidence:
            continue
        with Image.open(path) as im:
            bad = sorted(set(np.unique(np.asarray(im)).tolist()) - allowed)
        if bad:
            what = "Cityscapes label ids of the 19 classes" if server == "cityscapes" else "train ids 0-18"
            raise DataError(f"{path}: values {bad[:5]} not allowed; expected {what}")
        if name.startswith("labelTrainIds_invalid/") and \
                path.read_bytes() != (folder / "labelTrainIds" / path.name).read_bytes():
            raise DataError(f"{path}: differs from {folder / 'labelTrainIds' / path.name} (expected a copy)")


@torch.no_grad()
def export_submission(model, dataset, server, out_dir, device, amp_dtype=None, align_corners=True, record=None):
    """Write what the `server` test server accepts for the image-only test split `dataset`, in one process.

    out_dir (new or empty) receives predictions/ (the files, in the zip's layout), submission_<server>.zip and
    export.json (`record` - checkpoint, model, iteration - plus server, split, counts and the zip's files), which
    is returned. Each image: the network input of the dataset's pipeline, logits (of the whole image, or of
    sliding windows when `model` is a SlideInference: HRDA/MIC's test setting) upsampled to the image's
    original size, softmax, argmax over the model's classes. Everything is written into a temporary
    sibling folder, checked (check_submission) and renamed onto out_dir, so an error leaves nothing behind.
    """
    import shutil
    import zipfile
    fmt, out = SUBMISSION_FORMATS[server], Path(out_dir)
    if dataset.kind != fmt.kind or (dataset.kind, dataset.split) not in IMAGE_ONLY_SPLITS:
        raise DataError(f"{dataset.root}: {dataset.kind} {dataset.split} split; the {server} server expects "
                        f"predictions of the {fmt.kind} test split")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: not empty (expected a new or empty folder for the export)")
    stems = dataset.stems()
    sizes = [image_size(img) for img, _ in dataset.pairs]
    n = model.num_classes
    train_ids = np.asarray(TRAIN_IDS_16 if n == 16 else tuple(range(n)), dtype=np.uint8)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    was_training = model.training
    model.eval()
    try:
        predictions = tmp / "predictions"
        for sub in fmt.folders:
            (predictions / sub).mkdir(parents=True, exist_ok=True)
        for index, (stem, (w, h)) in enumerate(zip(stems, sizes)):
            x = dataset[index]["image"][None].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = main_logits(model(x))
            prob = upsample(logits.float(), (h, w), align_corners).softmax(1)[0]
            for sub, array in submission_arrays(server, prob, train_ids).items():
                Image.fromarray(array).save(predictions / sub / fmt.file_name.format(stem=stem), format="PNG")
        check_submission(predictions, server, stems, sizes)
        files = sorted(p.relative_to(predictions).as_posix() for p in predictions.rglob("*") if p.is_file())
        zip_name = f"submission_{server}.zip"
        with zipfile.ZipFile(tmp / zip_name, "w", zipfile.ZIP_DEFLATED) as zf:
            for sub in filter(None, fmt.folders):   # folder entries first, as `zip -r` writes them
                zf.write(predictions / sub, sub)
            for name in files:
                zf.write(predictions / name, name)
        info = {**(record or {}), "server": server, "dataset": dataset.kind, "split": dataset.split,
                "root": str(dataset.root), "images": len(stems),
                "counts": {sub or "predictions": len(stems) for sub in fmt.folders}, "zip": zip_name, "files": files}
        slide = next((m for m in model.modules() if isinstance(m, SlideInference)), None)   # also when wrapped
        info["inference"] = ({"mode": "slide", "crop": list(slide.crop), "stride": list(slide.stride)} if slide
                             else {"mode": "whole"})
        if dataset.kind == "acdc":
            conditions = [condition_of(img) for img, _ in dataset.pairs]
            info["conditions"] = {c: conditions.count(c) for c in ACDC_CONDITIONS if c in conditions}
        info["expected_images"] = EXPECTED_COUNTS[dataset.kind][dataset.split]
        if len(stems) != info["expected_images"]:   # the servers reject a submission without every test image
            print(f"warning: {dataset.root}: {len(stems)} {dataset.kind} {dataset.split} images, the published "
                  f"split has {info['expected_images']}; the {server} server rejects a submission that misses any",
                  file=sys.stderr, flush=True)
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        model.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return info


# ======================================================================================
# Data checking and preparing: python common.py check-data --data-root DIR [--json PATH];
# python common.py prepare-data --data-root DIR --out OUT (--pipeline SCRIPT [--source S] | --frames SPEC...)
# ======================================================================================

DATASET_FOLDERS = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes", "acdc": "acdc",
                   "dark_zurich": "dark_zurich", "bdd100k": "bdd100k", "mapillary": "mapillary"}
# Published split sizes (README 'Datasets' gives the sources); check-data warns when a split differs. ACDC per
# condition: train 400 each, val fog 100 / night 106 / rain 100 / snow 100, test 2000 = 4006 - 1600 - 406.
EXPECTED_COUNTS = {"gta5": {"train": 24966}, "synthia": {"train": 9400},
                   "cityscapes": {"train": 2975, "val": 500, "test": 1525},
                   "acdc": {"train": 1600, "val": 406, "test": 2000},
                   "dark_zurich": {"train": 2416, "val": 50, "test": 151},
                   "bdd100k": {"train": 7000, "val": 1000, "test": 2000},
                   "mapillary": {"train": 18000, "val": 2000, "test": 5000}}
ACDC_EXPECTED_COUNTS = {"train": {"fog": 400, "night": 400, "rain": 400, "snow": 400},
                        "val": {"fog": 100, "night": 106, "rain": 100, "snow": 100}}
REQUIRED_SPLITS = {"gta5": ("train",), "synthia": ("train",), "cityscapes": ("train", "val")}  # others optional


def check_split(kind, root, split):
    """Counts, orphans, size mismatches, unreadable files, the train-id histogram of one split and warnings
    where its size differs from the published one (image-only splits: images only, no histogram)."""
    pairs, orphans = dataset_files(kind, root, split, strict=False)
    labeled = (kind, split) not in IMAGE_ONLY_SPLITS
    report = {"images": len(pairs), "pairs": len(pairs) if labeled else 0, "labeled": labeled, "orphans": orphans,
              "size_mismatch": [], "unreadable": [], "warnings": []}
    hist = np.zeros(256, dtype=np.int64)
    for img, lab in pairs:
        try:
            isize = image_size(img)
            with Image.open(img) as im:
                im.verify()
        except Exception:
            report["unreadable"].append(str(img))
            isize = None
        if lab is None:
            continue
        try:
            label = read_label(lab, kind)
        except DataError:
            report["unreadable"].append(str(lab))
            continue
        hist += np.bincount(label.ravel(), minlength=256)
        if isize is not None and tuple(isize) != label.shape[::-1]:
            report["size_mismatch"].append(f"{img} {isize[0]}x{isize[1]} vs label "
                                           f"{label.shape[1]}x{label.shape[0]}")
    if labeled:
        report["histogram"] = {name: int(hist[c]) for c, name in enumerate(CLASS_NAMES)}
        report["histogram"]["ignore"] = int(hist.sum() - hist[:19].sum())
    expected = EXPECTED_COUNTS[kind].get(split)
    report["expected"] = expected
    if expected is not None and len(pairs) != expected:
        report["warnings"].append(f"{len(pairs)} images, the published {kind} {split} split has {expected}")
    if kind == "acdc":
        conditions = [condition_of(img) for img, _ in pairs]
        report["conditions"] = {c: conditions.count(c) for c in ACDC_CONDITIONS if c in conditions}
        for c, n in report["conditions"].items():
            published = ACDC_EXPECTED_COUNTS.get(split, {}).get(c)
            if published is not None and n != published:
                report["warnings"].append(f"{n} {c} images, the published ACDC {split} split has {published}")
    return report


def check_data(data_root):
    """Walk whichever datasets of DATASET_FOLDERS exist under data_root; {dataset: {split: report}}. A split
    whose image folder is absent is left out, except the train/val splits the UDA scripts need."""
    out = {}
    for kind, folder in DATASET_FOLDERS.items():
        root = Path(data_root) / folder
        if not root.is_dir():
            continue
        out[kind] = {}
        for split in DATASET_SPLITS[kind]:
            try:
                if split not in REQUIRED_SPLITS.get(kind, ()) and not any(
                        f.images.is_dir() for f in split_folders(kind, root, split)):
                    continue
                out[kind][split] = check_split(kind, root, split)
            except DataError as exc:
                out[kind][split] = {"error": str(exc)}
        if not out[kind]:
            out[kind]["all"] = {"error": f"{root}: no split found (expected "
                                         f"{split_folders(kind, root, 'val')[0].images_what} or the train/test "
                                         f"counterparts)"}
    return out


def check_prepared(prepared_root, manifest):
    """{'data_root', 'pipelines', 'frames': {spec: {split: {'frames', 'missing'}}}} of a prepared root."""
    frames = {}
    for spec in manifest["frames"]:
        folder = frames_dir(prepared_root, spec)
        index = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
        frames[spec] = {}
        for split, images in index.items():
            missing = [str(folder / Path(rel).with_suffix(f".{part}.npy")) for rel in images for part in ("rgb", "label")
                       if not (folder / Path(rel).with_suffix(f".{part}.npy")).is_file()]
            frames[spec][split] = {"frames": len(images), "missing": missing}
        if not index:
            frames[spec]["all"] = {"frames": 0, "missing": [str(folder / "index.json")]}
    return {"data_root": manifest["data_root"], "pipelines": manifest.get("pipelines", []), "frames": frames}


def print_check_report(report):
    """Human-readable summary of a check_data report."""
    if "prepared" in report:
        p = report["prepared"]
        made = "; ".join(p["pipelines"]) or "the frame sets below (--frames)"
        print(f"prepared root (prepare-data) for {made}, from {p['data_root']}:")
        for spec, splits in p["frames"].items():
            interp = INTERPOLATIONS[parse_frames_spec(spec)[3]]
            counts = ", ".join(f"{split} {r['frames']} frames, {len(r['missing'])} files missing"
                               for split, r in splits.items())
            print(f"  {spec} ({interp}{', aspect ratio kept' * spec.endswith(':keep')}): {counts}")
            for r in splits.values():
                for entry in r["missing"][:20]:
                    print(f"    missing: {entry}")
        return
    for kind, splits in report.items():
        for split, r in splits.items():
            if "error" in r:
                print(f"{kind}/{split}: ERROR {r['error']}")
                continue
            counted = f"{r['pairs']} pairs" if r["labeled"] else f"{r['images']} images (no labels published)"
            conditions = "".join(f", {c} {n}" for c, n in r.get("conditions", {}).items())
            print(f"{kind}/{split}: {counted}{conditions}, {len(r['orphans'])} orphans, "
                  f"{len(r['size_mismatch'])} size mismatches, {len(r['unreadable'])} unreadable"
                  + (f" (published: {r['expected']})" if r["expected"] is not None else ""))
            for key in ("orphans", "unreadable", "size_mismatch"):
                for entry in r[key][:20]:
                    print(f"  {key}: {entry}")
            for warning in r["warnings"]:
                print(f"  warning: {warning}")
            if r["labeled"]:
                total = max(sum(r["histogram"].values()), 1)
                print("  " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in r["histogram"].items()))


def write_frame(dataset, out, index):
    """Write image `index` of `dataset` as its pipeline resizes it (uint8 .rgb.npy / .label.npy) under `out`."""
    rgb, label, _ = dataset.load(index)
    base = out / dataset.pairs[index][0].relative_to(dataset.root).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{base}.rgb.npy", np.ascontiguousarray(rgb))
    np.save(f"{base}.label.npy", np.ascontiguousarray(label))


def prepare_data(data_root, out, specs, pipeline=None, workers=0):
    """Write the frame sets `specs` of the datasets under data_root into the prepared root `out` (created,
    or extended by frame sets it lacks); each set is written to a temporary folder and renamed, and the
    manifest is rewritten after each, so an interrupted run leaves nothing half-written."""
    import functools
    import multiprocessing
    import shutil
    data_root, out = Path(data_root).resolve(), Path(out).resolve()
    if read_prepared_manifest(data_root) is not None:
        raise DataError(f"--data-root {data_root}: is a prepared root (expected the original gta5/, synthia/, "
                        f"cityscapes/ folders)")
    if out == data_root:
        raise DataError(f"--out {out}: is the data root (expected a folder of its own)")
    manifest = read_prepared_manifest(out) or {"data_root": str(data_root), "pipelines": [], "frames": {}}
    if Path(manifest["data_root"]) != data_root:
        raise DataError(f"--out {out}: prepared from {manifest['data_root']}, not {data_root} (use another --out)")
    for spec in specs:
        kind, size, keep_ratio, interp = parse_frames_spec(spec)
        if spec in manifest["frames"]:
            print(f"{spec}: already prepared", flush=True)
            continue
        folder = frames_dir(out, spec)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            index = {}
            for split in ("train", "val") if kind == "cityscapes" else ("train",):
                data = SegmentationDataset(kind, data_root / kind, split, resize=size, keep_ratio=keep_ratio,
                                           interp=interp)
                print(f"{spec} {split}: {len(data)} images -> {folder}", flush=True)
                write = functools.partial(write_frame, data, tmp)
                if workers > 0:
                    with multiprocessing.get_context("spawn").Pool(workers) as pool:
                        pool.map(write, range(len(data)), chunksize=16)
                else:
                    for i in range(len(data)):
                        write(i)
                index[split] = [str(img.relative_to(data.root)) for img, _ in data.pairs]
            (tmp / "index.json").write_text(json.dumps(index))
            shutil.rmtree(folder, ignore_errors=True)  # a set left by an interrupted run, not in the manifest
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest["frames"][spec] = {split: len(images) for split, images in index.items()}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / PREPARED_MANIFEST, json.dumps(manifest, indent=1))
    if pipeline and pipeline not in manifest["pipelines"]:
        manifest["pipelines"].append(pipeline)
        atomic_write_text(out / PREPARED_MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def pipeline_specs(script, source):
    """The frame sets of one script's default pipeline with `source` (PIPELINE_FRAMES)."""
    return [spec.format(source=SOURCE_FRAMES[source]) for spec in PIPELINE_FRAMES[script]]


# ======================================================================================
# Predict on your own images: python common.py predict --checkpoint CK --input PATH... --out-dir OUT
# ======================================================================================


class PredictNetwork(NamedTuple):
    """A checkpoint's network with the evaluation path of the script that trained it: its input normalisation,
    resize (W, H) and interpolation, logits upsampling convention and sliding-window settings."""
    model: nn.Module
    norm: str
    size: tuple
    interp: str
    align_corners: bool
    crop: tuple
    stride: tuple
    keep_ratio: bool = False   # fit the image into `size` keeping its ratio (mmseg; ACDC/Dark Zurich val sets)


AUTHORS_DEFAULTS = {   # an authors' file holds no args: lhoyer/DAFormer and lhoyer/HRDA gta2cs test pipelines
    "daformer": {"mit": "b5", "drop_path_rate": 0.1, "target_size": (1024, 512), "crop_size": (512, 512)},
    "hrda": {"mit": "b5", "drop_path_rate": 0.1, "target_size": (2048, 1024), "crop_size": (1024, 1024),
             "eval_mode": "slide"},
}
AUTHORS_TEST_SIZES = {   # their test pipelines' Resize (keep_ratio) per target: gta2cs, cs2acdc, cs2darkzurich
    "daformer": {"cityscapes": (1024, 512), "acdc": (960, 540), "dark_zurich": (960, 540)},
    "hrda": {"cityscapes": (2048, 1024), "acdc": (1920, 1080), "dark_zurich": (1920, 1080)},
}


def run_input_convention(args):
    """(stride style, input normalisation, full ASPP) of the network a run's arguments (a dict: a checkpoint's
    `args`, or vars() of a script's) build, by the conventions of the script that made them; the MiT stacks:
    (None, 'imagenet_rgb', None)."""
    if args.get("stack", "deeplabv2") != "deeplabv2":
        return None, "imagenet_rgb", None
    iidm = "resize" in args     # only iidm.py has --resize: pytorch style and RGB unless --init coco
    style, norm = init_convention(args.get("init", "none"), ("pytorch", "imagenet_rgb") if iidm
                                  else ("caffe", "imagenet_bgr"))
    if "no_unlabeled" in args and norm == "imagenet_bgr":     # only classmix_ssl.py has --no-unlabeled
        norm = "cityscapes_bgr"   # ClassMix subtracts the Cityscapes RGB mean from BGR images, as it trains
    return style, norm, "lab" in args or bool(args.get("aspp_full"))   # only dldm.py has --lab: AdvEnt's full ASPP


def predict_network(args, state, path):
    """The network a checkpoint's `args` describe, with the evaluation path of the script that trained it:
    DeepLabv2 as dacs.py/classmix_ssl.py/camix.py evaluate (PIL bilinear resize, align_corners True; ClassMix's
    Cityscapes mean), as asss.py/dldm.py do (AdaptSegNet's two heads, the main one; PIL bicubic resize,
    align_corners True; dldm.py's four-branch ASPP) or as
    iidm.py does (its --resize, align_corners False, RGB for --init none), DAFormer/HRDA as mmseg does
    (OpenCV-style resize or iidm.py's --resize, align_corners False; HRDA slides when trained so)."""
    stack, iidm = args.get("stack", "deeplabv2"), "resize" in args     # only iidm.py has --resize
    keep = args.get("keep_ratio", target_keeps_ratio(stack, args.get("target", args.get("dataset", "cityscapes"))))
    if stack == "deeplabv2":
        multi = "layer6.conv2d_list.0.weight" in state    # asss.py, dldm.py: aux head layer5, main head layer6
        head = state.get("layer6.conv2d_list.0.weight" if multi else "layer5.conv2d_list.0.weight")
        if head is None:
            raise DataError(f"{path}: no DeepLabv2 classifier weights (expected 'layer5.conv2d_list.0.weight')")
        style, norm, aspp_full = run_input_convention(args)
        model = DeepLabV2(head.shape[0], multi_level=multi, aspp_full=aspp_full, style=style,
                          layers=tuple(args.get("layers", (3, 4, 23, 3))), width=args.get("width", 64))
        size = tuple(args.get("val_size") or args["target_size"])
        interp = args["resize"] if iidm else "bicubic" if multi else "bilinear"
        return PredictNetwork(model, norm, size, interp, not iidm, size[::-1], tuple(s // 2 for s in size[::-1]),
                              keep)
    head = state.get({"daformer": "decode_head.conv_seg.weight", "hrda": "decode_head.head.conv_seg.weight"}[stack])
    if head is None:
        raise DataError(f"{path}: no {stack} classifier weights found")
    crop = tuple(args["crop_size"])
    if stack == "hrda":
        model = hrda_segmentor(head.shape[0], args["mit"], args["drop_path_rate"], False, tuple(c // 2 for c in crop))
    else:
        model = daformer_segmentor(head.shape[0], args["mit"], args["drop_path_rate"], False)
    return PredictNetwork(model, "imagenet_rgb", tuple(args["target_size"]), args.get("resize", "cv2"), False, crop,
                          tuple(c // 2 for c in crop), keep)


def default_mode(args):
    """The script's own evaluation: HRDA's sliding window when it was trained with --eval-mode slide."""
    return "slide" if args.get("stack") == "hrda" and args.get("eval_mode") == "slide" else "whole"


def authors_predict_args(stack, target=None):
    """The settings of an authors' DAFormer/HRDA checkpoint (which holds none) trained for `target`: MiT-B5 and
    their test pipeline, the image fit into the target's test size keeping its ratio."""
    return {"stack": stack, **AUTHORS_DEFAULTS[stack], "target": target or "cityscapes",
            "target_size": AUTHORS_TEST_SIZES[stack][target or "cityscapes"], "keep_ratio": True}


def load_predict_network(path, stack=None, eval_model="student", target=None):
    """(PredictNetwork in eval mode, the checkpoint's args): weights loaded strictly, weights_only; an authors'
    DAFormer/HRDA mmcv file (no `args`) needs `stack`, and `target` if it was not trained for Cityscapes."""
    ckpt = load_state_file(path)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else None
    if args is not None and target is not None:
        raise DataError(f"--target {target}: only for an authors' checkpoint; {path} records its own settings "
                        f"(target {args.get('target', args.get('dataset', 'cityscapes'))})")
    if args is not None and stack is not None:
        raise DataError(f"--stack {stack}: only for an authors' checkpoint; {path} records its own network "
                        f"(--stack {args.get('stack', 'deeplabv2')})")
    if args is None:
        if stack not in AUTHORS_DEFAULTS:
            raise DataError(f"{path}: no `args` in this checkpoint (an authors' file): give --stack daformer|hrda")
        args = authors_predict_args(stack, target)
        if "model" not in ckpt:
            ckpt = authors_checkpoint(ckpt, path)
    key = "ema_model" if eval_model == "teacher" else "model"
    if key not in ckpt:
        raise DataError(f"{path}: no '{key}' in this checkpoint (expected --eval-model student)")
    net = predict_network(args, ckpt[key], path)
    try:
        net.model.load_state_dict(ckpt[key])
    except RuntimeError as exc:
        raise DataError(f"{path}: not a state_dict of the network its args describe "
                        f"({str(exc).splitlines()[0][:200]})") from None
    net.model.eval()
    return net, args


def predict_inputs(paths):
    """(image path, output stem relative to the out dir) for files and folders (recursive, sorted); a named
    file that is not a PNG/JPEG, a missing path or two inputs with one output name is a DataError before
    anything runs."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [(f, f.relative_to(p).with_suffix("")) for f in sorted(p.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append((p, Path(p.stem)))
        else:
            raise DataError(f"{p}: not an image file or folder (expected a .png/.jpg/.jpeg file or a folder of them)")
    if not found:
        raise DataError(f"{' '.join(map(str, paths))}: no .png/.jpg/.jpeg images found")
    check_file_headers([(image, None) for image, _ in found], None)   # before any output is written
    seen = {}
    for image, stem in found:
        if seen.setdefault(stem, image) != image:
            raise DataError(f"{image}: its outputs would overwrite those of {seen[stem]} (expected inputs with "
                            f"distinct names, e.g. one folder per set)")
    return found


@torch.no_grad()
def predict_logits(net, rgb, mode, device):
    """Network logits of one uint8 RGB image, resized to the network size as the script's val set does, the
    whole image (or mmseg's sliding windows, each upsampled to its window) through the network."""
    size = keep_ratio_size(rgb.shape[1], rgb.shape[0], net.size) if net.keep_ratio else tuple(net.size)
    if size != rgb.shape[1::-1]:
        rgb = resize_image(rgb, size, net.interp)
    x = normalise(rgb, net.norm)[None].to(device)
    if mode == "slide":
        logits = slide_inference(lambda w: upsample(main_logits(net.model(w)), w.shape[2:], net.align_corners), x,
                                 net.crop, net.stride)
    else:
        logits = main_logits(net.model(x))
    return logits.float()


def predict_images(net, inputs, out_dir, mode, opacity=0.5, device=torch.device("cpu"), every=50):
    """Write <stem>_color/_overlay/_labelIds/_trainIds.png per image at its own size, one image at a time."""
    n = net.model.num_classes
    train_ids = np.asarray(TRAIN_IDS_16 if n == 16 else tuple(range(n)), dtype=np.uint8)
    start = time.perf_counter()
    for i, (path, stem) in enumerate(inputs):
        try:
            rgb = read_rgb(path)
        except DataError as exc:
            raise DataError(f"{exc}; expected a readable PNG or JPEG file") from None
        logits = predict_logits(net, rgb, mode, device)
        pred = upsample(logits, rgb.shape[:2], net.align_corners).argmax(1)[0].cpu().numpy()
        colour = colourise(pred, tuple(train_ids))
        overlay = (rgb * (1 - opacity) + colour * opacity).round().clip(0, 255).astype(np.uint8)
        outputs = {"color": colour, "overlay": overlay, "labelIds": TRAINID_TO_LABELID[train_ids[pred]],
                   "trainIds": train_ids[pred]}
        (Path(out_dir) / stem).parent.mkdir(parents=True, exist_ok=True)
        for suffix, array in outputs.items():
            save_png(Path(out_dir) / f"{stem}_{suffix}.png", array)
        if (i + 1) % every == 0 or i + 1 == len(inputs):
            rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
            print(f"predict: {i + 1}/{len(inputs)} images, {rate:.2f} images/s", flush=True)
    return len(inputs)


def main(argv=None):
    parser = ArgumentParser(prog="common.py", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-data", help="report pairs, orphans, size mismatches, unreadable files "
                                              "and class histograms of the datasets under --data-root, or "
                                              "what a prepared root holds")
    check.add_argument("--data-root", default="./data", help="folder holding gta5/, synthia/, cityscapes/, acdc/, "
                                                              "dark_zurich/, bdd100k/, mapillary/, or a prepared root")
    check.add_argument("--json", default=None, help="also write the report as JSON to this path")
    prep = sub.add_parser("prepare-data", help="write the resized frames of a pipeline once, as uint8 .npy "
                                               "files the loader memory-maps (README 'Prepared data')")
    prep.add_argument("--data-root", default="./data", help="folder holding gta5/, synthia/, cityscapes/")
    prep.add_argument("--out", required=True, help="the prepared root (created, or extended); give it to a "
                                                   "script as --data-root")
    what = prep.add_mutually_exclusive_group(required=True)
    what.add_argument("--pipeline", choices=sorted(PIPELINE_FRAMES),
                      help="the frame sets of this script's default sizes and resize")
    what.add_argument("--frames", nargs="+", metavar="SPEC", help="frame sets KIND:WxH:INTERP[:keep], e.g. "
                      "gta5:1280x720:bicubic (INTERP bilinear|bicubic|cv2; keep = keep_ratio, as iidm.py's source)")
    prep.add_argument("--source", choices=sorted(SOURCE_FRAMES), default="gta5", help="the source of --pipeline")
    prep.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing frames (0: this one)")
    pred = sub.add_parser("predict", help="segment your own PNG/JPEG images (files or folders, recursive) with a "
                                          "checkpoint: <name>_color/_overlay/_labelIds/_trainIds.png at the input size")
    pred.add_argument("--checkpoint", required=True, help="a checkpoint.pth of a run, or an authors' DAFormer/HRDA "
                                                          "mmcv file with --stack")
    pred.add_argument("--input", nargs="+", required=True, metavar="PATH", help="image files and folders")
    pred.add_argument("--out-dir", required=True, help="output folder (input folders' subfolders are kept)")
    pred.add_argument("--mode", choices=("whole", "slide"), default=None,
                      help="whole image or mmseg sliding windows (default: the training script's evaluation)")
    pred.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="--mode slide window (default: the checkpoint's --crop-size)")
    pred.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="--mode slide stride (default: half the window)")
    pred.add_argument("--opacity", type=float, default=0.5, help="overlay = image*(1-A) + colour*A (mmseg: 0.5)")
    pred.add_argument("--stack", choices=("daformer", "hrda"), default=None,
                      help="the network of an authors' checkpoint, which holds no args (MiT-B5, their test sizes)")
    pred.add_argument("--target", choices=("cityscapes", "acdc", "dark_zurich"), default=None,
                      help="the target an authors' checkpoint was trained for (default cityscapes): the image is fit "
                           "into its test size keeping the ratio (DAFormer 1024x512 / 960x540 for ACDC and Dark "
                           "Zurich, HRDA 2048x1024 / 1920x1080); a checkpoint of this project records its own")
    pred.add_argument("--eval-model", choices=("student", "teacher"), default="student")
    pred.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.command == "predict":
        if not 0 <= args.opacity <= 1:
            raise DataError(f"--opacity {args.opacity}: expected a number in [0, 1]")
        if any(v <= 0 for v in (args.crop or []) + (args.stride or [])):
            raise DataError(f"--crop/--stride {args.crop} {args.stride}: expected positive sizes")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise DataError(f"--device {args.device}: not a device (expected cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
        inputs = predict_inputs(args.input)
        net, saved = load_predict_network(args.checkpoint, args.stack, args.eval_model, args.target)
        mode = args.mode or default_mode(saved)
        if (args.crop or args.stride) and mode != "slide":
            raise DataError(f"--crop/--stride set the windows of --mode slide (this checkpoint predicts with --mode "
                            f"{mode}: add --mode slide, or drop them)")
        crop = tuple(args.crop) if args.crop else net.crop
        net = net._replace(crop=crop, stride=tuple(args.stride) if args.stride else tuple(c // 2 for c in crop))
        net.model.to(device)
        n = predict_images(net, inputs, args.out_dir, mode, args.opacity, device)
        print(f"{args.out_dir}: {n} images predicted")
        return 0
    if args.command == "prepare-data":
        if args.workers < 0:
            raise DataError(f"--workers {args.workers}: expected 0 (in this process) or a positive count")
        specs = args.frames or pipeline_specs(args.pipeline, args.source)
        for spec in specs:
            parse_frames_spec(spec)
        if not Path(args.data_root).is_dir():
            raise DataError(f"--data-root {args.data_root}: folder not found (expected gta5/, synthia/ or "
                            f"cityscapes/ inside)")
        name = None
        if args.pipeline:
            uses_source = any("{source}" in spec for spec in PIPELINE_FRAMES[args.pipeline])
            name = f"{args.pipeline}.py" + f" --source {args.source}" * uses_source
        manifest = prepare_data(args.data_root, args.out, specs, name, args.workers)
        print(f"{args.out}: prepared {', '.join(manifest['frames'])}; run a script with --data-root {args.out}")
        return 0
    if not Path(args.data_root).is_dir():
        raise DataError(f"{args.data_root}: folder not found (expected some of "
                        f"{', '.join(f + '/' for f in DATASET_FOLDERS.values())} inside, or a prepared root)")
    manifest = read_prepared_manifest(args.data_root)
    if manifest is not None:
        report = {"prepared": check_prepared(args.data_root, manifest)}
        bad = any(r["missing"] for splits in report["prepared"]["frames"].values() for r in splits.values())
    else:
        report = check_data(args.data_root)
        if not report:
            raise DataError(f"{args.data_root}: none of {', '.join(f + '/' for f in DATASET_FOLDERS.values())} found")
        bad = any("error" in r or r["orphans"] or r["unreadable"] for s in report.values() for r in s.values())
    print_check_report(report)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
