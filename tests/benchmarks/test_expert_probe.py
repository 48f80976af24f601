"""benchmarks/medmask_expert_probe.py: names and provenance of the experts, the region probe by hand, merging rows."""


def test_expert_probe_names_and_provenance(tmp_path):
    """The probe table's expert names and training records, read from the embeddings' expert file and the
    backbone's provenance; a registry name has none."""
    import json

    from benchmarks.medmask_expert_probe import expert_name, provenance

    demo = tmp_path / "demo"
    backbone = tmp_path / "lesion_backbone"
    for folder, source in (("embeddings", str(backbone)), ("embeddings_vit_tiny_patch8", "vit_tiny_patch8")):
        (demo / folder).mkdir(parents=True)
        (demo / folder / "_expert.json").write_text(json.dumps({"source": source, "grid": 4}))
    (demo / "_info.json").write_text(json.dumps({"args": {"expert": "lesion"}}))
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({"provenance": {"data": "external set", "val_dice": 0.4127,
                                                                     "best_epoch": 34}}))
    assert expert_name(demo, "embeddings") == "lesion (the demo's default)"
    assert expert_name(demo, "embeddings_vit_tiny_patch8") == "vit_tiny_patch8"
    assert provenance(demo, "embeddings") == "external set, validation Dice 0.41 (best epoch 34)"
    assert provenance(demo, "embeddings_vit_tiny_patch8") == (
        "`vit_tiny_patch8`: no training record (a registry name is a seeded random init)")
    assert provenance(demo, "embeddings_missing") == "-"
    # a folder path stored relative to where the set was made is looked for above the set; a lost one is said so
    (demo / "embeddings" / "_expert.json").write_text(json.dumps({"source": "lesion_backbone"}))
    assert provenance(demo, "embeddings") == "external set, validation Dice 0.41 (best epoch 34)"
    (demo / "embeddings" / "_expert.json").write_text(json.dumps({"source": "gone/backbone"}))
    assert provenance(demo, "embeddings") == "`gone/backbone`: not found from here, no training record read"


def test_region_probe_by_hand(tmp_path):
    """The region probe on a hand-made set of 48 x 64 images (the expert sees them stretched to its square): each
    lesion fills one cell of the expert's 4 x 4 grid and only that cell's token differs, so a lesion's box and the
    same box on another image tell apart perfectly (AUC 1); the breast is one flat grey, so brightness tells
    nothing (0.5). The right eighth of every image but the last is black: the last image's lesion sits there, and
    its box on the others is no breast, so it gets no negatives (12 lesions x 4 boxes + 1)."""
    import json

    import numpy as np
    from PIL import Image

    from benchmarks.medmask_expert_probe import region_probe

    demo, rng = tmp_path / "demo", np.random.default_rng(1)
    (demo / "images" / "train").mkdir(parents=True)
    (demo / "annotations").mkdir()
    (demo / "emb").mkdir()
    (demo / "emb" / "_expert.json").write_text(json.dumps({"source": "x", "grid": 4}))
    images, anns = [], []
    for i in range(13):
        name = f"train_{i:03d}.png"
        pixels = np.full((48, 64), 128, np.uint8)
        if i < 12:
            pixels[:, 56:] = 0
        Image.fromarray(pixels).save(demo / "images" / "train" / name)
        cx, cy = (3, 1) if i == 12 else (int(rng.integers(0, 3)), int(rng.integers(0, 4)))
        tokens = np.zeros((17, 4), np.float32)
        tokens[1:, 1] = 1.0  # breast
        tokens[1 + 4 * cy + cx] = [1, 0, 0, 0]  # the lesion's cell
        np.save(demo / "emb" / f"train_{i:03d}_embedding.npy", tokens)
        images.append({"id": i, "file_name": name, "width": 64, "height": 48, "view": "L"})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [16.0 * cx, 12.0 * cy, 16.0, 12.0]})
    (demo / "annotations" / "instances_train.json").write_text(json.dumps({"images": images, "annotations": anns}))
    out = region_probe(demo, demo / "emb", splits=("train",))
    assert out == {"region_auc": 1.0, "region_ci": [1.0, 1.0], "pixel_auc": 0.5, "pixel_ci": [0.5, 0.5],
                   "regions": 49, "lesions": 13}
    (demo / "emb" / "_expert.json").write_text(json.dumps({"source": "x"}))  # no grid: no region probe
    assert region_probe(demo, demo / "emb", splits=("train",)) == {}


def test_probe_rows_merge_by_set():
    """A set probed again replaces its rows; other sets' rows stay, set-less ones go; order by set, then folder."""
    from benchmarks.medmask_expert_probe import merge_rows

    old = [{"set": "seed1", "folder": "embeddings", "v": 1}, {"set": "seed2", "folder": "embeddings", "v": 1},
           {"folder": "embeddings", "v": 0},  # from before sets were recorded: dropped
           {"set": "seed2", "folder": "embeddings_lesion", "v": 1}]
    new = [{"set": "seed3", "folder": "embeddings", "v": 2}, {"set": "seed2", "folder": "embeddings_x", "v": 2}]
    assert [(r["set"], r["folder"], r["v"]) for r in merge_rows(old, new)] == [
        ("seed1", "embeddings", 1), ("seed2", "embeddings_x", 2), ("seed3", "embeddings", 2)]
