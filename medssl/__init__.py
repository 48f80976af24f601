"""medssl: self-supervised pretraining of medical-imaging backbones and transfer to clinical tasks.

Public entry points::

    import medssl
    model = medssl.load_backbone("runs/demo/backbone", img_size=224, in_chans=1)
    mae = medssl.create_mae("mae_vit_small_patch16", in_chans=1)
    spark = medssl.create_spark("spark_resnet18", in_chans=1)  # SparK-style masked modelling of a ResNet
"""

from __future__ import annotations

from medssl.utils import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_mae",
    "create_spark",
    "create_vit",
    "list_backbones",
    "load_backbone",
    "save_backbone",
]

_LAZY = {
    "load_backbone": "medssl.hub",
    "save_backbone": "medssl.hub",
    "list_backbones": "medssl.hub",
    "create_mae": "medssl.models.mae",
    "create_spark": "medssl.models.spark",
    "create_vit": "medssl.models.vit",
}


__getattr__ = lazy_exports("medssl", _LAZY)  # imported on first use
