"""coco_tools: layout/COCO validation finds each kind of error; from-csv converts tables by hand-checked values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_tools.coco_layout import validate
from data_tools.coco_tools import from_csv, main


def _dataset(root, n=3):
    """A valid seed-layout dataset: train and val with n 20x30 images each, one box in the first."""
    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for split in ("train", "val"):
        images = []
        for i in range(n):
            Image.fromarray(np.zeros((20, 30), np.uint16)).save(root / "images" / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 20, "width": 30})
        coco = {"images": images, "categories": [{"id": 1, "name": "mass"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def _edit(root, split, fn):
    p = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(p.read_text())
    fn(coco)
    p.write_text(json.dumps(coco))


def test_validate_ok_and_cli(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    r = validate(root)
    assert r.ok and not r.warnings
    s = r.summary["instances_train.json"]
    assert (s["images"], s["annotations"], s["images_with_lesions"], s["normal_images"]) == (3, 1, 1, 2)
    assert main(["validate", str(root)]) == 0
    assert "OK: 0 errors" in capsys.readouterr().out


def test_validate_finds_each_error(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", n=4)
    (root / "images/train/1.png").unlink()  # image 2 missing
    (root / "images/train/2.png").write_bytes(b"not a png")  # image 3 unreadable
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(root / "images/train/3.png")  # image 4 wrong size

    def break_train(c):
        c["annotations"] += [
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [25, 0, 10, 5]},  # outside (x2 = 35 > 30)
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5]},  # zero area
            {"id": 4, "image_id": 1, "category_id": 8, "bbox": [0, 0, 2, 2]},  # unknown category
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},  # duplicate id
            {"id": 5, "image_id": 99, "category_id": 1, "bbox": [0, 0, 2, 2]},  # unknown image
        ]
        c["images"].append(dict(c["images"][0]))  # duplicate image id and file name

    _edit(root, "train", break_train)
    errors = "\n".join(validate(root).errors)
    for needle in ("image 2 file missing", "image 3", "unreadable image", "size 21x30 on disk, 20x30 in the json",
                   "annotation 2 box [25, 0, 10, 5] outside image 1", "annotation 3 has zero or negative area",
                   "annotation 4 has unknown category 8", "duplicate annotation id 4", "duplicate image id 1",
                   "annotation 5 refers to unknown image 99", "file_name '0.png' listed twice"):
        assert needle in errors, (needle, errors)
    assert "instances_val.json" not in errors  # val is clean
    assert main(["validate", str(root)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_validate_layout(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "annotations/instances_val.json").unlink()
    (root / "images/test").rmdir()
    r = validate(root)
    assert any("no instances_val.json" in e for e in r.errors)
    assert any("no test image folder" in w for w in r.warnings)
    # RSNA-BSD1K names its training file instances_full.json; its images live in images/train
    root2 = _dataset(tmp_path / "rsna")
    (root2 / "annotations/instances_train.json").rename(root2 / "annotations/instances_full.json")
    assert validate(root2).ok
    (root2 / "annotations/instances_val.json").write_text("{not json")
    assert any("not valid JSON" in e for e in validate(root2).errors)
    assert not validate(tmp_path / "absent").ok


def test_from_csv_by_hand(tmp_path):
    table = tmp_path / "findings.csv"
    table.write_text(
        "patient,w,h,xmin,ymin,xmax,ymax,label,subset\n"
        "P1_L_CC,30,20,2,3,12,8,mass,train\n"
        "P1_L_CC,30,20,20,10,25,19,calcification,train\n"
        "P2_R_CC,30,20,,,,,,train\n"  # a normal image
        "P3_L_MLO,30,20,0,0,30,20,mass,val\n")
    out = tmp_path / "ds"
    counts = from_csv(table, out, image_col="patient", width_col="w", height_col="h",
                      box_cols=["xmin", "ymin", "xmax", "ymax"], category_col="label", split_col="subset")
    assert counts == {"train": {"images": 2, "annotations": 2}, "val": {"images": 1, "annotations": 1}}
    tr = json.loads((out / "annotations/instances_train.json").read_text())
    assert [c["name"] for c in tr["categories"]] == ["calcification", "mass"]  # ids 1, 2 in sorted order
    assert [im["file_name"] for im in tr["images"]] == ["P1_L_CC.png", "P2_R_CC.png"]
    assert [a["bbox"] for a in tr["annotations"]] == [[2.0, 3.0, 10.0, 5.0], [20.0, 10.0, 5.0, 9.0]]
    assert [a["category_id"] for a in tr["annotations"]] == [2, 1]
    for split, names in (("train", ["P1_L_CC", "P2_R_CC"]), ("val", ["P3_L_MLO"])):
        for n in names:
            Image.fromarray(np.zeros((20, 30), np.uint8)).save(out / "images" / split / f"{n}.png")
    (out / "images/test").mkdir()
    assert validate(out).ok
    # xywh tables and the CLI
    t2 = tmp_path / "xywh.csv"
    t2.write_text("id;W;H;x;y;bw;bh\na;30;20;1;2;3;4\n")
    assert main(["from-csv", str(t2), "--out", str(tmp_path / "d2"), "--image-col", "id", "--width-col", "W",
                 "--height-col", "H", "--box-cols", "x,y,bw,bh", "--box-format", "xywh", "--delimiter", ";",
                 "--split", "val"]) == 0
    val = json.loads((tmp_path / "d2/annotations/instances_val.json").read_text())
    assert val["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and val["categories"][0]["name"] == "lesion"


def test_from_csv_errors(tmp_path, capsys):
    table = tmp_path / "f.csv"
    table.write_text("img,w,h,x1,y1,x2,y2\na,30,20,5,5,2,8\n")
    kw = dict(image_col="img", width_col="w", height_col="h", box_cols=["x1", "y1", "x2", "y2"])
    with pytest.raises(ValueError, match=r"f\.csv:2: .*zero or negative area"):
        from_csv(table, tmp_path / "o", **kw)
    rc = main(["from-csv", str(table), "--out", str(tmp_path / "o"), "--image-col", "image",
               "--width-col", "w", "--height-col", "h", "--box-cols", "x1,y1,x2,y2"])
    assert rc == 2 and "columns ['image'] not found" in capsys.readouterr().err
    table.write_text("img,w,h,x1,y1,x2,y2\na,30,20,1,1,2,2\na,31,20,,,,\n")
    with pytest.raises(ValueError, match=r"f\.csv:3: image 'a' disagrees"):
        from_csv(table, tmp_path / "o", **kw)


def test_validate_dicom_images(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    root = _dataset(tmp_path / "ds", n=1)
    src = get_testdata_file("MR_small.dcm")
    rows, cols = (int(v) for v in (pydicom.dcmread(src).Rows, pydicom.dcmread(src).Columns))
    (root / "images/train/m.dcm").write_bytes(open(src, "rb").read())
    (root / "images/train/bad.dcm").write_bytes(b"DICM" * 10)

    def add(c):
        c["images"] += [{"id": 2, "file_name": "m.dcm", "height": rows, "width": cols},
                        {"id": 3, "file_name": "bad.dcm", "height": 10, "width": 10}]

    _edit(root, "train", add)
    errors = validate(root).errors
    assert len(errors) == 1 and "bad.dcm: unreadable DICOM (not a DICOM file)" in errors[0], errors
