"""Config loading: one name per concept; an old key name is read once more, with a warning, as its new name."""

import pytest

from medssl.config import load_config
from medssl.detection.config import DEFAULTS as DETECTION
from medssl.heads.fit import FitConfig
from medssl.pretrain import DEFAULTS as PRETRAIN


def test_one_name_per_concept_in_the_defaults():
    for defaults in (DETECTION, PRETRAIN):
        train = defaults["train"]
        assert {"accum_iter", "clip_grad", "precision"} <= set(train)
        assert not {"grad_accum", "clip_max_norm", "grad_clip", "bf16"} & set(train)


def test_old_keys_in_a_yaml_file_load_with_a_warning_and_the_same_value(tmp_path):
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("train:\n  clip_max_norm: 1.0\n  grad_accum: 3\n")
    new.write_text("train:\n  clip_grad: 1.0\n  accum_iter: 3\n")
    with pytest.warns(DeprecationWarning) as caught:
        from_old = load_config(DETECTION, old)
    messages = [str(w.message) for w in caught]
    assert any("'train.clip_max_norm'" in m and str(old) in m and "'clip_grad'" in m for m in messages)
    assert any("'train.grad_accum'" in m and "'accum_iter'" in m for m in messages)
    assert from_old == load_config(DETECTION, new)
    assert from_old["train"]["clip_grad"] == 1.0 and from_old["train"]["accum_iter"] == 3
    assert "clip_max_norm" not in from_old["train"] and "grad_accum" not in from_old["train"]


def test_old_key_as_an_override_and_both_names_at_once(tmp_path):
    with pytest.warns(DeprecationWarning, match="command-line override"):
        cfg = load_config(DETECTION, None, ["train.grad_accum=2"])
    assert cfg["train"]["accum_iter"] == 2
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  clip_max_norm: 1.0\n  clip_grad: 0.5\n")
    with pytest.raises(KeyError, match="both 'clip_max_norm' and its new name 'clip_grad'"):
        load_config(DETECTION, both)


def test_an_old_name_where_its_new_name_is_no_key_is_still_unknown():
    with pytest.raises(KeyError, match="unknown config key 'bf16'"):
        load_config(DETECTION, None, ["bf16=true"])  # the top level has no `precision`


def test_fit_config_old_field_names():
    assert FitConfig().precision == "fp32" and FitConfig().clip_grad is None
    with pytest.warns(DeprecationWarning, match="'FitConfig.bf16'"):
        cfg = FitConfig(bf16=True, epochs=2)
    assert cfg.precision == "bf16" and cfg.epochs == 2
    with pytest.warns(DeprecationWarning, match="'FitConfig.bf16'"):
        assert FitConfig(bf16=False).precision == "fp32"
    with pytest.warns(DeprecationWarning, match="'FitConfig.grad_clip'"):
        assert FitConfig(grad_clip=1.0).clip_grad == 1.0


def test_read_config_without_defaults(tmp_path):
    """A benchmark config: its `_base_` chain first, then its own top-level entries, a section replaced whole."""
    from medssl.config import read_config

    (tmp_path / "a.yaml").write_text("name: a\nseeds: [0, 1]\nprobe: {lr: 0.1, blocks: 4}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("_base_: ../a.yaml\nname: b\nprobe: {lr: 0.2}\n")
    (tmp_path / "c.yaml").write_text("_base_: sub/b.yaml\nextra: 1\n")
    assert read_config(tmp_path / "c.yaml") == {"name": "b", "seeds": [0, 1], "probe": {"lr": 0.2}, "extra": 1}
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config(tmp_path / "list.yaml")
