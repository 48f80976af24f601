"""MAE pretraining on LUMID shards: wires `medssl.data.shards` -> `MaskedAutoencoder` -> `Engine` -> hub.

`recipes/pretrain_lumid.py` is the command-line front; this module holds the procedure and its defaults
(the paper-scale configuration: ViT-B/16 at 224, mask 0.75, decoder 512 x 8, base lr 1.5e-4, 800 epochs
with 40 of warmup). `data.dims=3` pretrains on volume shards (`build_shards --dims 3`): `data.img_size` is then
the crop (one int for a cube, or [D, H, W]), the MAE is 3-D (`model.patch_size` one int or three), without a
class token unless `model.cls_token=true` (MONAI's ViT / UNETR have none).

`model.name=spark_<timm resnet>` (e.g. spark_resnet18) pretrains a ResNet with SparK-style sparse masked modelling
instead (`medssl.models.spark`), through the same loader, task and Engine: `model.mask_patch` is the mask cell
(default: the encoder's stride, 32), `model.decoder_embed_dim` the width of its UNet-like decoder, and
`model.mask_ratio` defaults to 0.6 there (0.75 for the MAE). The backbone folder then holds timm ResNet weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medssl.config import dump_config
from medssl.data.shards import count_samples, expand_urls, make_loader
from medssl.hub import load_mae_weights, save_backbone
from medssl.models.mae import MaskedAutoencoder, create_mae
from medssl.models.spark import SparkResNet, create_spark
from medssl.models.vit import get_cfg
from medssl.train.dist import DistInfo, barrier
from medssl.train.engine import Engine, TrainConfig
from medssl.train.optim import param_groups, scaled_lr
from medssl.train.task import Task
from medssl.utils import seed_everything

log = logging.getLogger("medssl")

DEFAULTS: dict[str, Any] = {
    "data": {"shards": "data/lumid", "dims": 2, "img_size": 224, "in_chans": 1, "mean": [0.5], "std": [0.25],
             "scale": [0.2, 1.0], "hflip": True, "num_workers": 4, "shuffle_buffer": 2000, "resampled": None,
             "samples_per_epoch": None},
    "model": {"name": "mae_vit_base_patch16", "patch_size": None, "decoder_embed_dim": 512, "decoder_depth": 8,
              "decoder_num_heads": 16, "mask_ratio": None, "norm_pix_loss": True, "attn_impl": "auto",
              "drop_path_rate": 0.0, "init": None, "cls_token": None,  # cls_token None: 2-D yes, 3-D no
              "mask_patch": None},  # mask_ratio None: 0.75 (MAE), 0.6 (SparK); mask_patch: SparK's mask cell
    "train": {"batch_size": 64, "accum_iter": 1, "epochs": 800, "warmup_epochs": 40, "steps": None,
              "base_lr": 1.5e-4, "lr": None, "min_lr": 0.0, "weight_decay": 0.05, "betas": [0.9, 0.95],
              "clip_grad": None, "precision": "auto", "seed": 0, "device": "auto",
              "stop_at": None},
    "output": {"dir": "runs/pretrain", "log_every": 20, "ckpt_every": 1000, "keep_checkpoints": 2,
               "keep_every": 0, "figure_every": 500, "loggers": []},  # loggers: mlflow, wandb
}


MASK_RATIOS = {"mae": 0.75, "spark": 0.6}  # the methods' own defaults (He et al. 2022; Tian et al. 2023)


def is_spark(cfg: dict[str, Any]) -> bool:
    """True when the config pretrains a CNN with SparK (`model.name=spark_<timm resnet>`)."""
    return str(cfg["model"]["name"]).startswith("spark_")


def mask_ratio(cfg: dict[str, Any]) -> float:
    """`model.mask_ratio`, or the method's default where it is None."""
    ratio = cfg["model"]["mask_ratio"]
    return float(ratio) if ratio is not None else MASK_RATIOS["spark" if is_spark(cfg) else "mae"]


def build_spark(cfg: dict[str, Any]) -> SparkResNet:
    """The SparK model named by the config (`spark_<timm resnet>`); 2-D only, no `model.init`."""
    m, d = cfg["model"], cfg["data"]
    if d["dims"] != 2:
        raise ValueError(f"{m['name']}: SparK pretraining is 2-D (data.dims=2), got data.dims={d['dims']}")
    if m["init"]:
        raise ValueError(f"{m['name']}: model.init (continuing from a checkpoint) is for the MAE; use --resume")
    return create_spark(m["name"], img_size=int(d["img_size"]), in_chans=d["in_chans"], mask_patch=m["mask_patch"],
                        decoder_dim=m["decoder_embed_dim"], norm_pix_loss=m["norm_pix_loss"])


def build_model(cfg: dict[str, Any]) -> MaskedAutoencoder | SparkResNet:
    """The MAE (or SparK model) named by the config, an MAE optionally initialised from a checkpoint (official
    MAE or medssl)."""
    if is_spark(cfg):
        return build_spark(cfg)
    m, d = cfg["model"], cfg["data"]
    if m["mask_patch"] is not None:
        raise ValueError("model.mask_patch is SparK's mask cell; the MAE masks its patches (model.patch_size)")
    kwargs = dict(img_size=d["img_size"], in_chans=d["in_chans"], decoder_embed_dim=m["decoder_embed_dim"],
                  decoder_depth=m["decoder_depth"], decoder_num_heads=m["decoder_num_heads"],
                  norm_pix_loss=m["norm_pix_loss"], attn_impl=m["attn_impl"], drop_path_rate=m["drop_path_rate"])
    if m["patch_size"]:
        kwargs["patch_size"] = m["patch_size"]
    if d["dims"] == 3:
        kwargs["spatial_dims"] = 3
        kwargs["cls_token"] = bool(m["cls_token"])  # None: no class token in 3-D (as MONAI's ViT / UNETR)
    elif d["dims"] != 2:
        raise ValueError(f"data.dims must be 2 or 3, got {d['dims']!r}")
    elif m["cls_token"] is not None:
        kwargs["cls_token"] = bool(m["cls_token"])
    model = create_mae(m["name"], **kwargs)
    if m["init"]:
        report = load_mae_weights(model, m["init"])
        log.info("initialised from %s: %d tensors loaded, fresh: %s", m["init"], len(report["loaded"]),
                 report["fresh"] or "none")
    return model


class MAETask(Task):
    """Masked-image-modelling pretraining as a task: the loss of `MaskedAutoencoder(images, mask_ratio)` (or of
    `SparkResNet`, which has the same call)."""

    def __init__(self, model: MaskedAutoencoder | SparkResNet, mask_ratio: float) -> None:
        super().__init__(model)
        self.mask_ratio = mask_ratio

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-D parameters, biases and what the model names in `no_weight_decay()`."""
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return param_groups(self.model, weight_decay, no_weight_decay=names)

    def losses(self, model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        loss, _, _ = model(batch, mask_ratio=self.mask_ratio)
        return {"loss": loss}


def plan_steps(cfg: dict[str, Any], num_samples: int | None, world_size: int) -> tuple[int, int, int]:
    """(total steps, warmup steps, effective batch) from epochs and the shard sample count."""
    t = cfg["train"]
    eff = t["batch_size"] * t["accum_iter"] * world_size
    if t["steps"]:
        total = int(t["steps"])
        warm = int(round(total * t["warmup_epochs"] / max(t["epochs"], 1)))
        return total, warm, eff
    n = cfg["data"]["samples_per_epoch"] or num_samples
    if not n:
        raise ValueError("cannot size an epoch: the shards have no _info.json listing them; set "
                         "data.samples_per_epoch or train.steps")
    per_epoch = max(1, n // eff)
    return per_epoch * t["epochs"], per_epoch * t["warmup_epochs"], eff


@torch.no_grad()
def save_reconstruction_figure(mae: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float, path: Path,
                               max_images: int = 4) -> None:
    """PNG of original / masked / reconstruction (visible patches pasted back) for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = mae.training
    mae.eval()
    x = imgs[:max_images].to(next(mae.parameters()).dtype)
    _, pred, mask = mae(x, mask_ratio=mask_ratio)  # 3-D: the middle plane of each crop is drawn
    target = mae.patchify(x).float()
    pred = pred.float()
    if mae.norm_pix_loss:  # undo the per-patch normalisation for display
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.float().unsqueeze(-1)  # [N, L, 1]
    masked = mae.unpatchify(target * (1 - m))
    recon = mae.unpatchify(target * (1 - m) + pred * m)
    orig = mae.unpatchify(target)
    rows = x.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for i in range(rows):
        for j, (title, img) in enumerate((("original", orig), ("masked", masked), ("reconstruction", recon))):
            plane = img[i, 0] if img.ndim == 4 else img[i, 0, img.shape[2] // 2]
            axes[i, j].imshow(plane.cpu().numpy(), cmap="gray")
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    mae.train(was_training)


def _architecture(mae: MaskedAutoencoder | SparkResNet, cfg: dict[str, Any]) -> str | None:
    """The registry name of the encoder, when the weights really are that architecture (a SparK CNN: its timm
    name)."""
    if isinstance(mae, SparkResNet):
        return mae.arch
    name = cfg["model"]["name"]
    arch = name[4:] if name.startswith("mae_") else name
    c = get_cfg(arch)
    same = (c.embed_dim, c.depth, c.patch_size) == (mae.config["embed_dim"], mae.config["depth"], mae.patch_size)
    return arch if same and mae.spatial_dims == 2 else None  # the registry holds 2-D ViTs


def _fp32_model(engine: Engine, cfg: dict[str, Any]) -> MaskedAutoencoder | SparkResNet:
    """The model with fp32 weights: under DeepSpeed bf16 the module holds bf16 copies, the fp32 masters live in
    the (partitioned) optimizer state, so they are gathered from the final ZeRO checkpoint."""
    module = engine.module
    if engine.ds_engine is None or next(module.parameters()).dtype == torch.float32:
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(engine.ckpt_dir))
    return _fp32_from_state(module, state, cfg, str(engine.ckpt_dir))


def _fp32_from_state(module: MaskedAutoencoder | SparkResNet, state: dict[str, torch.Tensor], cfg: dict[str, Any],
                     where: str) -> MaskedAutoencoder | SparkResNet:
    """A fresh fp32 model of `module`'s kind holding `state`, the fp32 weights gathered from a ZeRO checkpoint.

    Nothing is refilled from the (bf16) module. Raises RuntimeError naming the keys `state` lacks: for SparK any
    key (DeepSpeed saves the BN running statistics with the module's persistent buffers), for the MAE any beyond
    its fixed position embeddings (frozen, hence no optimizer state; the fresh model computes them).
    """
    if isinstance(module, SparkResNet):
        fp32: MaskedAutoencoder | SparkResNet = build_spark(cfg)
        allowed: set[str] = set()
    else:
        fp32 = create_mae(cfg["model"]["name"], **module.config)
        allowed = {"pos_embed", "decoder_pos_embed"}
    missing = set(fp32.state_dict()) - set(state) - allowed  # by key (BN would fill a lacking num_batches_tracked)
    fp32.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"fp32 weights from {where} lack {sorted(missing)}")
    return fp32


def run(cfg: dict[str, Any], dist: DistInfo, *, resume: bool = False, ds_config: dict | None = None) -> Path:
    """Pretrain per `cfg`; returns the exported backbone folder."""
    d, t, o = cfg["data"], cfg["train"], cfg["output"]
    out = Path(o["dir"])
    ckpt_dir = out / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if has_ckpt and not resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                              "output.dir")
    urls = expand_urls(d["shards"])
    seed_everything(t["seed"])
    model = build_model(cfg)
    total, warmup, eff = plan_steps(cfg, count_samples(urls), dist.world_size)
    lr = t["lr"] or scaled_lr(t["base_lr"], eff)
    tcfg = TrainConfig(total_steps=total, lr=lr, warmup_steps=warmup, min_lr=t["min_lr"],
                       weight_decay=t["weight_decay"], betas=tuple(t["betas"]), accum_iter=t["accum_iter"],
                       clip_grad=t["clip_grad"], precision=t["precision"], log_every=o["log_every"],
                       ckpt_every=o["ckpt_every"], keep_checkpoints=o["keep_checkpoints"],
                       keep_every=o["keep_every"], seed=t["seed"],
                       stop_at=t["stop_at"], loggers=tuple(o["loggers"] or ()))
    ratio = cfg["model"]["mask_ratio"] = mask_ratio(cfg)  # resolved: the config written next to the run says it
    engine = Engine(MAETask(model, ratio), tcfg, out, dist, ds_config=ds_config, micro_batch_size=t["batch_size"])
    start = engine.resume() if resume else 0
    if dist.is_main:
        dump_config(cfg, out / "config.yaml")
        log.info("%s pretraining: %d steps (%d warmup), effective batch %d, lr %.3g, %d shard(s), from step %d",
                 "SparK" if is_spark(cfg) else "MAE", total, warmup, eff, lr, len(urls), start)
    loader = make_loader(urls, model.img_size[-1], t["batch_size"], num_workers=d["num_workers"], seed=t["seed"],
                         rank=dist.rank, world_size=dist.world_size, resampled=d["resampled"],
                         start_step=start * t["accum_iter"], in_chans=d["in_chans"], mean=d["mean"], std=d["std"],
                         scale=tuple(d["scale"]), hflip=d["hflip"], shuffle_buffer=d["shuffle_buffer"],
                         min_size=min(model.patch), dims=d["dims"],
                         crop_size=model.img_size if d["dims"] == 3 else None)
    def figure(eng: Engine, step: int, imgs: torch.Tensor) -> None:
        every = o["figure_every"]
        if dist.is_main and every and (step % every == 0 or step == total):
            save_reconstruction_figure(eng.module, imgs, ratio, out / "figures" / f"recon-{step:08d}.png")

    def corrupt_count() -> dict[str, Any]:
        counts = {"corrupt_samples_main_process": int(loader.dataset.corrupt)}
        if d["dims"] == 3:
            counts["padded_volumes_main_process"] = int(loader.dataset.padded)
        return counts

    losses = engine.fit(loader, callbacks=[figure], on_checkpoint=corrupt_count)
    if dist.is_main and engine.data_wait_fraction is not None:
        log.info("waiting for data: %.1f%% of the step time over the last logged steps (metrics.csv: data_wait)",
                 100 * engine.data_wait_fraction)
    backbone = out / "backbone"
    barrier(dist)  # every rank's part of the final checkpoint is on disk
    if engine.step < total:
        if dist.is_main:
            log.info("stopped at step %d of %d (train.stop_at); continue with --resume", engine.step, total)
        return backbone
    if dist.is_main:
        save_backbone(_fp32_model(engine, cfg), backbone, architecture=_architecture(engine.module, cfg),
                      data=_pool_path(d["shards"]), steps=engine.step, epochs=t["epochs"], mean=d["mean"],
                      std=d["std"], mask_ratio=ratio, final_loss=losses[-1] if losses else None,
                      pool_record=_pool_record_hash(d["shards"]),
                      **({"volume": volume_record(d["shards"], model.img_size)} if d["dims"] == 3 else {}))
        log.info("backbone exported to %s", backbone)
    return backbone


def volume_record(shards: str, crop: tuple[int, ...]) -> dict[str, Any]:
    """What a 3-D backbone expects of its input, for its `config.json`: the voxel spacing and intensity
    normalisation of the pool (from the shards' `build_config.json`) and the crop it was pretrained on."""
    import json

    folder = Path(shards) if Path(shards).is_dir() else Path(expand_urls(shards)[0]).parent
    try:
        build = json.loads((folder / "build_config.json").read_text())
    except (OSError, ValueError):
        build = {}
    return {"spacing_mm": build.get("spacing"), "crop_size": list(crop), "axes": "D, H, W (stored as IPL: "
            "head to feet, front to back, right to left, for an axial acquisition)",
            "intensity": {"ct_windows_hu": build.get("ct_windows"), "mr": "0.5-99.5 percentile clip of the non-zero "
                          "voxels, background 0", "stored_dtype": build.get("dtype"), "scaled_to": [0.0, 1.0]}}


def _pool_path(shards: str) -> str:
    """The shard folder as an absolute path where it is one (a backbone names its pool wherever it is read)."""
    p = Path(shards)
    return str(p.resolve()) if p.is_dir() else str(shards)


def _pool_record_hash(shards: str) -> str | None:
    """SHA-256 of the pool's ``pool.json`` (what the pool held by content when this backbone was pretrained)."""
    from medssl.data.holdout import POOL_RECORD, file_sha256

    record = Path(shards) / POOL_RECORD
    return file_sha256(record) if record.is_file() else None
