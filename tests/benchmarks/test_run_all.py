"""End to end: a 1-seed micro config of benchmarks/run_all.py, resume from the cell cache, the table."""

import csv
import json

import pytest
import torch
import yaml

from benchmarks import run_all
from benchmarks.provenance import git_commit
from medssl.data.holdout import write_pool_record
from medssl.hub import save_backbone
from medssl.models.vit import build_vit

torch.set_num_threads(1)

MICRO_HP = {"epochs": 1, "min_steps": 2, "batch_size": 8, "lr": 1e-3, "evals": 1, "unet_base": 4,
            "unet_levels": 2, "decoder_dim": 16, "blocks": 2}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    (tmp / "pool").mkdir()
    (tmp / "pool" / "manifest.jsonl").write_text("")
    write_pool_record(tmp / "pool")  # pretrained on nothing: disjoint from every test set
    save_backbone(build_vit(32, 2, 2, 8, 32, 1), tmp / "bb", data=str(tmp / "pool"))
    cfg = {"name": "micro", "img_size": 32, "threads": 1, "device": "cpu",
           "backbones": [{"source": str(tmp / "bb"), "pretraining": "MAE", "data": "toy"}],
           "tasks": [{"name": "brain_tissue", "slab": 4, "gap": 2, "step": 4}, {"name": "image_qc", "planes": 1}],
           "protocols": ["probe", "finetune", "knn"], "label_fractions": [5, 1.0], "seeds": [0],
           "probe": {**MICRO_HP, "lr_grid": [1e-2, 1e-3]}, "finetune": {**MICRO_HP, "lr_grid": [1e-3, 1e-4]},
           "scratch": {**MICRO_HP, "lr_grid": [1e-3, 3e-3]},
           "knn": {"blocks": 2, "k_grid": [1, 3]}}
    (tmp / "micro.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "results"
    assert run_all.main(["--config", str(tmp / "micro.yaml"), "--out", str(out)]) == 0
    return tmp, out


def test_outputs_and_table(micro):
    tmp, out = micro
    for name in ("results.md", "results.csv", "results.json", "config.resolved.yaml", "tasks.json",
                 "brain_tissue.png", "image_qc.png"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    head = "| Pre-training | Data | Backbone | Protocol | Validation |"
    assert head + " Dice | IoU | Beats its baselines (paired 95% CI, weakest) |" in md
    assert head + " Accuracy | Sensitivity | AUC |" in md
    assert "U-Net" in md and "ResNet-18" in md and "none (random init)" in md and "MAE | toy | ViT-" in md
    rows = list(csv.DictReader(open(out / "results.csv")))
    # per task and fraction: CNN + (pretrained, random twin) x (probe, finetune[, knn: classification only])
    assert len(rows) == 2 * 5 + 2 * 7
    for r in rows:
        assert r["verdict"] in ("baseline",) or r["verdict"].startswith(("**yes**", "no"))
        key = "dice" if r["kind"] == "segmentation" else "auc"
        assert 0.0 <= float(r[key]) <= 1.0
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["brain_tissue"]["classes"] == ["background", "grey matter", "white matter"]
    cells = list((out / "cells").glob("*.json"))
    assert len(cells) == 24
    loaded = [json.loads(p.read_text()) for p in cells]
    tuned = [c for c in loaded if "val_by_lr" in c]  # every trained row searched 2 rates, kept the best on val
    assert len(tuned) == 20 and all(len(c["val_by_lr"]) == 2 for c in tuned)
    assert all(c["val_score"] == max(c["val_by_lr"].values()) and c["val_by_lr"][f"{c['lr']:g}"] == c["val_score"]
               for c in tuned)
    knn = [c for c in loaded if "k" in c]
    assert len(knn) == 4 and all(c["val_score"] == max(c["val_by_k"].values()) for c in knn)
    code = json.loads((out / "code.json").read_text())
    for c in map(json.loads, (p.read_text() for p in cells)):  # each cell names the code that computed it
        assert c["fingerprint"] in {code["brain_tissue"]["fingerprint"], code["image_qc"]["fingerprint"]}
        assert c["commit"] == code["brain_tissue"]["commit"] or c["commit"] == code["image_qc"]["commit"]
    commit = code["image_qc"]["commit"]
    assert commit == git_commit(code["image_qc"]["files"]) and commit != "unknown"
    label = commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
    assert f"`{label}` (" in md and label in rows[-1]["commits"]


def test_resume_uses_cache(micro, capsys):
    tmp, out = micro
    before = {p.name: p.stat().st_mtime for p in (out / "cells").glob("*.json")}
    assert run_all.main(["--config", str(tmp / "micro.yaml"), "--out", str(out), "--tasks", "brain_tissue"]) == 0
    log = capsys.readouterr().out
    assert log.count("(cached)") == 10 and "s)" not in log.replace("(cached)", "")
    after = {p.name: p.stat().st_mtime for p in (out / "cells").glob("*.json")}
    assert before == after


def test_unequal_searches_are_refused(micro, tmp_path):
    tmp, _ = micro
    cfg = yaml.safe_load((tmp / "micro.yaml").read_text())
    cfg["scratch"] = MICRO_HP  # the CNN would try one rate where the ViTs try two
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="unequal learning-rate searches"):
        run_all.main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")])


def test_bad_backbone_and_task(tmp_path):
    cfg = {"backbones": ["no/such/folder"], "tasks": ["brain_tissue"], "protocols": ["probe"],
           "label_fractions": [1.0], "seeds": [0]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        run_all.main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError):
        run_all.main(["--config", str(tmp_path / "missing.yaml")])


def test_report_only_lists_missing_cells(micro):
    tmp, out = micro
    assert run_all.main(["--config", str(tmp / "micro.yaml"), "--out", str(out), "--tasks", "brain_tissue",
                         "--seeds", "0", "7", "--report-only"]) == 0
    md = (out / "results.md").read_text()
    assert "PARTIAL TABLE: 10 cells not run yet: brain_tissue 5 labels, seeds 7: 5 cells; brain_tissue all " \
           "labels, seeds 7: 5 cells" in md
    assert len(list((out / "cells").glob("*.json"))) == 24  # nothing was trained


def test_changed_code_recomputes_its_cells(micro, monkeypatch):
    """Another fingerprint for brain_tissue's code: its cells are missing (would be recomputed), image_qc's not."""
    tmp, out = micro
    real = run_all.cell_code

    def edited(kind, spec):
        code = real(kind, spec)
        return {**code, "fingerprint": "0" * 16} if spec["name"] == "brain_tissue" else code

    monkeypatch.setattr(run_all, "cell_code", edited)
    assert run_all.main(["--config", str(tmp / "micro.yaml"), "--out", str(out), "--report-only"]) == 0
    md = (out / "results.md").read_text()
    assert "PARTIAL TABLE: 10 cells not run yet: brain_tissue 5 labels, seeds 0: 5 cells; brain_tissue all " \
           "labels, seeds 0: 5 cells" in md
    assert "image_qc" not in md.split("PARTIAL TABLE")[1].split("\n")[0]
    assert len(list((out / "cells").glob("*.json"))) == 24  # nothing was trained


def test_rows_with_own_budgets_and_pretraining_epochs(micro):
    """A backbone entry's `fractions` limits its cells; `epochs` places it on the pretraining-length curve."""
    tmp, _ = micro
    torch.manual_seed(1)
    save_backbone(build_vit(32, 2, 2, 8, 32, 1), tmp / "bb_short", data=str(tmp / "pool"))
    cfg = yaml.safe_load((tmp / "micro.yaml").read_text())
    cfg.update(name="curves", protocols=["finetune"], label_fractions=[4, 1.0],
               tasks=[{"name": "brain_level", "slab": 4, "gap": 2, "views": 1}],
               backbones=[{"source": str(tmp / "bb"), "pretraining": "MAE long", "data": "toy", "epochs": 10},
                          {"source": str(tmp / "bb_short"), "pretraining": "MAE short", "data": "toy", "epochs": 2,
                           "fractions": [4]}])
    (tmp / "curves.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "curves"
    assert run_all.main(["--config", str(tmp / "curves.yaml"), "--out", str(out)]) == 0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 2 + 2 + 2 + 1  # CNN, random init and MAE long at both budgets, MAE short at 4 only
    agg = json.loads((out / "results.json").read_text())["aggregated"]
    assert sorted((a["pretraining"], a["fraction"], a["pretrain_epochs"]) for a in agg if a["role"] != "cnn") == [
        ("MAE long", 1.0, 10), ("MAE long", 4, 10), ("MAE short", 4, 2),
        ("none (random init)", 1.0, 0), ("none (random init)", 4, 0)]
    md = (out / "results.md").read_text()
    assert ("| Labels | ResNet-18 from scratch, scratch | ViT-32/8 random init, finetune | MAE short, finetune | "
            "MAE long, finetune |") in md
    assert (out / "brain_level_curves.png").is_file()


def test_primary_row_is_the_first_pretrained_entry_or_the_marked_one():
    from benchmarks.cells import Backbone

    mae, lever = Backbone("vit", "runs/a", "MAE", "-", "ViT"), Backbone("vit", "runs/b", "MAE", "-", "ViT")
    twin = Backbone("vit_random", '{"embed_dim": 192}', "none (random init)", "-", "ViT")
    # a random-init row never answers the question, whatever its place
    assert run_all.primary_source({"backbones": ["vit_tiny_patch16", "runs/a", "runs/b"]}, [twin, mae, lever]) == \
        "runs/a"
    assert run_all.primary_source({"backbones": ["runs/a", {"source": "runs/b", "primary": True}]},
                                  [mae, lever, twin]) == "runs/b"
    with pytest.raises(ValueError, match="one entry answers"):
        run_all.primary_source({"backbones": [{"source": "runs/a", "primary": True},
                                              {"source": "runs/b", "primary": True}]}, [mae, lever])
    with pytest.raises(ValueError, match="one entry answers"):
        run_all.primary_source({"backbones": ["runs/a", "runs/a"]}, [mae, mae])
    spark = Backbone("cnn_pretrained", "runs/s", "SparK", "-", "ResNet-18")
    # a pretrained CNN is a lever: never the answer's row, refused when marked, refused when listed twice
    assert run_all.primary_source({"backbones": ["runs/s", "runs/a"]}, [spark, mae, twin]) == "runs/a"
    assert run_all.primary_source({"backbones": ["runs/s"]}, [spark]) is None
    with pytest.raises(ValueError, match="is a pretrained CNN"):
        run_all.primary_source({"backbones": [{"source": "runs/s", "primary": True}, "runs/a"]}, [spark, mae])
    with pytest.raises(ValueError, match="one entry answers"):
        run_all.primary_source({"backbones": ["runs/s", "runs/s"]}, [spark, spark])
    # `epochs` is a point on the pretraining-length curve: two rows at one length would draw a zigzag there
    long, seed1 = Backbone("vit", "runs/a", "MAE", "-", "ViT", epochs=200), Backbone("vit", "runs/b", "MAE", "-", "ViT")
    assert run_all.primary_source({"backbones": ["runs/a", "runs/b"]}, [long, seed1, twin]) == "runs/a"
    with pytest.raises(ValueError, match="one row per length; several pretrained rows say \\[200, 200\\]"):
        run_all.primary_source({"backbones": ["runs/a", "runs/b"]},
                               [long, Backbone("vit", "runs/b", "MAE", "-", "ViT", epochs=200), twin])


def test_cli_backbone_leaves_the_pretraining_name_to_the_folder_kind():
    assert run_all._cli_backbone("runs/x") == {"source": "runs/x", "data": "x"}
    assert run_all._cli_backbone("runs/x=MAE 200:pool") == {"source": "runs/x", "pretraining": "MAE 200",
                                                            "data": "pool"}


def test_run_all_refuses_the_code_of_another_checkout(tmp_path, monkeypatch):
    """A worktree's run_all.py that imports medssl / benchmarks from another checkout's editable install would
    compute its cells with that checkout's code: refused, naming the PYTHONPATH that fixes it."""
    from benchmarks import run_all

    run_all.check_checkout()  # this checkout's script, this checkout's code
    (tmp_path / "medssl").mkdir()
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    with pytest.raises(RuntimeError, match=f"PYTHONPATH={tmp_path}"):
        run_all.check_checkout()


def test_random_twin_runs_the_budgets_of_the_rows_it_is_a_baseline_for(tmp_path):
    """A lever with another architecture (its own random-init twin) and its own budgets does not add all-label
    cells for its twin; a twin shared with a row that runs every budget runs every budget."""
    for name, patch in (("p8_all", 8), ("p8_low", 8), ("p4_low", 4), ("p4_other", 4)):
        save_backbone(build_vit(32, 2, 2, patch, 32, 1), tmp_path / name, data="toy")
    cfg = {"backbones": [{"source": str(tmp_path / "p8_all")},
                         {"source": str(tmp_path / "p8_low"), "fractions": [8]},
                         {"source": str(tmp_path / "p4_low"), "fractions": [8]},
                         {"source": str(tmp_path / "p4_other"), "fractions": [10, 8]}]}
    twins = [b for b in run_all.resolve_backbones(cfg) if b.kind == "vit_random"]
    assert [(b.label, b.fractions) for b in twins] == [("ViT-32/8", None), ("ViT-32/4", (8.0, 10.0))]
    assert twins[1].runs(10) and not twins[1].runs(1.0)
    listed = run_all.resolve_backbones({"backbones": [{"source": str(tmp_path / "p4_low"), "fractions": [8]},
                                                      "vit_tiny_patch4"]})
    # a random init listed as a row of its own runs every budget
    assert [(b.label, b.fractions) for b in listed if b.kind == "vit_random"] == [("ViT-32/4", (8.0,)),
                                                                                   ("ViT-Ti/4", None)]
