"""The ViT rows' models come from medssl.heads.build: the same architecture, init and outputs as the benchmark's
hand-built heads (the factory it had before), for pretrained rows and their random-init twins."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks import cells
from benchmarks.cells import Backbone, _build, twin_source
from medssl import load_backbone
from medssl.heads.classify import FineTuneClassifier, LinearProbe
from medssl.heads.segment import DenseProbe, ViTSegmenter
from medssl.hub import backbone_record, save_backbone
from medssl.models.vit import build_vit

torch.set_num_threads(1)
HP = {"blocks": 2, "decoder_dim": 16, "drop_path": 0.2, "pool": "cls+mean", "lr": 1e-3}


def _by_hand(vit, seg, protocol, hp, c):
    """What benchmarks/cells.py built before it used medssl.heads.build."""
    depth = len(vit.blocks)
    if protocol == "probe":
        k = min(int(hp.get("blocks", 4)), depth)
        return DenseProbe(vit, c, num_blocks=k) if seg else LinearProbe(vit, c, pool=hp.get("pool", "cls+mean"),
                                                                        num_blocks=k)
    dp = float(hp.get("drop_path", 0.1))
    return (ViTSegmenter(vit, c, blocks=int(hp.get("blocks", 4)), decoder_dim=int(hp.get("decoder_dim", 64)),
                         drop_path_rate=dp) if seg else FineTuneClassifier(vit, c, drop_path_rate=dp))


def _drop_paths(model):
    return [getattr(m, "drop_prob", None) for m in model.modules() if type(m).__name__ == "DropPath"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bb") / "bb"
    save_backbone(build_vit(32, 4, 2, 8, 48, 1, mlp_ratio=2.0), folder)  # resampled to 32 px when loaded
    return str(folder)


@pytest.mark.parametrize("kind", ["vit", "vit_random"])
@pytest.mark.parametrize("seg", [False, True])
@pytest.mark.parametrize("protocol", ["probe", "finetune"])
@pytest.mark.parametrize("hp", [HP, {}])
def test_head_through_the_package_is_the_hand_built_one(source, kind, seg, protocol, hp):
    arch = backbone_record(source)
    bb = Backbone(kind, source if kind == "vit" else twin_source(arch), "", "", "")
    task = SimpleNamespace(num_classes=3, kind="segmentation" if seg else "classification", spatial_dims=2, name="t")
    if kind == "vit":  # loaded before the cell (run_all used to, resolving its rows): no draw from the seed
        vit = load_backbone(source, img_size=32, in_chans=1)
        torch.manual_seed(5)
    else:
        torch.manual_seed(5)
        vit = build_vit(arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"], 32, 1,
                        arch["mlp_ratio"])
    old = _by_hand(vit, seg, protocol, hp, 3)
    torch.manual_seed(5)
    cells._LOADED.clear()  # the cell loads the pretrained backbone itself: it must not draw from the seed either
    new, groups = _build(task, bb, protocol, hp, 32)
    assert type(new) is type(old) and (groups is None) == (protocol == "probe")
    a, b = old.state_dict(), new.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    for k in a:  # the same seed draws the same init, and the pretrained weights are the same
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert _drop_paths(new) == _drop_paths(old)
    assert getattr(new, "pool", None) == getattr(old, "pool", None)
    assert getattr(new, "indices", None) == getattr(old, "indices", None)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(new.eval()(x), old.eval()(x), rtol=0, atol=0)


def test_twin_source_is_the_architecture():
    rec = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "mlp_ratio": 2, "img_size": [48, 48]}
    assert twin_source(rec) == '{"depth": 3, "embed_dim": 32, "mlp_ratio": 2.0, "num_heads": 2, "patch_size": 8}'
