"""Transfer models built from a plain record, so that a checkpoint alone rebuilds them anywhere.

A record names the head (`classify` / `segment`), its protocol and options, and holds the backbone's
architecture record (`medssl.hub.backbone_record`; a 3-D one gives `medssl.heads.classify3d.VolumeClassifier` on
MONAI's ViT, fine-tuned; 3-D segmentation is UNETR, `medssl.heads.segment3d`). `build_head(record)` builds the
model without reading any file; `init_head(model, record)` is the explicit init step that loads the pretrained
backbone weights once, at the start of training; `save_head` / `load_head` write and read a checkpoint holding the
record and every weight, so that `load_head` works after the backbone's source is gone. `cnn_model` builds the
from-scratch CNN baselines.

Example:
    >>> rec = head_record("classify", "finetune", "vit_tiny_patch16", num_classes=2, img_size=64)
    >>> model = build_head(rec)
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from medssl.heads.classify import FineTuneClassifier, LinearProbe
from medssl.heads.segment import DenseProbe, UNet, ViTSegmenter
from medssl.hub import backbone_record, build_backbone_model, load_backbone_weights
from medssl.train.checkpoint import load_checkpoint, load_exact, save_checkpoint

__all__ = ["HEAD_FILE", "build_head", "cnn_model", "head_file", "head_record", "init_head", "load_head", "save_head"]

log = logging.getLogger("medssl")
HEAD_FILE = "head.pt"  # a transfer run's trained model (record + every weight), in its output folder
OLD_HEAD_FILES = ("model.pt",)  # what recipes/finetune_segment.py wrote before
PROTOCOLS = {"classify": ("probe", "finetune"), "segment": ("probe", "frozen", "finetune")}


def head_record(kind: str, protocol: str, backbone: str | os.PathLike | Mapping[str, Any], num_classes: int,
                img_size: int, in_chans: int = 1, **options: Any) -> dict[str, Any]:
    """The record of a transfer model: head kind, protocol, options and the backbone's architecture.

    Args:
        kind: "classify" or "segment".
        protocol: classify: probe | finetune; segment: probe | frozen | finetune.
        backbone: a `medssl.load_backbone` source (its architecture is read; its weights are not), or an
            architecture record (`medssl.hub.backbone_record`; e.g. a random-init baseline's): no weights to load.
        options: head options (classify: pool, probe_blocks, drop_path; segment: blocks, decoder_dim, drop_path).
    """
    if kind not in PROTOCOLS:
        raise ValueError(f"head kind must be one of {sorted(PROTOCOLS)}, got {kind!r}")
    if protocol not in PROTOCOLS[kind]:
        raise ValueError(f"model.protocol for {kind} must be one of {PROTOCOLS[kind]}, got {protocol!r}")
    given = isinstance(backbone, Mapping)
    return {"kind": kind, "protocol": protocol, "num_classes": int(num_classes), "img_size": int(img_size),
            "in_chans": int(in_chans), "backbone_source": None if given else str(backbone),
            "backbone": dict(backbone) if given else backbone_record(backbone), "options": dict(options)}


def build_head(record: dict[str, Any], backbone: nn.Module | None = None) -> nn.Module:
    """The transfer model of a record, randomly initialised (reads no file).

    Args:
        record: a `head_record`.
        backbone: the ViT to put the head on, already built for `record["backbone"]` (e.g. loaded once with
            `medssl.load_backbone` and copied for several heads); default: a fresh one built from the record.
    """
    o = record["options"]
    if record["backbone"].get("spatial_dims") == 3:
        return _volume_head(record, backbone)
    vit = backbone if backbone is not None else build_backbone_model(
        record["backbone"], img_size=record["img_size"], in_chans=record["in_chans"])
    arch = record["backbone"]
    if (vit.embed_dim, len(vit.blocks)) != (arch["embed_dim"], arch["depth"]):
        raise ValueError(f"build_head: the given backbone ({vit.embed_dim} wide, {len(vit.blocks)} blocks) is not "
                         f"the record's ({arch['embed_dim']} wide, {arch['depth']} blocks)")
    n, protocol = record["num_classes"], record["protocol"]
    if record["kind"] == "classify":
        if protocol == "probe":
            return LinearProbe(vit, n, pool=o.get("pool", "cls"), num_blocks=o.get("probe_blocks", 1))
        return FineTuneClassifier(vit, n, drop_path_rate=o.get("drop_path"), pool=o.get("pool", "mean"))
    if protocol == "probe":
        return DenseProbe(vit, n, num_blocks=o.get("blocks", 4))
    return ViTSegmenter(vit, n, blocks=o.get("blocks", 4), decoder_dim=o.get("decoder_dim", 128),
                        freeze_backbone=protocol == "frozen", drop_path_rate=o.get("drop_path"))


def _volume_head(record: dict[str, Any], backbone: nn.Module | None) -> nn.Module:
    """A 3-D record's model on MONAI's ViT (given, or built from the record): `VolumeClassifier` (finetune) or
    `VolumeProbe` (probe; option `probe_blocks`)."""
    from medssl.heads.classify3d import VolumeClassifier, VolumeProbe
    from medssl.models.monai_vit import build_monai_vit

    if record["kind"] != "classify":
        raise ValueError(f"a 3-D backbone takes the classify heads here (segmentation: "
                         f"medssl.heads.segment3d.build_unetr); got {record['kind']} / {record['protocol']}")
    vit = backbone if backbone is not None else build_monai_vit(record["backbone"], img_size=record["img_size"],
                                                                in_chans=record["in_chans"])
    if record["protocol"] == "probe":
        return VolumeProbe(vit, record["num_classes"], num_blocks=record["options"].get("probe_blocks", 1))
    return VolumeClassifier(vit, record["num_classes"])


def cnn_model(kind: str, num_classes: int, spatial_dims: int = 2, in_chans: int = 1, **options: Any) -> nn.Module:
    """The from-scratch CNN baseline of a head kind, randomly initialised: classify: timm's ResNet-18 (2-D) or
    `medssl.heads.classify3d.resnet3d` (3-D); segment: the medssl `UNet` (options `unet_base`, `unet_levels`).

    Example:
        >>> cnn_model("segment", 3, spatial_dims=3, unet_base=4, unet_levels=2).__class__.__name__
        'UNet'
    """
    if kind == "segment":
        return UNet(in_chans, num_classes, base=int(options.get("unet_base", 16)),
                    levels=int(options.get("unet_levels", 3)), spatial_dims=spatial_dims)
    if kind != "classify":
        raise ValueError(f"cnn_model: kind must be classify or segment, got {kind!r}")
    if spatial_dims == 3:
        from medssl.heads.classify3d import resnet3d

        return resnet3d(num_classes, in_chans)
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)


def init_head(model: nn.Module, record: dict[str, Any]) -> str:
    """The explicit init step: load the pretrained backbone weights named by the record into `model.backbone`
    (a record made from an architecture record names none: the backbone stays as built)."""
    if record["backbone_source"] is None:
        return record["backbone"].get("where", "architecture record")
    if record["backbone"].get("spatial_dims") == 3:  # MONAI's ViT: the hub's 3-D loader, then an exact key check
        from medssl.hub import load_backbone

        vit = load_backbone(record["backbone_source"], img_size=record["img_size"], in_chans=record["in_chans"])
        load_exact(model.backbone, vit.state_dict(), record["backbone_source"])
        return vit.medssl_cfg.get("loaded_from", record["backbone_source"])
    return load_backbone_weights(model.backbone, record["backbone_source"])


def save_head(path: str | os.PathLike, model: nn.Module, record: dict[str, Any], **extra: Any) -> Path:
    """A self-contained checkpoint: the record and every weight (plus `extra`, e.g. classes, metrics)."""
    return save_checkpoint(path, {"model": model.state_dict(), "record": record, **extra})


def head_file(run_dir: str | os.PathLike) -> Path:
    """The trained transfer model of a run folder: :data:`HEAD_FILE`, or the name an older run wrote (read
    with a DeprecationWarning and a log line); FileNotFoundError when there is neither."""
    run_dir = Path(run_dir)
    if (run_dir / HEAD_FILE).is_file():
        return run_dir / HEAD_FILE
    for old in OLD_HEAD_FILES:
        if (run_dir / old).is_file():
            msg = (f"{run_dir}: reading {old}, the old name of a transfer run's model; runs now write {HEAD_FILE} "
                   "(rename the file to silence this)")
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            log.warning(msg)
            return run_dir / old
    raise FileNotFoundError(f"{run_dir}: no {HEAD_FILE} (not a finished transfer run folder?)")


def load_head(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a transfer model from its checkpoint alone (a file, or a run folder: its :data:`HEAD_FILE`);
    returns (model in eval mode, checkpoint dict)."""
    if Path(path).is_dir():
        path = head_file(path)
    ck = load_checkpoint(path)
    if "record" not in ck or "model" not in ck:
        raise ValueError(f"{path}: not a medssl transfer checkpoint (no 'record' / 'model' entries)")
    model = build_head(ck["record"])
    load_exact(model, ck["model"], str(path))
    return model.eval(), ck
