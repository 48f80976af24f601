"""A build split into 3 parts (`--part I/3`), one of them killed and resumed, then `merge`: the merged
folder holds exactly the samples of one whole run (same keys, same bytes) and the loader reads it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from test_build_shards import ARGS, all_samples, make_collection, manifest  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build.build import part_dir, plan  # noqa: E402
from data_tools.shards_build.merge import check_parts  # noqa: E402
from data_tools.shards_build.plan import parse_part, part_of  # noqa: E402
from medssl.data.shard_writer import ShardWriter, finished_shards  # noqa: E402

PARTS = 3


class _Killed(BaseException):
    pass


def _series_part(root) -> int:
    """The part that builds the 10-slice series (70 samples: enough to kill that part mid-shard)."""
    _, units, _ = plan([{"name": root.name, "path": str(root)}], bs.Config(salt="s3cret"))
    series = next(u for u in units if u.kind == "series" and f"{root}/series/" in u.paths[0])
    return part_of(series, PARTS)


def test_three_parts_and_merge_equal_one_whole_run(tmp_path, monkeypatch, capsys):
    root = make_collection(tmp_path / "collection")
    whole = tmp_path / "whole"
    assert bs.main([str(root), "--out", str(whole), *ARGS]) == 0
    out = tmp_path / "parts"
    killed = _series_part(root)
    others = [i for i in range(PARTS) if i != killed]
    assert bs.main([str(root), "--out", str(out), *ARGS, "--part", f"{others[0]}/{PARTS}"]) == 0
    assert bs.main(["merge", str(out)]) == 1  # parts missing
    err = capsys.readouterr().err
    assert f"part {killed}/{PARTS}: missing (never run)" in err and f"part {others[1]}/{PARTS}: missing" in err
    assert not finished_shards(out)  # nothing merged

    real_write, calls = ShardWriter.write, {"n": 0}

    def dying_write(self, key, image, meta):
        calls["n"] += 1
        if calls["n"] == 20:  # mid-shard: one shard of 16 finished, the second open
            raise _Killed()
        return real_write(self, key, image, meta)

    monkeypatch.setattr(ShardWriter, "write", dying_write)
    with pytest.raises(_Killed):
        bs.main([str(root), "--out", str(out), *ARGS, "--part", f"{killed}/{PARTS}"])
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert bs.main([str(root), "--out", str(out), *ARGS, "--part", f"{others[1]}/{PARTS}"]) == 0
    capsys.readouterr()
    assert bs.main(["merge", str(out)]) == 1
    assert f"part {killed}/{PARTS}: not finished" in capsys.readouterr().err
    assert len(finished_shards(part_dir(out, killed, PARTS))) == 1  # the killed part's one finished shard

    assert bs.main([str(root), "--out", str(out), *ARGS, "--part", f"{killed}/{PARTS}"]) == 0  # resumes
    assert bs.main(["merge", str(out)]) == 0
    merged = all_samples(out)
    assert merged == all_samples(whole)  # same keys, same bytes
    parts = [manifest(part_dir(out, i, PARTS)) for i in range(PARTS)]
    assert all(parts) and sorted(r["unit"] for p in parts for r in p) == sorted(r["unit"] for r in manifest(whole))
    assert sorted(r["unit"] for r in manifest(out)) == sorted(r["unit"] for r in manifest(whole))
    stats, whole_stats = (json.loads((d / "stats.json").read_text()) for d in (out, whole))
    assert stats["burned_in"] == whole_stats["burned_in"] and stats["burned_in"]["left_out"] == 1  # the ultrasound
    for field in ("samples", "by_modality", "by_source", "inputs", "reasons", "histograms"):
        assert stats[field] == whole_stats[field], field
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == len(merged)
    assert [s["url"] for s in info["shards"]] == [p.name for p in finished_shards(out)]
    assert json.loads((out / "_merged.json").read_text())["images_in_two_parts"] == 0

    shards = pytest.importorskip("medssl.data.shards")
    urls = shards.expand_urls(str(out))
    assert shards.count_samples(urls) == len(merged) and len(urls) == len(finished_shards(out))
    batch = next(iter(shards.make_loader(str(out), img_size=16, batch_size=8, shuffle_buffer=10)))
    assert tuple(batch.shape) == (8, 1, 16, 16)
    assert bs.main(["merge", str(out)]) == 0 and all_samples(out) == merged  # merging again: the same


def test_part_option_errors(tmp_path, capsys):
    assert parse_part(" 2 / 8 ") == (2, 8)
    for bad in ("3/3", "-1/3", "1", "a/b"):
        with pytest.raises(ValueError, match="--part"):
            parse_part(bad)
    with pytest.raises(SystemExit):
        bs.main([str(tmp_path), "--out", str(tmp_path / "o"), "--part", "4/4"])
    assert "--part: expected I/N" in capsys.readouterr().err
    assert bs.main(["merge", str(tmp_path)]) == 1
    assert "no part folders" in capsys.readouterr().err


def test_merge_refuses_parts_of_other_inputs_options_or_splits(tmp_path):
    for i, (plan_id, config) in enumerate([("a", "{}"), ("b", "{}"), ("a", '{"size": 48}')]):
        folder = part_dir(tmp_path, i, 3)
        folder.mkdir(parents=True)
        (folder / "_part_done.json").write_text(json.dumps({"part": i, "parts": 3, "plan": plan_id}))
        (folder / "build_config.json").write_text(config)
    (tmp_path / "manifest.jsonl").write_text("")  # a whole build in the same folder
    assert check_parts(tmp_path) == (3, [
        f"{tmp_path} holds a whole (unsplit) build: merge into the folder given to --out of the parts",
        "the parts planned different inputs (files added or removed between part runs?): "
        "re-run the parts on the same inputs",
        "the parts were built with different options or salts"])
    part_dir(tmp_path, 0, 4).mkdir()
    assert check_parts(tmp_path) == (0, [f"parts of different splits in {tmp_path}: N = 3, 4; keep one"])
