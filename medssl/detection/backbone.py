"""Detector backbones returning multi-scale NCHW maps: ResNet (timm, reference setup) or a medssl ViT."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["ResNetBackbone", "ViTPyramidBackbone", "build_backbone"]


class ResNetBackbone(nn.Module):
    """timm ResNet (C3, C4, C5), optionally with frozen BatchNorm and frozen stem + layer1 (Deformable DETR).

    Construction reads no file; pretrained weights are loaded by the explicit init step `load_pretrained`.
    Freezing is for pretrained weights (the reference's case): a backbone trained from scratch keeps live
    BatchNorm and a trainable stem (frozen random filters would only freeze noise; a deliberate difference
    from the reference). `build_backbone` freezes by default exactly when weights are configured.

    Args:
        name: timm ResNet name (``resnet50`` in the reference; ``resnet18``/``resnet10t`` for small runs).
        in_chans: input channels.
        freeze: freeze BatchNorm, stem and layer1.
    """

    def __init__(self, name: str = "resnet50", in_chans: int = 3, freeze: bool = False) -> None:
        super().__init__()
        import timm
        from timm.layers import freeze_batch_norm_2d

        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(2, 3, 4),
                                 in_chans=in_chans)
        self.name = name
        self.frozen = bool(freeze)
        self.body = freeze_batch_norm_2d(body) if self.frozen else body
        for pname, p in self.body.named_parameters():
            if self.frozen and pname.startswith(("conv1.", "bn1.", "layer1.")):
                p.requires_grad_(False)
        self.num_channels = list(body.feature_info.channels())
        self.strides = list(body.feature_info.reduction())

    def load_pretrained(self, path: str | Path) -> None:
        """Load a local ResNet state dict (``.pth``/``.safetensors``; classifier keys dropped), exact keys; or a
        medssl CNN backbone folder (e.g. SparK pretraining's ``backbone/`` or its run folder), through
        ``medssl.hub.load_backbone_weights`` (first conv adapted to ``in_chans``, exact keys)."""
        from medssl.train.checkpoint import load_checkpoint, load_exact, strip_prefixes

        path = Path(path)
        if path.is_dir():
            from medssl.hub import backbone_config, load_backbone_weights

            arch = backbone_config(path).get("architecture")
            if arch is not None and arch != self.name:
                raise ValueError(f"{path} holds a {arch}, not the detector's backbone {self.name}: set "
                                 f"backbone_name={arch}")
            load_backbone_weights(self.body, path)
            return
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        state = load_checkpoint(path)
        state = state.get("model", state.get("state_dict", state))
        state = {k: v for k, v in strip_prefixes(state, ("module.",)).items() if not k.startswith("fc.")}
        load_exact(self.body, state, str(path))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, C, H, W)`` -> [C3 (N, 512, H/8, W/8), C4 (H/16), C5 (H/32)] for ResNet-50."""
        return self.body(x)


class ViTPyramidBackbone(nn.Module):
    """A medssl ViT (``medssl.load_backbone`` source) with a simple feature pyramid (ViTDet style).

    The last block's patch map (stride p) becomes three maps. When p is a power of two they sit at a
    ResNet's C3-C5 strides (8, 16, 32), so the detector sees the same number of tokens whatever the patch
    size; otherwise (e.g. p = 14) at ViTDet's p/2, p, 2p. A finer stride comes from a transposed conv
    (+ GroupNorm + GELU, half the width), the patch stride as it is, a coarser one from max-pooling. The
    detector adds its fourth level by a stride-2 conv.

    Construction needs only the ViT's architecture record (``medssl.hub.backbone_record``) and reads no
    file; the pretrained weights come in through the explicit init step `load_pretrained`.

    Args:
        record: architecture record of the ViT (a registered name's or a backbone source's).
        in_chans: input channels.
        img_size: nominal image size (the position embedding is resampled for other sizes).
        freeze: keep the ViT's weights fixed (in eval mode, no gradients); the pyramid still trains.
    """

    def __init__(self, record: dict, in_chans: int = 1, img_size: int = 224, freeze: bool = False) -> None:
        super().__init__()
        from medssl.hub import ViTFeatures, build_backbone_model

        self.record = record
        vit = build_backbone_model(record, img_size=img_size, in_chans=in_chans, dynamic_img_size=True)
        self.vit = ViTFeatures(vit, (-1,))
        self.frozen = bool(freeze)
        if self.frozen:
            self.vit.requires_grad_(False)
        d = self.vit.feature_info[0]["num_chs"]
        p = self.vit.feature_info[0]["reduction"]
        power_of_two = p & (p - 1) == 0
        scales = [8 / p, 16 / p, 32 / p] if power_of_two else [0.5, 1.0, 2.0]  # output stride / patch stride
        levels, chans = [], []
        for scale in scales:
            if scale < 1:
                f = round(1 / scale)
                levels.append(nn.Sequential(nn.ConvTranspose2d(d, d // 2, f, stride=f), nn.GroupNorm(1, d // 2),
                                            nn.GELU()))
                chans.append(d // 2)
            else:
                levels.append(nn.MaxPool2d(round(scale)) if scale > 1 else nn.Identity())
                chans.append(d)
        self.levels = nn.ModuleList(levels)
        self.num_channels = chans
        self.strides = [p * scale for scale in scales]

    def load_pretrained(self, source: str | Path) -> None:
        """Load the ViT's weights from a ``medssl.load_backbone`` source (a registered name loads nothing)."""
        from medssl.hub import load_backbone_weights

        load_backbone_weights(self.vit, source)

    def train(self, mode: bool = True) -> ViTPyramidBackbone:
        """As ``nn.Module.train``, but a frozen ViT stays in eval mode (no drop path)."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, C, H, W)`` -> three maps (strides 8, 16, 32, or p/2, p, 2p)."""
        (fmap,) = self.vit(x)  # [N, D, H/p, W/p]
        return [level(fmap) for level in self.levels]


def build_backbone(kind: str, *, in_chans: int, name: str | None = None, weights: str | None = None,
                   img_size: int = 224, freeze: bool | None = None, record: dict | None = None) -> nn.Module:
    """Backbone by kind, built without pretrained weights (load them with its ``load_pretrained``).

    Args:
        kind: ``"resnet"`` or ``"vit"``.
        in_chans: input channels.
        name: timm ResNet name, or the ViT source (folder, file or registry name).
        weights: local ResNet weights file (only decides the default freezing here).
        img_size: nominal ViT input size.
        freeze: ResNet: frozen BatchNorm + stem + layer1 (default: when ``weights`` are given);
            ViT: the whole ViT frozen (default: not).
        record: the ViT's architecture record; default: read from ``name`` (its architecture only).
    """
    if kind == "resnet":
        frozen = weights is not None if freeze is None else freeze
        return ResNetBackbone(name or "resnet50", in_chans=in_chans, freeze=frozen)
    if kind == "vit":
        if weights is not None:
            raise ValueError("backbone 'vit': give the checkpoint or folder as the name, not as weights")
        if record is None:
            from medssl.hub import backbone_record

            record = backbone_record(name or "vit_tiny_patch16")
        return ViTPyramidBackbone(record, in_chans=in_chans, img_size=img_size, freeze=bool(freeze))
    raise ValueError(f"backbone kind must be 'resnet' or 'vit', got {kind!r}")
