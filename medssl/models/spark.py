"""SparK-style masked image modelling of a timm ResNet (Tian et al., ICLR 2023), written for medssl.

The encoder is a plain timm ResNet (`encoder.*` here; `encoder_state_dict()` gives timm's own key names, which load
into `timm.create_model(name)` unchanged). During pretraining it runs as a sparse convnet would:

- a random mask is drawn per image on a grid of `mask_patch`-pixel cells (`mask_ratio` of them removed; the batch
  RNG draws it, as the MAE does, so an exact resume redraws the same masks);
- the visibility map is brought to every layer's resolution: repeated (nearest) where the layer is finer than a
  cell, max-pooled (a coarse position is visible when any cell under it is) where it is coarser;
- the input's masked pixels are zeroed, and after every convolution, pooling and BatchNorm the masked positions
  are zeroed again; BatchNorm computes its batch statistics over the visible positions only (SparK's sparse BN).
  A visible feature therefore depends on visible pixels only: masked pixels cannot leak in.

Mask granularity: SparK masks cells of the encoder's total stride (32 px for a ResNet: 7 x 7 cells at 224 px). At
our 64 px demo size that is a 2 x 2 grid, too coarse to learn much from, so `mask_patch` may be any power of two
(default: the total stride, as SparK); the grid must hold at least 2 cells (one visible, one masked). A cell
smaller than the stride makes the deep maps mostly visible (max-pooled visibility: a coarse position is masked
only when every cell under it is), which still keeps masked pixels out but masks far less at depth than
`mask_ratio` says (see the differences below, point 4).

Decoder: light and hierarchical (UNet-like). Each stage's map (strides 32, 16, 8, 4) is densified: masked
positions are filled with that stage's learned mask token, then BatchNorm + a conv (1 x 1 at the deepest stage,
3 x 3 elsewhere) bring it to the decoder width of its level. From the deepest level the decoder upsamples by 2
(transposed conv + conv3x3-BN-ReLU, width halved each time) to full resolution, adding the densified stage maps
on the way, and a 1 x 1 conv predicts the pixels. The loss is the MSE on masked cells only, against per-cell
normalised targets (norm_pix_loss, as the MAE; a cell is one `mask_patch` x `mask_patch` patch).

`forward` returns (loss, pred [N, L, p*p*C], mask [N, L] with 1 = removed) in the MAE's form, so the pretraining
procedure, its task and its reconstruction figure take either model.

Differences from SparK (github:keyu-tian/SparK, `pretrain/spark.py`, `pretrain/decoder.py`), kept as they are
because runs were made with this code:

1. Densify order: here the masked positions are filled with the mask token first and an ordinary (dense)
   BatchNorm then runs over all positions, tokens included (its statistics mix features and tokens). SparK
   applies its sparse BatchNorm to the visible positions only, then fills in the mask tokens, then the conv.
2. Decoder block: here a 2 x 2 transposed conv (stride 2, to the halved width) + one conv3x3-BN-ReLU; SparK's
   `UNetBlock` is a 4 x 4 transposed conv (stride 2, padding 1, width kept) + conv3x3-BN-ReLU6 +
   conv3x3-BN (to the halved width, no activation after it).
3. Mask-token init: here `trunc_normal_(std=0.02)` with PyTorch's default bounds (+-2, i.e. 100 standard
   deviations: effectively an untruncated normal); SparK truncates at +-0.02 (one standard deviation).
4. Cells smaller than the stride: SparK's cell is the total stride, so every stage is masked in the same
   proportion. With `mask_patch` < 32 the stride-32 map is masked only where all cells under it are: at 64 px,
   16 px cells (4 x 4 grid) and mask_ratio 0.6 (10 of 16 cells masked), the masked fraction is 0.625 at strides
   4, 8 and 16 but C(12, 6) / C(16, 10) = 924 / 8008 = 3/26 ~ 0.115 at stride 32 (a stride-32 position covers
   4 cells; 0.1153 measured over 10,000 random masks); with 32 px cells it is 0.5 at every stage.

Example:
    >>> spark = create_spark("spark_resnet18", img_size=64, in_chans=1, mask_patch=16, decoder_dim=64)
    >>> loss, pred, mask = spark(torch.rand(2, 1, 64, 64))
    >>> pred.shape, mask.shape
    (torch.Size([2, 16, 256]), torch.Size([2, 16]))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.models.mae import patchify, unpatchify

__all__ = ["SparkResNet", "SparseBatchNorm2d", "create_spark", "sparsify"]


class SparseContext:
    """The visibility map of the current masked forward pass, shared by every sparse layer of one encoder.

    `active` is None outside a masked pass: the layers then run densely, exactly as timm's.
    """

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None  # [N, 1, g, g] bool at the mask grid (True = visible)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def set(self, active: torch.Tensor | None) -> None:
        self.active, self._cache = active, {}

    def at(self, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The visibility map at a layer's resolution `size` (h, w): [N, 1, h, w] bool."""
        assert self.active is not None
        key = (int(size[0]), int(size[1]))
        if key not in self._cache:
            self._cache[key] = resize_mask(self.active, key)
        return self._cache[key]


def resize_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, 1, g1, g2] bool -> [N, 1, h, w] bool: repeated where finer, max-pooled (any visible) where coarser."""
    g1, g2 = active.shape[-2:]
    h, w = size
    if (h, w) == (g1, g2):
        return active
    if h % g1 == 0 and w % g2 == 0:
        return active.repeat_interleave(h // g1, dim=2).repeat_interleave(w // g2, dim=3)
    if g1 % h == 0 and g2 % w == 0:
        return F.max_pool2d(active.float(), (g1 // h, g2 // w)) > 0
    raise ValueError(f"a mask grid of {g1} x {g2} cells does not tile a {h} x {w} feature map")


def _masked(x: torch.Tensor, ctx: SparseContext | None) -> torch.Tensor:
    if ctx is None or ctx.active is None:
        return x
    return x * ctx.at(x.shape[-2:]).to(x.dtype)


class SparseConv2d(nn.Conv2d):
    """`nn.Conv2d` whose output is zero at masked positions during a masked pass (same parameters, same keys)."""

    sparse: SparseContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _masked(super().forward(x), self.sparse)


class SparseMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d`, masked positions zeroed after pooling."""

    sparse: SparseContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _masked(super().forward(x), self.sparse)


class SparseAvgPool2d(nn.AvgPool2d):
    """`nn.AvgPool2d` (ResNet-D shortcuts), masked positions zeroed after pooling."""

    sparse: SparseContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _masked(super().forward(x), self.sparse)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` that, in a masked training pass, normalises with the statistics of the visible positions
    only (and updates its running statistics from them); masked positions come out zero. Same keys as timm's BN."""

    sparse: SparseContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.sparse
        if ctx is None or ctx.active is None:
            return super().forward(x)
        if not self.training:  # running statistics: a per-position affine map
            return _masked(super().forward(x), ctx)
        n, c, h, w = x.shape
        visible = ctx.at((h, w))[:, 0]  # [N, h, w]
        xv = x.permute(0, 2, 3, 1)[visible]  # [M, C]: the visible positions
        yv = super().forward(xv[:, :, None, None])[:, :, 0, 0]  # BN over the M positions: [M, C]
        out = yv.new_zeros(n, h, w, c).index_put((visible,), yv)  # [N, h, w, C], zero where masked
        return out.permute(0, 3, 1, 2)


_SPARSE = {nn.Conv2d: SparseConv2d, nn.MaxPool2d: SparseMaxPool2d, nn.AvgPool2d: SparseAvgPool2d,
           nn.BatchNorm2d: SparseBatchNorm2d}
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Identity, nn.Sequential, nn.ModuleList, nn.Flatten,
              nn.Linear, nn.Dropout)


def sparsify(encoder: nn.Module, ctx: SparseContext) -> nn.Module:
    """Make a timm ResNet run sparsely under `ctx`, in place: its convolutions, poolings and BatchNorms become
    their sparse subclasses (same parameters and buffers, so the same state-dict keys); the rest must be
    position-wise or a container. Raises ValueError for any other layer (e.g. squeeze-excitation, whose global
    pooling would let masked positions in).
    """
    from timm.layers import SelectAdaptivePool2d
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    allowed = (*_POINTWISE, SelectAdaptivePool2d, BasicBlock, Bottleneck, ResNet)
    for name, m in encoder.named_modules():
        if type(m) in _SPARSE:
            m.__class__ = _SPARSE[type(m)]  # a subclass adding only `forward`: parameters and keys unchanged
            m.sparse = ctx
        elif type(m) in _SPARSE.values():
            m.sparse = ctx
        elif name.startswith(("global_pool", "fc")) or isinstance(m, allowed):
            continue  # the classifier is never run in pretraining
        else:
            raise ValueError(f"cannot run layer {name!r} ({type(m).__name__}) sparsely: SparK needs a plain "
                             "ResNet (convolutions, poolings, BatchNorm and position-wise activations)")
    return encoder


class _UpBlock(nn.Sequential):
    """x2 upsampling: transposed conv (k2 s2) then conv3x3-BN-ReLU. [N, cin, h, w] -> [N, cout, 2h, 2w]."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SparkResNet(nn.Module):
    """SparK masked modelling around a timm ResNet: sparse encoder, hierarchical decoder, masked-cell MSE.

    Args:
        arch: timm ResNet name (resnet18, resnet34, resnet50, resnet10t, ...).
        img_size: the square pretraining crop (a multiple of the total stride and of `mask_patch`).
        in_chans: input channels.
        mask_patch: mask cell size in pixels, a power of two (default: the encoder's total stride, 32).
        decoder_dim: decoder width at the deepest level (halved at each x2 upsampling, at least 8).
        norm_pix_loss: targets normalised per cell (mean, unbiased std), as the MAE's norm_pix_loss.
    """

    def __init__(self, arch: str = "resnet18", img_size: int = 224, in_chans: int = 3, mask_patch: int | None = None,
                 decoder_dim: int = 256, norm_pix_loss: bool = True) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
        self.sparse = SparseContext()
        sparsify(self.encoder, self.sparse)
        info = self.encoder.feature_info[-4:]  # the four stages (strides 4, 8, 16, 32 for a ResNet)
        stride = int(info[-1]["reduction"])
        p = int(mask_patch or stride)
        if p < 1 or p & (p - 1):
            raise ValueError(f"mask_patch must be a power of two, got {mask_patch}")
        if img_size % max(stride, p):
            raise ValueError(f"img_size {img_size} must be a multiple of the encoder stride {stride} and of "
                             f"mask_patch {p}")
        if decoder_dim < 8:
            raise ValueError(f"decoder_dim must be at least 8, got {decoder_dim}")
        self.arch, self.in_chans, self.norm_pix_loss = arch, in_chans, norm_pix_loss
        self.img_size, self.patch, self.patch_size = (img_size, img_size), (p, p), p
        self.grid = (img_size // p, img_size // p)
        if self.grid[0] * self.grid[1] < 2:
            raise ValueError(f"mask_patch {p} leaves {self.grid[0]} x {self.grid[1]} mask cell(s) at {img_size} px: "
                             "masking needs at least 2 cells (one visible, one masked)")
        self.spatial_dims = 2
        chans = [int(f["num_chs"]) for f in info][::-1]  # deepest first
        ups = int(math.log2(stride))
        widths = [max(decoder_dim >> k, 8) for k in range(ups + 1)]  # decoder width at strides 32, 16, .., 1
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in chans])
        self.densify = nn.ModuleList([
            nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, widths[k], 1 if k == 0 else 3, padding=0 if k == 0 else 1))
            for k, c in enumerate(chans)])
        self.decoder = nn.ModuleList([_UpBlock(widths[k], widths[k + 1]) for k in range(ups)])
        self.head = nn.Conv2d(widths[-1], in_chans, 1)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.config = dict(arch=arch, img_size=img_size, in_chans=in_chans, mask_patch=p, decoder_dim=decoder_dim,
                           norm_pix_loss=norm_pix_loss)

    # ----------------------------------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (mask cells, channel innermost, as the MAE)."""
        return patchify(imgs, self.patch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return unpatchify(x, self.patch, self.grid, self.in_chans)

    def random_active(self, n: int, mask_ratio: float, device: torch.device | str = "cpu",
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Visible cells per image, [N, 1, g, g] bool: `round(L * (1 - mask_ratio))` of the L cells (at least one
        visible and one masked), those of smallest noise (default: `torch.rand`, the batch RNG)."""
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        length = self.grid[0] * self.grid[1]
        keep = min(max(round(length * (1 - mask_ratio)), 1), length - 1)
        if noise is None:
            noise = torch.rand(n, length, device=device)  # [N, L]
        ids_keep = torch.argsort(noise, dim=1)[:, :keep]  # [N, keep]
        active = torch.zeros(n, length, dtype=torch.bool, device=noise.device).scatter_(1, ids_keep, True)
        return active.view(n, 1, *self.grid)

    # ----------------------------------------------------------------------------------------- passes
    def encode(self, imgs: torch.Tensor, active: torch.Tensor | None) -> tuple[list[torch.Tensor],
                                                                               list[torch.Tensor | None]]:
        """The four stage maps (deepest first; each [N, C_s, H/s, W/s]), run sparsely under `active`
        ([N, 1, g, g] bool; None: densely, as timm's ResNet), and the visibility maps at their resolutions."""
        e = self.encoder
        self.sparse.set(active)
        try:
            x = _masked(imgs, self.sparse)  # masked pixels zeroed: [N, C, H, W]
            x = e.maxpool(e.act1(e.bn1(e.conv1(x))))  # [N, C0, H/4, W/4]
            feats = []
            for layer in (e.layer1, e.layer2, e.layer3, e.layer4):
                x = layer(x)
                feats.append(x)
            feats = feats[::-1]  # strides 32, 16, 8, 4
            masks = [self.sparse.at(f.shape[-2:]) if active is not None else None for f in feats]
        finally:
            self.sparse.set(None)
        return feats, masks

    def decode(self, feats: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
        """Densify each stage (mask tokens in masked positions), upsample to full size: [N, C, H, W] pixels."""
        dense = [self.densify[k](f if m is None else torch.where(m, f, self.mask_tokens[k].to(f.dtype)))
                 for k, (f, m) in enumerate(zip(feats, masks))]  # [N, width_k, H/s_k, W/s_k]
        x = dense[0]  # stride 32
        for k, up in enumerate(self.decoder, start=1):
            x = up(x)  # stride 32 / 2^k
            if k < len(dense):
                x = x + dense[k]
        return self.head(x)  # [N, C, H, W]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per cell [N, L] (against the normalised cell when norm_pix_loss), averaged over masked cells."""
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)  # var unbiased
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.6, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [N, L, p*p*C], mask [N, L] with 1 = removed), as `MaskedAutoencoder.forward`."""
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans or tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"images of shape {tuple(imgs.shape)} do not fit {self.in_chans} channels at "
                             f"{self.img_size[0]} px")
        active = self.random_active(imgs.shape[0], mask_ratio, imgs.device, noise)  # [N, 1, g, g]
        feats, masks = self.encode(imgs, active)
        pred = self.patchify(self.decode(feats, masks))  # [N, L, p*p*C]
        mask = (~active).flatten(1).float()  # [N, L], 1 = removed
        return self.forward_loss(imgs, pred, mask), pred, mask

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay beyond the 1-D ones (timm's convention): the mask tokens, as SparK."""
        return {f"mask_tokens.{k}" for k in range(len(self.mask_tokens))}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's own names (they load into `timm.create_model(arch)`)."""
        return {k[len("encoder."):]: v for k, v in self.state_dict().items() if k.startswith("encoder.")}


def create_spark(name: str = "spark_resnet18", **overrides: Any) -> SparkResNet:
    """Build SparK pretraining of a timm ResNet: `create_spark("spark_resnet18", img_size=224, in_chans=1)`."""
    if not name.startswith("spark_"):
        raise ValueError(f"a SparK model name looks like spark_<timm resnet>, got {name!r}")
    return SparkResNet(arch=name[len("spark_"):], **overrides)
