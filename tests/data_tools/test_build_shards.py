"""build_shards on a small collection of real files plus every kind of bad input, de-identification,
resume after a simulated kill, options, the sources YAML, and the loader reading the result."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from bad_inputs import EXPECTED, make_bad, write_series  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build import worker  # noqa: E402
from data_tools.shards_build.plan import scan_one  # noqa: E402
from medssl.data import imaging as im  # noqa: E402
from medssl.data.shard_writer import ShardWriter, finished_shards  # noqa: E402

PHI = {"PatientName": "Doe^Jane^Secretname", "PatientID": "PID-998877", "AccessionNumber": "ACC-55512",
       "InstitutionName": "St Testing Hospital", "PatientBirthDate": "19450203", "StudyDate": "20240229",
       "ReferringPhysicianName": "Dr^Who^Secret"}
ARGS = ["--size", "32", "--workers", "0", "--samples-per-shard", "16", "--axes", "0,1", "--every", "4",
        "--ct-windows", "wide=-1000:1000,soft=40/400", "--salt", "s3cret", "--no-progress"]


def _phi_file(path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for name, value in PHI.items():
        setattr(ds, name, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def make_collection(root: Path) -> Path:
    """Real files (CT, MR, compressed US, MONOCHROME1 CR, NIfTI, PNG), a CT series, duplicates, bad input."""
    from nibabel.testing import data_path
    from PIL import Image

    good = root / "good"
    good.mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm", "RG3_J2KI.dcm"):
        shutil.copy(get_testdata_file(name), good / name)
    shutil.copy(get_testdata_file("CT_small.dcm"), good / "zz_copy_of_CT_small.dcm")  # same SOPInstanceUID
    shutil.copy(Path(data_path) / "anatomical.nii", good / "anatomical.nii")
    Image.fromarray(np.tile(np.arange(80, dtype=np.uint8) * 3, (64, 1))).save(good / "gradient.png")
    _phi_file(good / "phi" / "phi.dcm")
    write_series(root / "series", 10)
    write_series(root / "badseries", 8, bad_rows=100)
    for kind in EXPECTED:
        make_bad(root / "bad", kind)
    (root / "bad" / "readme.txt").write_text("not an image")
    return root


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def all_samples(out: Path) -> dict[str, tuple[bytes, bytes]]:
    samples: dict[str, tuple[bytes, bytes]] = {}
    for shard in finished_shards(out):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            if name.endswith(".npy"):
                key = name[:-4]
                assert key not in samples, f"{key} written twice"
                samples[key] = (members[name], members[f"{key}.json"])
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_collection(tmp_path_factory.mktemp("collection"))
    out = tmp_path_factory.mktemp("shards")
    assert bs.main([str(root), "--out", str(out), *ARGS]) == 0
    return root, out


def test_every_input_is_in_the_manifest_once(built):
    root, out = built
    recs = manifest(out)
    inputs = [p for r in recs for p in ([r["input"]] if isinstance(r["input"], str) else r["input"])]
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(inputs) == files  # nothing disappears, nothing twice
    assert len({r["unit"] for r in recs}) == len(recs)


def test_each_bad_input_kind_is_recorded_with_its_reason(built, tmp_path):
    root, out = built
    by_input = {r["input"]: r for r in manifest(out) if isinstance(r["input"], str)}
    for kind, (reason, status) in EXPECTED.items():
        rec = by_input[str(root / "bad" / make_bad(tmp_path, kind).name)]
        assert rec["status"] == status and reason in rec["reason"], (kind, rec)
        assert "\n" not in rec["reason"]
    # the slice of another size is left out of its series; the other 7 slices are written
    odd = by_input[str(root / "badseries" / "IM0007")]
    assert odd["status"] == "failed" and odd["reason"] == "slice size 100x128 differs from the series' 128x128"
    bad = [r for r in manifest(out) if r["kind"] == "series" and "badseries" in r["input"][0]]
    assert len(bad) == 1 and bad[0]["status"] == "written" and odd["part_of"] == bad[0]["unit"]
    assert bad[0]["input"] == [str(root / "badseries" / f"IM{k:04d}") for k in range(6, -1, -1)]
    assert by_input[str(root / "bad" / "readme.txt")]["status"] == "skipped"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"]["failed"] == 1 + sum(s == "failed" for _, s in EXPECTED.values())


def test_duplicates_written_once(built):
    root, out = built
    by_input = {r["input"]: r for r in manifest(out) if isinstance(r["input"], str)}
    first = by_input[str(root / "good" / "CT_small.dcm")]
    dup = by_input[str(root / "good" / "zz_copy_of_CT_small.dcm")]
    assert first["status"] == "written" and first["n_samples"] == 2  # wide + soft window
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == first["input"] and not dup.get("keys")


def test_series_volume_sliced_in_two_planes(built):
    root, out = built
    rec = next(r for r in manifest(out) if r["kind"] == "series" and f"{root}/series/" in r["input"][0])
    assert rec["status"] == "written" and len(rec["input"]) == 10 and "split" not in rec
    # axis 0: slices 0, 4, 8; axis 1: 128 rows every 4 -> 32 planes (10 slices x 5 mm resampled to square px)
    axes = {k.split("_")[2][:2] for k in rec["keys"]}
    assert axes == {"a0", "a1"} and len(rec["keys"]) == 2 * (3 + 32)
    samples = all_samples(out)
    meta = json.loads(samples[next(k for k in rec["keys"] if "_a1s" in k)][1])
    assert meta["plane_shape"] == [76, 128]  # 10 x 5 mm / 0.661 mm = 76 rows
    assert meta["axis"] == 1 and meta["instance"] is None and meta["spacing"][0] == 5.0


def test_ct_sample_values_match_an_independent_window(built):
    root, out = built
    rec = next(r for r in manifest(out) if r["input"] == str(root / "good" / "CT_small.dcm"))
    samples = all_samples(out)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for key in rec["keys"]:
        arr = np.load(io.BytesIO(samples[key][0]))
        meta = json.loads(samples[key][1])
        lo, hi = meta["window"]["low"], meta["window"]["high"]
        assert (meta["window"]["name"], lo, hi) in {("wide", -1000, 1000), ("soft", -160, 240)}
        expected = np.clip((hu - lo) / (hi - lo), 0, 1).mean() * 255  # a 4x downscale keeps the mean
        assert arr.shape == (32, 32) and arr.dtype == np.uint8
        assert abs(arr.mean() - expected) < 0.01 * 255


def test_samples_are_deidentified(built):
    root, out = built
    blob = b"".join(p.read_bytes() for p in [*finished_shards(out), out / "stats.json", out / "_info.json"])
    ds = pydicom.dcmread(root / "good" / "phi" / "phi.dcm")
    secrets = [*PHI.values(), *PHI["PatientName"].split("^"), "Who", ds.StudyInstanceUID, ds.SeriesInstanceUID,
               ds.SOPInstanceUID, "CompressedSamples", "JFK IMAGING CENTER", "1CT1", "20040119"]
    for secret in secrets:
        assert secret.encode() not in blob, secret
    rec = next(r for r in manifest(out) if r["input"] == str(root / "good" / "phi" / "phi.dcm"))
    meta = json.loads(all_samples(out)[rec["keys"][0]][1])
    assert meta["study"] == bs.hash_id("s3cret", ds.StudyInstanceUID) != bs.hash_id("other", ds.StudyInstanceUID)
    assert set(meta) == {"modality", "body_part", "source", "format", "orig_shape", "spacing", "photometric",
                         "dtype", "study", "series", "instance", "window", "axis", "index", "plane_shape",
                         "pixel_spacing"}


def test_info_stats_and_contact_sheets_agree(built):
    root, out = built
    samples = all_samples(out)
    info = json.loads((out / "_info.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    written = [r for r in manifest(out) if r["status"] == "written"]
    assert info["splits"]["train"]["num_samples"] == len(samples) == stats["samples"]
    assert sum(r["n_samples"] for r in written) == len(samples)
    assert {"CT", "MR", "CR", "OT"} <= set(stats["by_modality"])
    # the real vendor ultrasound (no BurnedInAnnotation) is left out by the default policy, drawn nowhere
    us = next(r for r in manifest(out) if r["input"] == str(root / "good" / "US1_J2KR.dcm"))
    assert us["status"] == "burned-in" and us["burned_in"][0]["rule"] == "sop-class" and not us.get("keys")
    assert "US" not in stats["by_modality"] and not (out / "contact_US.png").exists()
    assert stats["burned_in"]["left_out"] == stats["inputs"]["burned-in"] == 1
    for mod, hist in stats["histograms"].items():
        assert sum(hist["counts"]) == stats["by_modality"][mod] * 32 * 32
        assert (out / f"contact_{mod}.png").stat().st_size > 1000
    cr = next(r for r in written if r["input"].endswith("RG3_J2KI.dcm"))
    assert json.loads(samples[cr["keys"][0]][1])["window"]["inverted"] is True


class _Killed(BaseException):
    pass


def test_resume_after_kill_gives_the_same_shards(tmp_path, monkeypatch, built):
    root, clean = built
    out = tmp_path / "out"
    calls = {"n": 0}
    real_write = ShardWriter.write

    def dying_write(self, key, image, meta):
        calls["n"] += 1
        if calls["n"] == 45:  # mid-shard: shards 0-1 done, shard 2 open with 12 samples
            raise _Killed()
        return real_write(self, key, image, meta)

    monkeypatch.setattr(ShardWriter, "write", dying_write)
    with pytest.raises(_Killed):
        bs.main([str(root), "--out", str(out), *ARGS])
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert len(finished_shards(out)) == 2 and list(out.glob(".lumid-*.tar.tmp"))
    durable = {k for r in manifest(out) for k in r.get("keys", [])}
    assert durable <= set(all_samples(out))  # the manifest never claims samples that are not on disk
    assert bs.main([str(root), "--out", str(out), *ARGS]) == 0
    assert not list(out.glob(".lumid-*.tar.tmp"))
    assert all_samples(out) == all_samples(clean)  # same keys, same bytes
    assert sorted(r["unit"] for r in manifest(out)) == sorted(r["unit"] for r in manifest(clean))
    again = bs.main([str(root), "--out", str(out), *ARGS])  # a finished job: nothing redone
    assert again == 0 and len(manifest(out)) == len(manifest(clean))


def test_a_run_ending_on_a_shard_boundary_records_every_input(tmp_path):
    """The last sample fills its shard exactly, then an input without samples: both get manifest lines."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.tile(np.arange(80, dtype=np.uint8) * 3, (64, 1))).save(src / "a_gradient.png")
    make_bad(src, "bad_png")  # broken.png, after a_gradient.png
    out = tmp_path / "out"
    args = [a if i != ARGS.index("--samples-per-shard") + 1 else "1" for i, a in enumerate(ARGS)]
    assert bs.main([str(src), "--out", str(out), *args]) == 0
    recs = {Path(r["input"]).name: r for r in manifest(out)}
    assert sorted(recs) == ["a_gradient.png", "broken.png"]
    assert recs["a_gradient.png"]["status"] == "written" and recs["broken.png"]["status"] == "failed"
    assert recs["a_gradient.png"]["keys"] == list(all_samples(out)) and len(finished_shards(out)) == 1
    assert bs.main([str(src), "--out", str(out), *args]) == 0 and len(manifest(out)) == 2  # nothing redone


def test_resume_refuses_other_options(tmp_path, built):
    root, _ = built
    src = root / "good" / "MR_small.dcm"
    assert bs.main([str(src), "--out", str(tmp_path), *ARGS]) == 0
    with pytest.raises(SystemExit):
        bs.main([str(src), "--out", str(tmp_path), *ARGS, "--size", "48"])


def test_dry_run_writes_nothing(tmp_path, built, capsys):
    root, _ = built
    assert bs.main([str(root / "good"), "--out", str(tmp_path / "o"), *ARGS, "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert "dry run" in capsys.readouterr().out


def test_option_errors_are_clear(tmp_path, capsys):
    src = get_testdata_file("CT_small.dcm")
    for bad, msg in [(["--ct-windows", "wide=-1000"], "--ct-windows"), (["--axes", "3"], "--axes"),
                     (["--every", "0"], "--every"), (["--ct-windows", "w=10:5"], "low < high")]:
        with pytest.raises(SystemExit):
            bs.main([src, "--out", str(tmp_path / "o"), *bad])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bs.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "no such file" in capsys.readouterr().err
    assert [(w.name, w.low, w.high) for w in bs.parse_windows("a=-1:1, b=40/400")] == [
        ("a", -1.0, 1.0), ("b", -160.0, 240.0)]


def test_sources_yaml(tmp_path, built, capsys):
    root, _ = built
    yaml_text = (f"collections:\n  - {{name: mr, modality: MR, body_part: BRAIN, path: {root / 'good'}}}\n"
                 f"  - {{name: gone, modality: CT, path: {tmp_path / 'not-downloaded'}}}\n")
    (tmp_path / "src.yaml").write_text(yaml_text)
    assert bs.main(["--sources", str(tmp_path / "src.yaml"), "--out", str(tmp_path / "o"), *ARGS]) == 0
    assert "collection gone: path not found" in capsys.readouterr().err
    recs = manifest(tmp_path / "o")
    nifti = next(r for r in recs if r["kind"] == "nifti")
    assert nifti["source"] == "mr" and nifti["modality"] == "MR"
    shipped, missing = bs.load_sources(Path(bs.__file__).with_name("lumid_sources.yaml"))
    assert len(missing) == 27 and "nih-chest-xray" in missing and not shipped
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    with pytest.raises(SystemExit):
        bs.main(["--sources", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o2")])
    assert "collections:" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_give_identical_shards(tmp_path, built):
    root, clean = built
    args = [a if a != "0" or i != ARGS.index("--workers") + 1 else "2" for i, a in enumerate(ARGS)]
    assert bs.main([str(root), "--out", str(tmp_path), *args]) == 0
    assert all_samples(tmp_path) == all_samples(clean)


def test_loader_reads_the_shards(built):
    shards = pytest.importorskip("medssl.data.shards")
    _, out = built
    loader = shards.make_loader(str(out), img_size=16, batch_size=8, shuffle_buffer=10)
    batch = next(iter(loader))
    assert tuple(batch.shape) == (8, 1, 16, 16) and bool(batch.isfinite().all())


def test_reader_reasons_match_the_manifest_expectations(tmp_path):
    for kind, (reason, status) in EXPECTED.items():
        path = make_bad(tmp_path, kind)
        with pytest.raises(im.UnreadableImage) as info:
            im.read_image(path)
        assert reason in info.value.reason and info.value.skip == (status == "skipped")
        assert str(path) in str(info.value)


@pytest.mark.slow
def test_resume_after_sigkill_of_a_real_process(tmp_path, built):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _ = built
    src = root / "series"
    args = [str(src), "--size", "32", "--workers", "0", "--samples-per-shard", "4", "--axes", "all",
            "--ct-windows", "wide=-1000:1000,soft=40/400", "--salt", "k", "--no-progress"]
    clean = tmp_path / "clean"
    assert bs.main([*args, "--out", str(clean)]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.build_shards", *args, "--out", str(out)],
                            cwd=Path(bs.__file__).parents[1], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("lumid-*.tar"))) < 3:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert bs.main([*args, "--out", str(out)]) == 0
    assert all_samples(out) == all_samples(clean)
    assert sorted(r["unit"] for r in manifest(out)) == sorted(r["unit"] for r in manifest(clean))
    if not killed:
        pytest.skip("the build finished before it could be killed (resume still checked)")


@pytest.mark.slow
def test_a_worker_that_dies_does_not_stop_the_job(tmp_path):
    from bad_inputs import crash_on_marked_files

    for name in ("a_CT_small.dcm", "crash_me.dcm", "z_MR_small.dcm"):
        src = "MR_small.dcm" if name.startswith("z") else "CT_small.dcm"
        shutil.copy(get_testdata_file(src), tmp_path / name)
    cfg = bs.Config(size=32, salt="x")
    files = bs.discover([{"name": "t", "path": str(tmp_path)}])
    units = bs.plan_units(files, [scan_one(f) for f in files], cfg)
    results = list(worker.results(units, cfg, workers=2, fn=crash_on_marked_files))
    assert [Path(u.paths[0]).name for u, _ in results] == ["a_CT_small.dcm", "crash_me.dcm", "z_MR_small.dcm"]
    statuses = [r["status"] for _, r in results]
    assert statuses == ["written", "failed", "written"]
    assert "worker process died" in results[1][1]["reason"]


def test_published_reasons_name_no_path(tmp_path, capsys):
    """A bad file in a folder named after a patient: its reason reaches stats.json and the summary without the
    path (the private manifest keeps it)."""
    import json as _json

    from data_tools.build_shards import main as build

    folder = tmp_path / "src" / "DOE^JANE_4471823"
    folder.mkdir(parents=True)
    (folder / "img.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert build([str(tmp_path / "src"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    stats = (out / "stats.json").read_text()
    assert _json.loads(stats)["reasons"] and "DOE" not in stats and "4471823" not in stats
    assert "DOE" not in capsys.readouterr().out
    assert "DOE^JANE_4471823" in (out / "manifest.jsonl").read_text()  # private: it holds source paths
