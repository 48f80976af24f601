"""SparK pretraining of a ResNet-18 through the one front end (`recipes/pretrain_lumid.py`, its CPU demo config and
overrides) and the one Engine: an exact resume after a stop, and the backbone folder as timm ResNet weights."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch

import medssl
from medssl.config import load_config
from medssl.hub import load_backbone_weights
from medssl.pretrain import DEFAULTS, build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "demo_cpu_spark.yaml"
TINY_SPARK = ["data.img_size=32", "model.mask_patch=8", "model.decoder_embed_dim=32", "data.num_workers=0",
              "data.shuffle_buffer=16", "train.batch_size=8", "train.precision=fp32", "output.log_every=1",
              "output.figure_every=3", "train.steps=6", "train.warmup_epochs=1", "train.epochs=2"]


def _recipe():
    spec = importlib.util.spec_from_file_location("pretrain_lumid", ROOT / "recipes" / "pretrain_lumid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _losses(out):
    with open(out / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_spark_resume_after_stop_is_exact_and_backbone_is_timm_resnet(toy_shards, tmp_path):
    main = _recipe()
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--config", str(CONFIG), *TINY_SPARK, f"data.shards={toy_shards}"]
    assert main([*args, f"output.dir={straight}"]) == 0
    assert main([*args, f"output.dir={split}", "train.stop_at=3"]) == 0
    assert len(_losses(split)) == 3 and not (split / "backbone").exists()
    _check_mid_run_folder_loads_its_encoder(split, tmp_path)
    assert main([*args, f"output.dir={split}", "--resume"]) == 0
    a, b = _losses(straight), _losses(split)
    assert len(a) == 6 and a == b  # model, BN buffers, optimizer, lr, RNG (hence masks) and data
    assert (straight / "figures" / "recon-00000006.png").is_file()
    cfg = json.loads((straight / "backbone" / "config.json").read_text())
    assert cfg["family"] == "cnn" and cfg["architecture"] == "resnet18"
    assert cfg["provenance"]["mask_ratio"] == 0.6 and cfg["provenance"]["steps"] == 6
    resolved = load_config(DEFAULTS, straight / "config.yaml")
    assert resolved["model"]["mask_ratio"] == 0.6
    r18, ref = medssl.load_backbone(split / "backbone"), medssl.load_backbone(straight)
    assert type(r18) is type(timm.create_model("resnet18", pretrained=False))
    for (k, v), (_, w) in zip(r18.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k


def _check_mid_run_folder_loads_its_encoder(run: Path, tmp_path: Path) -> None:
    """A run folder without backbone/ (stopped mid-run), or its checkpoint file, loads the SparK encoder part of
    the checkpoint as timm's ResNet, with the exact key report."""
    ckpt = sorted((run / "checkpoints").glob("checkpoint-*.pt"))[-1]
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = saved["model"]
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder", "densify", "mask_tokens", "head"}
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    for source in (run, ckpt):
        r18 = medssl.load_backbone(source)
        assert type(r18) is type(timm.create_model("resnet18", pretrained=False)) and r18.num_classes == 0
        assert r18.medssl_cfg["architecture"] == "resnet18" and r18.medssl_cfg["family"] == "cnn"
        assert r18.medssl_cfg["provenance"]["objective"] == "spark"
        got = r18.state_dict()
        assert set(got) == set(encoder)  # every encoder key, and only those
        for k, v in encoder.items():
            assert torch.equal(got[k], v), k
    body = timm.create_model("resnet18", pretrained=False, in_chans=1, features_only=True)
    load_backbone_weights(body, run)  # e.g. a detector's ResNet
    assert torch.equal(body.state_dict()["layer4.1.conv2.weight"], encoder["layer4.1.conv2.weight"])
    # a key that is neither the encoder's nor SparK's decoder side is named, not dropped
    torch.save({**saved, "model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        medssl.load_backbone(tmp_path / "foreign.pt")
    torch.save({**saved, "model": {k: v for k, v in state.items() if k != "encoder.layer2.0.bn1.weight"}},
               tmp_path / "lacking.pt")
    with pytest.raises(ValueError, match="missing keys \\['layer2.0.bn1.weight'\\]"):
        medssl.load_backbone(tmp_path / "lacking.pt")


def test_spark_config_errors_and_default_ratio(tmp_path):
    spark = load_config(DEFAULTS, CONFIG, [*TINY_SPARK, "model.mask_ratio=null"])
    from medssl.pretrain import mask_ratio

    assert mask_ratio(spark) == 0.6 and mask_ratio(load_config(DEFAULTS)) == 0.75
    with pytest.raises(ValueError, match="2-D"):
        build_model(load_config(DEFAULTS, CONFIG, ["data.dims=3"]))
    with pytest.raises(ValueError, match="mask_patch"):
        build_model(load_config(DEFAULTS, None, ["model.mask_patch=16", "data.img_size=32",
                                                 "model.name=mae_vit_tiny_patch8"]))


def test_deepspeed_fp32_export_is_strict():
    """The fp32 SparK model comes from the gathered ZeRO state alone: every value from it, none refilled from the
    bf16 module; a state lacking keys is refused with their names."""
    from medssl.pretrain import _fp32_from_state

    cfg = load_config(DEFAULTS, CONFIG, TINY_SPARK)
    torch.manual_seed(0)
    model = build_model(cfg)
    model(torch.rand(4, 1, 32, 32))  # BN running statistics off their initial values
    state = {k: (v.float() + 0.001 if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}
    bf16 = model.to(torch.bfloat16)  # what DeepSpeed bf16 holds: not the fp32 weights
    fp32 = _fp32_from_state(bf16, state, cfg, "ckpt")
    assert fp32 is not bf16
    for k, v in fp32.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    for drop in (["encoder.bn1.running_mean", "encoder.layer1.0.bn1.num_batches_tracked"], ["mask_tokens.0"]):
        partial = {k: v for k, v in state.items() if k not in drop}
        with pytest.raises(RuntimeError, match="ckpt lack " + repr(sorted(drop)).replace("[", "\\[")):
            _fp32_from_state(bf16, partial, cfg, "ckpt")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_bf16_spark_exports_every_fp32_key(toy_shards, tmp_path):
    """One `python --deepspeed` process (ZeRO-1, bf16): the strict fp32 export finds every key in the gathered
    state (BN running statistics come with DeepSpeed's buffers) and writes fp32 weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_lumid.py"), "--deepspeed", "--deepspeed_config",
           str(ROOT / "recipes" / "configs" / "ds_zero1.json"), "--config", str(CONFIG), *TINY_SPARK,
           f"data.shards={toy_shards}", f"output.dir={out}", "train.steps=2", "output.figure_every=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w = load_file(str(out / "backbone" / "model.safetensors"))
    assert w["layer1.0.conv1.weight"].dtype == torch.float32 and w["bn1.running_var"].dtype == torch.float32
    assert not torch.equal(w["layer4.1.conv2.weight"], w["layer4.1.conv2.weight"].bfloat16().float())
    assert type(medssl.load_backbone(out)) is type(timm.create_model("resnet18", pretrained=False))
