"""medssl: self-supervised pretraining of medical-imaging backbones and transfer to clinical tasks.

Public entry points::

    import medssl
    model = medssl.load_backbone("runs/demo/backbone", img_size=224, in_chans=1)
    mae = medssl.create_mae("mae_vit_small_patch16", in_chans=1)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_mae",
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
    "create_vit": "medssl.models.vit",
}


def __getattr__(name: str) -> Any:
    """Import the public API lazily so that `import medssl` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medssl' has no attribute {name!r}")
