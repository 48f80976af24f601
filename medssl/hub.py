"""Backbones in other projects: `load_backbone`, `save_backbone`, `list_backbones`.

A backbone is a plain timm `VisionTransformer` (a 3-D backbone: MONAI's `monai.networks.nets.ViT`, the encoder
of MONAI's UNETR; see `medssl.models.monai_vit`), or a plain timm ResNet (a CNN pretrained with SparK,
`medssl.models.spark`: its folder's `config.json` says `"family": "cnn"` and the timm name). `load_backbone`
accepts a folder written by `save_backbone`, a medssl training output folder or checkpoint (plain, DDP or
DeepSpeed), an official MAE `.pth` (`{"model": ...}`, with or without the decoder), a plain timm state dict
(`.pth` / `.safetensors`), or a registered architecture name (random initialisation). Nothing is ever
downloaded, and nothing is unpickled beyond tensors and plain containers (`torch.load(weights_only=True)` or
safetensors).

Example:
    >>> vit = load_backbone("vit_tiny_patch16", img_size=64, in_chans=1)
    >>> save_backbone(vit, "/tmp/bb", data="demo")  # doctest: +SKIP
    >>> feats = load_backbone("/tmp/bb", features_only=True)(torch.zeros(1, 1, 64, 64))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from medssl.models.mae import MaskedAutoencoder, is_decoder_key
from medssl.models.pos_embed import resample_pos_embed
from medssl.models.vit import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_vit,
    get_cfg,
    infer_num_heads,
    list_architectures,
)
from medssl.train.checkpoint import load_checkpoint, load_exact, strip_prefixes

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "mlp_ratio")  # in config.json
FORMAT = "medssl-backbone"


def list_backbones() -> list[str]:
    """Registered architecture names that `load_backbone` accepts for random initialisation."""
    return list_architectures()


# ------------------------------------------------------------------------------------------------ reading
def _deepspeed_model_file(folder: Path) -> Path | None:
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        f = folder / tag / "mp_rank_00_model_states.pt"
        return f if f.is_file() else None
    return None


def _backbone_folder(path: Path) -> Path | None:
    """The backbone folder (`config.json` + `model.safetensors`) a source path names: itself, or the `backbone/`
    of a finished medssl training run; None for anything else."""
    if not path.is_dir():
        return None
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return path
    return _backbone_folder(path / "backbone") if (path / "backbone" / CONFIG_NAME).is_file() else None


def backbone_config(source: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a backbone source, without reading its weights: a backbone folder's, a training run's
    `backbone/`, or that of the run a checkpoint file lies in (up to three folders up); {} where there is none."""
    p = Path(source)
    for folder in ([p, p / "backbone"] if p.is_dir() else []) + [q / "backbone" for q in p.parents[:3]]:
        if (folder / CONFIG_NAME).is_file():
            return json.loads((folder / CONFIG_NAME).read_text())
    return {}


def _read_source(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Return (state dict, known config, description) for a file or folder."""
    path = Path(source)
    if path.is_dir():
        folder = _backbone_folder(path)
        if folder is not None:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
            return load_file(str(folder / WEIGHTS_NAME)), cfg, f"backbone folder {folder}"
        ds = _deepspeed_model_file(path) or _deepspeed_model_file(path / "checkpoints")
        if ds is not None:
            return _read_source(ds)
        ckpts = sorted(path.glob("checkpoints/checkpoint-*.pt")) + sorted(path.glob("checkpoint-*.pt"))
        if ckpts:
            return _read_source(ckpts[-1])
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} + {WEIGHTS_NAME}, no backbone/ folder and no "
                                "checkpoint found in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder, and not a registered architecture "
                                f"(known: {', '.join(list_backbones())})")
    if path.suffix == ".safetensors":
        return _spark_encoder(load_checkpoint(path), {}, f"safetensors file {path}")
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    cfg = dict(obj.get("model_config") or {})
    for key in ("model", "module", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path}: holds no tensors that look like model weights")
    return _spark_encoder(state, cfg, f"checkpoint {path}")


_SPARK_PARTS = ("decoder.", "densify.", "mask_tokens.", "head.")  # a SparkResNet's keys besides `encoder.*`


def _spark_encoder(state: dict[str, torch.Tensor], cfg: dict[str, Any], where: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """A whole `SparkResNet` state dict (a pretraining checkpoint: `encoder.*` beside `decoder.*`, `densify.*`,
    `mask_tokens.*`, `head.*`) as its encoder under timm's key names, with the config marked as a CNN (timm name
    from the checkpoint's `model_config["arch"]`, else the block counts); any other state is returned unchanged.

    Only the SparK-only parts are dropped: a key outside them and outside `encoder.*` stays as it is, so the
    exact key check names it.
    """
    s = strip_prefixes(dict(state))
    if "encoder.layer1.0.conv1.weight" not in s or not any(k.startswith(_SPARK_PARTS) for k in s):
        return state, cfg, where
    enc = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in s.items()
           if not k.startswith(_SPARK_PARTS)}
    meta: dict[str, Any] = {"family": "cnn", "provenance": {
        "objective": "spark", **{k: v for k, v in cfg.items() if k not in ("arch", "in_chans")}}}
    if isinstance(cfg.get("arch"), str):
        meta["architecture"] = cfg["arch"]
    if cfg.get("in_chans"):
        meta["in_chans"] = int(cfg["in_chans"])
    return enc, meta, f"{where} (SparK encoder)"


# ------------------------------------------------------------------------------------------------ CNNs
_RESNET_DEPTHS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                  ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                  ((3, 8, 36, 3), True): "resnet152"}


def _is_cnn(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    """True for a ResNet's weights (a SparK backbone folder, a timm ResNet state dict, or a SparK pretraining
    checkpoint / run folder, which `_read_source` has already cut down to its encoder under timm's names)."""
    return meta.get("family") == "cnn" or (
        "layer1.0.conv1.weight" in state and ("conv1.weight" in state or "conv1.0.weight" in state))


def _first_conv_key(state: dict[str, torch.Tensor]) -> str:
    return "conv1.weight" if "conv1.weight" in state else "conv1.0.weight"  # deep stems (resnet10t, -D): conv1.0


def _resnet_name(state: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> str:
    """The timm name of a ResNet state dict: config.json's `architecture`, else the block counts of the standard
    ResNets (18 / 34 / 50 / 101 / 152)."""
    if meta.get("architecture"):
        return str(meta["architecture"])
    blocks = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1)
                   for i in (1, 2, 3, 4))
    name = _RESNET_DEPTHS.get((blocks, "layer1.0.conv3.weight" in state))
    if name is None or "conv1.0.weight" in state:
        raise ValueError(f"{where}: a ResNet with {blocks} blocks per stage that is none of the standard ones; "
                         "save it with medssl.save_backbone (which records its timm name)")
    return name


def _cnn_state(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A ResNet state dict mapped onto `model` (as `filter_state_dict` for a ViT): the classifier dropped unless
    it fits the model's, the first conv adapted to the model's channels. Returns (state, keys allowed missing)."""
    own = model.state_dict()
    state = {k: v for k, v in strip_prefixes(dict(state)).items()
             if not k.startswith("fc.") or (k in own and own[k].shape == v.shape)}
    first = _first_conv_key(state)
    state[first] = adapt_patch_embed(state[first], int(own[first].shape[1]))
    return state, {k for k in own if k.startswith("fc.") and k not in state}


def _load_cnn_backbone(state: dict[str, torch.Tensor], meta: dict[str, Any], where: str, in_chans: int | None,
                       **timm_kw: Any) -> nn.Module:
    """A ResNet source as `timm.create_model(name, **timm_kw)`, with the exact key check (only a fresh classifier
    may stay at its initialisation)."""
    import timm

    state = strip_prefixes(dict(state))
    name = _resnet_name(state, meta, where)
    chans = in_chans or int(state[_first_conv_key(state)].shape[1])
    model = timm.create_model(name, pretrained=False, in_chans=chans, **timm_kw)
    mapped, allowed = _cnn_state(state, model)
    load_exact(model, mapped, f"{where} ({name})", allowed)
    keep = {k: v for k, v in meta.items() if k not in ("in_chans", "arch")}
    model.medssl_cfg = {**keep, "family": "cnn", "architecture": name, "in_chans": chans,
                        "mean": meta.get("mean") or _default_norm(chans)[0],
                        "std": meta.get("std") or _default_norm(chans)[1], "loaded_from": where}
    return model


def _arch_from_state(state: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Architecture of a ViT state dict (config.json values win where present)."""
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"{where}: no 'patch_embed.proj.weight': not a ViT / MAE state dict "
                         f"(first keys: {sorted(state)[:5]})")
    w = state["patch_embed.proj.weight"]  # [D, C, p, p] (3-D: [D, C, pd, ph, pw])
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    n_tok = state["pos_embed"].shape[1] - (1 if "cls_token" in state else 0) if "pos_embed" in state else 0
    if w.ndim == 5:
        return _volume_arch(state, cfg, where, depth, n_tok)
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    if cfg.get("img_size"):
        img = cfg["img_size"]
        img_size = (img, img) if isinstance(img, int) else tuple(img)
    else:
        side = int(math.isqrt(n_tok))
        if side * side != n_tok:
            raise ValueError(f"{where}: {n_tok} position tokens are not a square grid and no img_size is "
                             "recorded; save it with medssl.save_backbone or pass the config")
        img_size = (side * patch, side * patch)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    arch = dict(embed_dim=embed_dim, depth=depth, in_chans=in_chans, patch_size=patch, img_size=img_size,
                num_heads=int(cfg.get("num_heads") or infer_num_heads(embed_dim)),
                mlp_ratio=float(fc1.shape[0] / embed_dim) if fc1 is not None else 4.0)
    if "cls_token" not in state and "pos_embed" in state:  # an MAE pretrained with model.cls_token=false
        arch["cls_token"] = False
    return arch


def _volume_arch(state: dict[str, torch.Tensor], cfg: dict[str, Any], where: str, depth: int, n_tok: int
                 ) -> dict[str, Any]:
    """Architecture of a 3-D encoder state dict (Conv3d patch embedding); the crop comes from config.json or, for a
    cubic grid, from the number of position tokens."""
    w = state["patch_embed.proj.weight"]  # [D, C, pd, ph, pw]
    patch = [int(p) for p in w.shape[2:]]
    if cfg.get("img_size"):
        img_size = tuple(int(v) for v in cfg["img_size"])
    else:
        side = round(n_tok ** (1 / 3))
        if side ** 3 != n_tok:
            raise ValueError(f"{where}: {n_tok} position tokens are not a cubic grid and no img_size is recorded")
        img_size = tuple(side * p for p in patch)
    embed_dim = int(w.shape[0])
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return dict(embed_dim=embed_dim, depth=depth, in_chans=int(w.shape[1]),
                patch_size=patch[0] if len(set(patch)) == 1 else patch, img_size=img_size,
                num_heads=int(cfg.get("num_heads") or infer_num_heads(embed_dim)),
                mlp_ratio=float(fc1.shape[0] / embed_dim) if fc1 is not None else 4.0, spatial_dims=3,
                cls_token="cls_token" in state, norm_eps=float(cfg.get("norm_eps", 1e-6)))


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a [D, C, p, p] (or [D, C, pd, ph, pw]) patch-embedding kernel to `in_chans` (RGB filters summed for
    1 channel)."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / c)
    return weight.repeat(1, reps, *[1] * (weight.ndim - 2))[:, :in_chans] * (c / in_chans)


def filter_state_dict(state: dict[str, torch.Tensor], model: VisionTransformer, arch: dict[str, Any]
                      ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Map a foreign ViT/MAE state dict onto `model` (timm's checkpoint_filter_fn, in one place).

    Strips wrapper prefixes, drops the MAE decoder and a head of the wrong shape, resamples the position
    embedding to the model's grid (bicubic, cls untouched), adapts the input channels, and moves `norm` to
    `fc_norm` when the model pools with fc_norm. Returns (state dict, keys allowed to stay missing).
    """
    state = strip_prefixes(dict(state))
    out: dict[str, torch.Tensor] = {}
    allowed_missing: set[str] = set()
    own = model.state_dict()
    uses_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    for k, v in state.items():
        if is_decoder_key(k):
            continue
        if k.startswith("head.") and (k not in own or own[k].shape != v.shape):
            continue
        if k == "pos_embed":
            old = (arch["img_size"][0] // arch["patch_size"], arch["img_size"][1] // arch["patch_size"])
            v = resample_pos_embed(v, model.patch_embed.grid_size, old, model.num_prefix_tokens)
        elif k == "patch_embed.proj.weight":
            v = adapt_patch_embed(v, model.patch_embed.proj.in_channels)
        elif k.startswith("norm.") and uses_fc_norm:
            k = "fc_norm." + k[len("norm."):]
        out[k] = v
    for k in own:
        if k.startswith("head.") and k not in out:
            allowed_missing.add(k)
        if k.startswith("fc_norm.") and k not in out:
            allowed_missing.add(k)
    return out, allowed_missing


# ------------------------------------------------------------------------------------------------ models
class ViTFeatures(nn.Module):
    """Wraps a ViT to return a list of NCHW feature maps from `out_indices` blocks."""

    def __init__(self, vit: VisionTransformer, out_indices: tuple[int, ...]):
        super().__init__()
        depth = len(vit.blocks)
        bad = [i for i in out_indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for a ViT with {depth} blocks")
        self.vit = vit
        self.out_indices = tuple(i % depth for i in out_indices)
        stride = vit.patch_embed.patch_size[0]
        self.feature_info = [dict(num_chs=vit.embed_dim, reduction=stride, module=f"blocks.{i}")
                             for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(x, indices=list(self.out_indices), output_fmt="NCHW",
                                              intermediates_only=True)  # each [N, D, h, w]


def load_backbone(source: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None,
                  in_chans: int | None = None, num_classes: int = 0, global_pool: str | None = None,
                  drop_path_rate: float = 0.0, features_only: bool = False,
                  out_indices: tuple[int, ...] | list[int] | None = None, attn_impl: str | None = None,
                  dynamic_img_size: bool | None = None) -> nn.Module:
    """Load a ViT backbone from a folder, checkpoint, state dict or registered name.

    Args:
        source: backbone folder / training run / checkpoint / `.safetensors` / registered name.
        img_size: input size; a different size resamples the position embedding.
        in_chans: input channels; a different count adapts the patch embedding.
        num_classes: >0 adds a freshly initialised linear head.
        global_pool: timm pooling ('token', 'avg', ...); default: timm's ('token').
        drop_path_rate: stochastic depth for fine-tuning.
        features_only: return a module giving a list of NCHW maps (dynamic image size on by default).
        out_indices: blocks to read in features_only mode (default: four evenly spaced, last included).

    Returns:
        `nn.Module`: the timm VisionTransformer (or its `ViTFeatures` wrapper); `.medssl_cfg` holds the
        architecture, normalisation and provenance. A CNN source (a SparK backbone folder, a timm ResNet state
        dict) comes back as `timm.create_model(name, in_chans=..., num_classes=..., global_pool=...,
        features_only=..., out_indices=...)` with its weights (any input size fits; `img_size` is only recorded).
        A 3-D backbone comes back as MONAI's
        `monai.networks.nets.ViT` (`img_size`: the crop, one int or three; `in_chans` as above), which returns
        (tokens after the final norm [N, L, D], every block's tokens): the encoder of MONAI's UNETR.
    """
    state, meta, where = _source(source)
    if state is not None and _is_cnn(strip_prefixes(state), meta):  # a ResNet: timm's own model and keywords
        if dynamic_img_size or attn_impl not in (None, "auto"):
            raise ValueError(f"{where}: a CNN backbone takes no dynamic_img_size / attn_impl (any size fits it)")
        kw_cnn: dict[str, Any] = dict(drop_path_rate=drop_path_rate)
        if features_only:
            kw_cnn["features_only"] = True
            if out_indices is not None:
                kw_cnn["out_indices"] = tuple(out_indices)
        else:
            kw_cnn["num_classes"] = num_classes
            if global_pool is not None:
                kw_cnn["global_pool"] = global_pool
        model = _load_cnn_backbone(state, meta, where, in_chans, **kw_cnn)
        if img_size is not None:
            model.medssl_cfg["img_size"] = list((img_size, img_size) if isinstance(img_size, int) else img_size)
        return model
    if state is not None and strip_prefixes(state).get("patch_embed.proj.weight", torch.zeros(0)).ndim == 5:
        bad = {"num_classes": num_classes, "global_pool": global_pool, "features_only": features_only,
               "out_indices": out_indices, "drop_path_rate": drop_path_rate}
        bad = {k: v for k, v in bad.items() if v not in (None, 0, 0.0, False)}
        if bad:
            raise ValueError(f"{where}: a 3-D backbone loads as MONAI's ViT, which takes none of {sorted(bad)} (its "
                             "forward returns every block's tokens; add heads around it, e.g. MONAI's UNETR)")
        return _load_volume_backbone(state, meta, where, img_size, in_chans)
    kw: dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if global_pool is not None:
        kw["global_pool"] = global_pool
    dyn = features_only if dynamic_img_size is None else dynamic_img_size
    if dyn:
        kw["dynamic_img_size"] = True
    arch = _arch_from_state(strip_prefixes(state), meta, where) if state is not None else meta["arch"]
    model = build_backbone_model({**arch, "meta": meta, "where": where}, img_size=img_size, in_chans=in_chans,
                                 attn_impl=attn_impl, **kw)
    if state is not None:
        _load_vit_state(model, state, arch, where)
    if features_only:
        depth = arch["depth"]
        idx = tuple(out_indices) if out_indices is not None else tuple(
            sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))
        feats = ViTFeatures(model, idx)
        feats.medssl_cfg = model.medssl_cfg
        return feats
    return model


def _load_volume_backbone(state: dict[str, torch.Tensor], meta: dict[str, Any], where: str,
                          img_size: int | tuple[int, ...] | None, in_chans: int | None) -> nn.Module:
    """A 3-D encoder into MONAI's ViT: renamed keys, position embedding resampled to the crop, channels adapted,
    the exact key check (only MONAI's unused cross-attention norms may stay at their initialisation)."""
    from medssl.models.monai_vit import build_monai_vit, to_monai_state_dict, unused_monai_keys
    from medssl.models.pos_embed import resample_pos_embed_3d

    state = strip_prefixes(dict(state))
    arch = _arch_from_state(state, meta, where)
    target = tuple(arch["img_size"]) if img_size is None else (
        (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size))
    vit = build_monai_vit(arch, target, in_chans)
    patch = (arch["patch_size"],) * 3 if isinstance(arch["patch_size"], int) else tuple(arch["patch_size"])
    state = {k: v for k, v in state.items() if not is_decoder_key(k)}
    if "pos_embed" in state:
        old = tuple(s // p for s, p in zip(arch["img_size"], patch))
        new = tuple(s // p for s, p in zip(target, patch))
        state["pos_embed"] = resample_pos_embed_3d(state["pos_embed"], new, old)
    chans = in_chans or arch["in_chans"]
    state["patch_embed.proj.weight"] = adapt_patch_embed(state["patch_embed.proj.weight"], chans)
    load_exact(vit, to_monai_state_dict(state), f"{where} (3-D, {arch['embed_dim']} wide, {arch['depth']} blocks)",
               unused_monai_keys(vit))
    keep = {k: v for k, v in meta.items() if k not in ("img_size", "in_chans", "arch")}
    vit.medssl_cfg = {**keep, **arch, "img_size": list(target), "in_chans": chans,
                      "mean": meta.get("mean") or _default_norm(chans)[0],
                      "std": meta.get("std") or _default_norm(chans)[1], "loaded_from": where}
    return vit


def _source(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], str]:
    """(state dict or None for a registered name, metadata, description) of a backbone source."""
    name = str(source)
    if not Path(name).exists() and name in list_backbones():
        cfg = get_cfg(name)
        arch = dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                    patch_size=cfg.patch_size, img_size=(cfg.img_size, cfg.img_size), in_chans=cfg.in_chans,
                    mlp_ratio=cfg.mlp_ratio)
        return None, {"architecture": name, "source": "random initialisation", "arch": arch}, name
    return _read_source(source)


def backbone_record(source: str | os.PathLike) -> dict[str, Any]:
    """The architecture record of a backbone source (no model is built): enough for `build_backbone_model`.

    A detector or classifier stores this record in its checkpoint, so that it can be rebuilt on a machine
    where the source no longer exists; the weights then come from the checkpoint itself. A backbone folder's
    architecture is read from its `config.json` alone (its weights file is not opened); any other source's
    (a 3-D backbone's, or an old config's that lacks some of `ARCH_KEYS`) from its state dict.
    """
    folder = _backbone_folder(Path(source))
    meta = json.loads((folder / CONFIG_NAME).read_text()) if folder is not None else {}
    if all(k in meta for k in ARCH_KEYS) and meta.get("spatial_dims", 2) == 2:  # a 3-D one: from its weights
        img = meta["img_size"]
        arch = {k: int(meta[k]) for k in ("embed_dim", "depth", "in_chans", "patch_size")}
        arch.update(img_size=(img, img) if isinstance(img, int) else tuple(img), num_heads=int(meta["num_heads"]),
                    mlp_ratio=float(meta["mlp_ratio"]))
        if meta.get("cls_token") is False:  # `save_backbone` records a missing class token
            arch["cls_token"] = False
        where = f"backbone folder {folder}"
    else:
        state, meta, where = _source(source)
        arch = _arch_from_state(strip_prefixes(state), meta, where) if state is not None else meta["arch"]
    keep = {k: v for k, v in meta.items() if k in ("architecture", "mean", "std", "provenance", "source")}
    return {**arch, "img_size": list(arch["img_size"]), "meta": keep, "where": where}


def build_backbone_model(record: dict[str, Any], *, img_size: int | tuple[int, int] | None = None,
                         in_chans: int | None = None, attn_impl: str | None = None, **kw: Any) -> nn.Module:
    """A randomly initialised timm ViT from an architecture record (`backbone_record`); reads no file.

    Args:
        record: embed_dim, depth, num_heads, patch_size, img_size, in_chans, mlp_ratio (+ optional meta).
        img_size / in_chans: the input the model is built for (default: the record's).
        kw: timm VisionTransformer keywords (num_classes, global_pool, drop_path_rate, dynamic_img_size).
    """
    if record.get("spatial_dims") == 3:
        raise ValueError(f"{record.get('where', 'this record')}: a 3-D backbone is MONAI's ViT: use "
                         "medssl.load_backbone, or medssl.heads.segment3d.build_unetr for segmentation")
    if record.get("cls_token") is False:  # no class token: pool the patch tokens unless told otherwise
        kw["class_token"] = False
        if kw.get("global_pool") in (None, "token"):
            kw["global_pool"] = "avg"
    target_img = img_size if img_size is not None else record["img_size"]
    if isinstance(target_img, list):
        target_img = tuple(target_img)
    target_chans = in_chans if in_chans is not None else record["in_chans"]
    model = build_vit(record["embed_dim"], record["depth"], record["num_heads"], record["patch_size"], target_img,
                      target_chans, record["mlp_ratio"], attn_impl, **kw)
    meta = record.get("meta", {})
    tgt = (target_img, target_img) if isinstance(target_img, int) else tuple(target_img)
    arch = {k: v for k, v in record.items() if k not in ("img_size", "in_chans", "meta", "where")}
    model.medssl_cfg = {**{k: v for k, v in meta.items() if k not in ("img_size", "in_chans", "arch")}, **arch,
                        "img_size": list(tgt), "in_chans": target_chans,
                        "mean": meta.get("mean") or _default_norm(target_chans)[0],
                        "std": meta.get("std") or _default_norm(target_chans)[1],
                        "loaded_from": record.get("where", "architecture record")}
    return model


def _load_vit_state(model: VisionTransformer, state: dict[str, torch.Tensor], arch: dict[str, Any], where: str
                    ) -> None:
    filtered, allowed = filter_state_dict(state, model, arch)
    load_exact(model, filtered, f"{where} ({arch['embed_dim']} wide, {arch['depth']} blocks)", allowed)


def load_backbone_weights(model: nn.Module, source: str | os.PathLike) -> str:
    """Load a backbone source's weights into an already built ViT (or `ViTFeatures`): the explicit init step.

    Position embedding resampled, channels adapted, exact key check, as in `load_backbone`. A registered
    name means random initialisation: nothing is loaded. A CNN source loads into a timm ResNet (plain or
    `features_only`; a detector's) by timm's key names. Returns the source's description.
    """
    state, meta, where = _source(source)
    if state is None:
        return where
    if state is not None and _is_cnn(strip_prefixes(state), meta):  # a timm ResNet (or its features_only form)
        name = _resnet_name(strip_prefixes(state), meta, where)
        mapped, allowed = _cnn_state(state, model)
        load_exact(model, mapped, f"{where} ({name})", allowed)
        return where
    vit = model.vit if isinstance(model, ViTFeatures) else model
    _load_vit_state(vit, state, _arch_from_state(strip_prefixes(state), meta, where), where)
    return where


def _default_norm(in_chans: int) -> tuple[list[float], list[float]]:
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(GRAY_MEAN) * in_chans, list(GRAY_STD) * in_chans


# ------------------------------------------------------------------------------------------------ writing
def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.vit if isinstance(model, ViTFeatures) else model


def save_backbone(model: nn.Module, folder: str | os.PathLike, **provenance: Any) -> Path:
    """Write `model.safetensors` + `config.json` (architecture, input, normalisation, provenance).

    `model` may be a `MaskedAutoencoder` (its encoder is kept), a timm ViT, a `SparkResNet` (its encoder is kept,
    as timm ResNet weights; `config.json` then says `"family": "cnn"` and the timm name), or any of these wrapped
    by DDP / DeepSpeed. Provenance keywords (data=..., steps=..., mean=..., std=...) are recorded as given.
    """
    from medssl.models.spark import SparkResNet

    model = _unwrap(model)
    if isinstance(model, SparkResNet):
        state = model.encoder_state_dict()
        arch = dict(family="cnn", in_chans=model.in_chans, img_size=list(model.img_size))
        provenance["architecture"] = provenance.get("architecture") or model.arch
        provenance.setdefault("objective", "spark")
    elif isinstance(model, MaskedAutoencoder):
        state = model.encoder_state_dict()
        c = model.config
        arch = dict(embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                    patch_size=c["patch_size"], img_size=c["img_size"], in_chans=c["in_chans"],
                    mlp_ratio=c["mlp_ratio"])
        if "spatial_dims" in c:  # 3-D (or no class token): what a loader needs to rebuild it
            arch.update(spatial_dims=c["spatial_dims"], cls_token=c["cls_token"], norm_eps=model.norm.eps)
    elif isinstance(model, VisionTransformer):
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        arch = dict(embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                    patch_size=model.patch_embed.patch_size[0], img_size=list(model.patch_embed.img_size),
                    in_chans=model.patch_embed.proj.in_channels,
                    mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim)
        if model.cls_token is None:  # as a 2-D MAE without one records it; configs with one stay as they were
            arch["cls_token"] = False
    else:
        raise TypeError(f"save_backbone takes a MaskedAutoencoder, a SparkResNet or a timm VisionTransformer, "
                        f"got {type(model).__name__}")
    mean = provenance.pop("mean", None) or _default_norm(arch["in_chans"])[0]
    std = provenance.pop("std", None) or _default_norm(arch["in_chans"])[1]
    name = provenance.pop("architecture", None)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / WEIGHTS_NAME)
    from medssl import __version__

    cfg = {"format": FORMAT, "format_version": 1, "architecture": name, **arch,
           "mean": list(mean), "std": list(std),
           "provenance": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          "medssl_version": __version__, **provenance}}
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
    return out


def load_mae_weights(mae: MaskedAutoencoder, source: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise an MAE from a checkpoint (official MAE `.pth`, medssl run or backbone) to continue pretraining.

    Encoder weights must all be present (the patch embedding is adapted to the MAE's channels). The
    decoder is loaded where present and shaped alike; what stays at its fresh initialisation is returned
    (e.g. `decoder_pred` when going from RGB to 1 channel). The fixed sin-cos embeddings are recomputed
    for the MAE's own grid rather than read. Returns {"loaded": [...], "fresh": [...]}.
    """
    state, meta, where = _read_source(source)
    state = strip_prefixes(state)
    own = mae.state_dict()
    fixed = {"pos_embed", "decoder_pos_embed"}
    loaded, fresh, bad = [], [], []
    new_state = {}
    for k, target in own.items():
        if k in fixed:
            continue
        if k not in state:
            (fresh if is_decoder_key(k) else bad).append(k)
            continue
        v = state[k]
        if k == "patch_embed.proj.weight":
            v = adapt_patch_embed(v, mae.in_chans)
        if v.shape != target.shape:
            if is_decoder_key(k):
                fresh.append(k)
                continue
            bad.append(f"{k} {tuple(v.shape)} != {tuple(target.shape)}")
            continue
        new_state[k] = v
        loaded.append(k)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(("head.", "fc_norm.")))
    if bad or unexpected:
        raise ValueError(f"{where}: does not fit this MAE: missing or mis-shaped encoder keys {bad}, "
                         f"unexpected keys {unexpected}")
    mae.load_state_dict(new_state, strict=False)
    return {"loaded": loaded, "fresh": fresh}
