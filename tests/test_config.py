"""Tests for mcis_dist.config: typed YAML configs, overrides, error messages, saving, diffs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Literal

import pydantic
import pytest
import yaml
from pydantic import Field

from mcis_dist.config import (
    MISSING,
    ConfigError,
    ConfigSection,
    ExperimentConfig,
    ShardsConfig,
    SyntheticConfig,
    config_from_dict,
    describe_schema,
    diff_configs,
    dump_config,
    load_config,
    save_resolved_config,
)


class TrainConfig(ConfigSection):
    lr: float = Field(0.1, gt=0, description="Learning rate.")
    epochs: int = Field(10, ge=1, description="Epochs.")
    batch_size: int = Field(8, description="Batch size.")
    amp: bool = Field(False, description="Mixed precision.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    tags: list[str] = Field(default_factory=list, description="Tags.")


class DataConfig(ConfigSection):
    url: str = Field("data/", description="Data location.")
    api_token: str | None = Field(None, description="Token.")
    db_password: str | None = Field(None, description="Password.")
    client_secret: str | None = Field(None, description="Secret.")
    s3_access_key: str | None = Field(None, description="Access key.")
    s3_secret_key: str | None = Field(None, description="Secret key.")
    token_count: int = Field(0, description="Not a secret: the name does not end with 'token'.")


class DemoConfig(ConfigSection):
    name: str = Field("demo", description="Name.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data.")


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- loading


def test_defaults_only_without_file():
    assert load_config(None) == ExperimentConfig()
    assert load_config(None, schema=DemoConfig) == DemoConfig()


def test_file_values_are_loaded(tmp_path):
    path = write(tmp_path, "name: exp1\ntrain:\n  lr: 0.5\n  tags: [a, b]\n")
    cfg = load_config(path, schema=DemoConfig)
    assert (cfg.name, cfg.train.lr, cfg.train.tags, cfg.train.epochs) == (
        "exp1",
        0.5,
        ["a", "b"],
        10,
    )


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), schema=DemoConfig) == DemoConfig()


def test_unknown_top_level_key_names_key_file_and_valid_keys(tmp_path):
    msg = error_of(write(tmp_path, "name: x\nnmae: y\n"), schema=DemoConfig)
    assert "demo.yaml" in msg and "'nmae'" in msg
    assert "top level" in msg and "name, train, data" in msg


def test_unknown_nested_key_names_dotted_path_and_section(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  lrr: 0.1\n"), schema=DemoConfig)
    assert "demo.yaml" in msg and "unknown key 'train.lrr'" in msg
    assert "in 'train'" in msg and "batch_size" in msg and "did you mean 'lr'" in msg


@pytest.mark.parametrize(
    ("yaml_text", "key", "given", "expected"),
    [
        ("train:\n  lr: abc\n", "train.lr", "'abc' (str)", "a number"),
        ("train:\n  epochs: 1.5\n", "train.epochs", "1.5 (float)", "an integer"),
        ("train:\n  epochs: 2.0\n", "train.epochs", "2.0 (float)", "an integer"),
        ("train:\n  epochs: true\n", "train.epochs", "True (bool)", "an integer"),
        ("train:\n  amp: 1\n", "train.amp", "1 (int)", "true or false"),
        ("train:\n  amp: 'yes'\n", "train.amp", "'yes' (str)", "true or false"),
        ("data:\n  url: [1, 2]\n", "data.url", "[1, 2] (list)", "a string"),
        ("data:\n  api_token: 5\n", "data.api_token", "5 (int)", "a string or null"),
        ("train: 5\n", "train", "5 (int)", "a mapping"),
        ("name: null\n", "name", "null", "a string"),
    ],
)
def test_wrong_types_name_key_value_and_expectation(tmp_path, yaml_text, key, given, expected):
    msg = error_of(write(tmp_path, yaml_text), schema=DemoConfig)
    assert msg.startswith(f"{tmp_path / 'demo.yaml'}: {key}: ")
    assert given in msg and f"expected {expected}" in msg
    assert "\n" not in msg and "pydantic" not in msg


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n"), schema=DemoConfig)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_yaml_exponent_without_dot_gets_a_hint(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  lr: 1e-3\n"), schema=DemoConfig)
    assert "train.lr" in msg and "'1e-3'" in msg and "1.0e-3" in msg


def test_literal_error_lists_choices(tmp_path):
    msg = error_of(write(tmp_path, "shards:\n  verify: fast\n"))
    assert "shards.verify" in msg and "'fast'" in msg and "'header'" in msg and "'full'" in msg


def test_every_problem_is_reported_one_line_each(tmp_path):
    path = write(tmp_path, "name: x\nbogus: 1\ntrain:\n  lr: abc\n  epochs: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, schema=DemoConfig)
    assert len(info.value.problems) == 3
    assert str(info.value).splitlines() == info.value.problems
    assert all(line.startswith(str(path)) for line in info.value.problems)


def test_bounds_are_checked(tmp_path):
    msg = error_of(write(tmp_path, "shards:\n  shard_size_mb: 0\nsynthetic:\n  num_classes: 9\n"))
    assert "shards.shard_size_mb: expected a value > 0" in msg
    assert "synthetic.num_classes: expected a value <= 8" in msg


@pytest.mark.parametrize("name", ["", "a b", "x/y", "..", "é"])
def test_experiment_name_is_restricted(name):
    msg = error_of(None, [f"name={name!r}"])
    assert "name:" in msg and "A-Za-z0-9_.-" in msg


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "attr", "value"),
    [
        ("train.lr=0.01", ("train", "lr"), 0.01),
        ("train.lr=2", ("train", "lr"), 2.0),
        ("train.epochs=3", ("train", "epochs"), 3),
        ("train.amp=true", ("train", "amp"), True),
        ("train.optimizer=adamw", ("train", "optimizer"), "adamw"),
        ("train.tags=[a,b]", ("train", "tags"), ["a", "b"]),
        ("data.url=s3://b/p", ("data", "url"), "s3://b/p"),
        ("data.url=a=b", ("data", "url"), "a=b"),
        ("data.api_token=null", ("data", "api_token"), None),
        ("name=exp2", ("name",), "exp2"),
    ],
)
def test_override_values_are_parsed_as_yaml(override, attr, value):
    cfg = load_config(None, [override], schema=DemoConfig)
    got = cfg
    for part in attr:
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


def test_override_sets_key_missing_from_file_and_wins_over_file(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  lr: 0.5\n")
    cfg = load_config(path, ["data.url=elsewhere", "train.lr=0.25", "train.lr=0.125"], DemoConfig)
    assert cfg.data.url == "elsewhere" and cfg.train.lr == 0.125 and cfg.name == "x"


def test_override_into_empty_section_of_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n"), ["train.epochs=4"], DemoConfig)
    assert cfg.train.epochs == 4


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.lr", ["KEY.PATH=VALUE"]),
        ("=1", ["KEY.PATH=VALUE"]),
        ("train..lr=1", ["KEY.PATH=VALUE"]),
        (".lr=1", ["KEY.PATH=VALUE"]),
        ("name.x=1", ["'name' is a value, not a section"]),
        ("train.lr=[1", ["not valid YAML"]),
    ],
)
def test_bad_override_forms(override, words):
    msg = error_of(None, [override], schema=DemoConfig)
    assert f"override '{override}'" in msg
    assert all(word in msg for word in words)


def test_override_unknown_nested_key_lists_valid_keys():
    msg = error_of(None, ["train.lrr=0.1"], schema=DemoConfig)
    assert "override 'train.lrr=0.1'" in msg and "unknown key 'lrr'" in msg
    assert "in 'train'" in msg
    for key in ("lr", "epochs", "batch_size", "amp", "optimizer", "tags"):
        assert key in msg


def test_override_unknown_top_level_key():
    msg = error_of(None, ["trian.lr=0.1"], schema=DemoConfig)
    assert "unknown key 'trian'" in msg and "top level" in msg and "did you mean 'train'" in msg


def test_override_into_non_mapping_in_file(tmp_path):
    msg = error_of(write(tmp_path, "train: 3\n"), ["train.lr=0.1"], schema=DemoConfig)
    assert "override 'train.lr=0.1'" in msg and "'train' is not a mapping" in msg


def test_all_bad_overrides_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lrr=1", "nope", "train.lr=0.2"], schema=DemoConfig)
    assert len(info.value.problems) == 2


def test_validation_error_from_override_names_override_and_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n")
    msg = error_of(path, ["train.lr=abc"], schema=DemoConfig)
    assert str(path) in msg and "train.lr" in msg and "'abc'" in msg
    assert "override 'train.lr=abc'" in msg


def test_override_only_errors_use_overrides_source():
    msg = error_of(None, ["train.epochs=0"], schema=DemoConfig)
    assert msg.startswith("<overrides>: train.epochs") and "override 'train.epochs=0'" in msg


def test_file_errors_are_not_blamed_on_unrelated_overrides(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  lr: abc\n"), ["name=y"], schema=DemoConfig)
    assert "train.lr" in msg and "override" not in msg


def test_whole_section_override():
    cfg = load_config(None, ["shards={url: q, workers: 2}"])
    assert cfg.shards == ShardsConfig(url="q", workers=2)


# ----------------------------------------------------------------------------- validators


def test_max_size_below_min_size_names_both_keys(tmp_path):
    msg = error_of(write(tmp_path, "synthetic:\n  min_size: 160\n  max_size: 140\n"))
    assert "demo.yaml" in msg and "synthetic" in msg
    assert "max_size (140)" in msg and "min_size (160)" in msg


def test_max_size_equal_to_min_size_is_fine():
    cfg = load_config(None, ["synthetic.min_size=150", "synthetic.max_size=150"])
    assert cfg.synthetic == SyntheticConfig(min_size=150, max_size=150)


def test_model_validator_error_from_override_names_it():
    msg = error_of(None, ["synthetic.min_size=200"])
    assert "max_size (176)" in msg and "override 'synthetic.min_size=200'" in msg


def test_assignment_is_validated():
    cfg = load_config(None, schema=DemoConfig)
    with pytest.raises(pydantic.ValidationError):
        cfg.train.lr = "fast"  # type: ignore[assignment]
    cfg.train.lr = 1
    assert cfg.train.lr == 1.0


# ----------------------------------------------------------------------------- file errors


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  lr: 0.1\n    epochs: 3\n")
    msg = error_of(path, schema=DemoConfig)
    assert str(path) in msg and "YAML syntax error" in msg and "line 4" in msg


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_directory_instead_of_file(tmp_path):
    assert str(tmp_path) in error_of(tmp_path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    msg = error_of(write(tmp_path, text))
    assert "demo.yaml" in msg and "top level must be a mapping" in msg


# ----------------------------------------------------------------------------- config_from_dict


def test_config_from_dict():
    cfg = config_from_dict({"train": {"lr": 0.3}}, DemoConfig)
    assert cfg.train.lr == 0.3
    with pytest.raises(ConfigError, match=r"^<dict>: train\.lr: expected a number"):
        config_from_dict({"train": {"lr": "x"}}, DemoConfig)
    with pytest.raises(ConfigError, match=r"ckpt-7: unknown key 'zzz'"):
        config_from_dict({"zzz": 1}, DemoConfig, source="ckpt-7")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config_from_dict([1], DemoConfig)  # type: ignore[arg-type]


def test_config_error_is_value_error_and_pickles():
    err = ConfigError("a\nb", ["a", "b"])
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError) and str(again) == "a\nb" and again.problems == ["a", "b"]


# ----------------------------------------------------------------------------- dump / save


def _custom() -> DemoConfig:
    return load_config(
        None,
        ["name=x1", "train.lr=0.00001", "train.tags=[a]", "train.amp=true", "data.url=s3://b/p"],
        DemoConfig,
    )


def test_dump_round_trips_and_keeps_schema_order(tmp_path):
    cfg = _custom()
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == ["name", "train", "data"]
    assert list(yaml.safe_load(text)["train"]) == list(TrainConfig.model_fields)
    assert load_config(write(tmp_path, text), schema=DemoConfig) == cfg
    exp = load_config(None, ["shards.endpoint_url=http://localhost:9000", "synthetic.seed=3"])
    assert load_config(write(tmp_path, dump_config(exp), "e.yaml")) == exp


def test_save_resolved_config_is_atomic_and_loads(tmp_path):
    cfg = _custom()
    run_dir = tmp_path / "runs" / "x1"
    path = save_resolved_config(cfg, run_dir)
    assert path == run_dir / "config.yaml"
    assert os.listdir(run_dir) == ["config.yaml"]  # no temp file left behind
    assert load_config(path, schema=DemoConfig) == cfg
    cfg.train.epochs = 99
    save_resolved_config(cfg, run_dir)  # overwrite in place
    assert load_config(path, schema=DemoConfig).train.epochs == 99
    assert os.listdir(run_dir) == ["config.yaml"]


def test_save_to_explicit_yaml_path(tmp_path):
    path = save_resolved_config(ExperimentConfig(), tmp_path / "sub" / "resolved.yaml")
    assert path == tmp_path / "sub" / "resolved.yaml" and load_config(path) == ExperimentConfig()


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_resolved_config(ExperimentConfig(name="old"), tmp_path)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_resolved_config(ExperimentConfig(name="new"), tmp_path)
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_config(path).name == "old"


def test_save_refuses_remote_urls():
    with pytest.raises(ValueError, match="local"):
        save_resolved_config(ExperimentConfig(), "s3://bucket/runs/x")


def test_secrets_are_masked_in_saved_config(tmp_path):
    overrides = [
        "data.api_token=tok-123",
        "data.db_password=pw-456",
        "data.client_secret=sec-789",
        "data.s3_access_key=AKIA000",
        "data.s3_secret_key=SK-000",
        "data.token_count=5",
    ]
    cfg = load_config(None, overrides, DemoConfig)
    text = save_resolved_config(cfg, tmp_path).read_text()
    for secret in ("tok-123", "pw-456", "sec-789", "AKIA000", "SK-000"):
        assert secret not in text
    data = yaml.safe_load(text)["data"]
    assert data["api_token"] == data["db_password"] == data["client_secret"] == "***"
    assert data["s3_access_key"] == data["s3_secret_key"] == "***"
    assert data["token_count"] == 5
    assert load_config(tmp_path / "config.yaml", schema=DemoConfig).data.api_token == "***"
    assert "tok-123" in dump_config(cfg)  # plain dump is exact (round trip) ...
    assert "tok-123" not in dump_config(cfg, mask_secrets=True)  # ... unless asked to mask


def test_unset_secrets_stay_null(tmp_path):
    text = save_resolved_config(DemoConfig(), tmp_path).read_text()
    assert yaml.safe_load(text)["data"]["api_token"] is None


# ----------------------------------------------------------------------------- diff / describe


def test_diff_configs():
    a = load_config(None, schema=DemoConfig)
    b = load_config(None, ["train.lr=0.2", "train.tags=[x]", "data.url=y"], DemoConfig)
    assert diff_configs(a, a.model_copy(deep=True)) == {}
    assert diff_configs(a, b) == {
        "train.lr": (0.1, 0.2),
        "train.tags": ([], ["x"]),
        "data.url": ("data/", "y"),
    }


def test_diff_configs_types_missing_keys_and_dicts():
    assert diff_configs({"a": {"x": 1}}, {"a": {"x": 1.0}}) == {}
    assert diff_configs({"a": 1}, {"a": True}) == {"a": (1, True)}
    assert diff_configs({"a": {"x": 1}}, {"a": {"y": 2}}) == {
        "a.x": (1, MISSING),
        "a.y": (MISSING, 2),
    }


def test_diff_configs_masks_secrets_and_ignores_masked_side(tmp_path):
    a = load_config(None, ["data.api_token=tok-1"], DemoConfig)
    b = load_config(None, ["data.api_token=tok-2"], DemoConfig)
    assert diff_configs(a, b) == {"data.api_token": ("***", "***")}
    saved = load_config(save_resolved_config(a, tmp_path), schema=DemoConfig)
    assert diff_configs(saved, b) == {}


def test_describe_schema_rows():
    rows = describe_schema(ExperimentConfig)
    keys = [row[0] for row in rows]
    assert keys[:2] == ["name", "run_root"] and "shards.url" in keys and "synthetic.seed" in keys
    assert all(len(row) == 4 and row[3] for row in rows), "every field needs a description"
    by_key = {row[0]: row for row in rows}
    assert by_key["shards.verify"][1:3] == ("header|full", "header")
    assert by_key["shards.shard_size_mb"][1:3] == ("float (> 0)", "256.0")
    assert by_key["shards.endpoint_url"][1:3] == ("str | null", "null")
    assert by_key["synthetic.num_classes"][1] == "int (>= 1, <= 8)"
    assert describe_schema(DemoConfig)[-7][0] == "data.url"


def test_contrastive_gate_switches():
    """model.phi_co_bias and train.contrastive_classes: off by default (today's model and Eq. 9),
    described, set from the command line; a bias for phi_co needs the separate phi_co."""
    cfg = load_config(None)
    assert cfg.model.phi_co_bias is False and cfg.train.contrastive_classes == "all"
    by_key = {row[0]: row for row in describe_schema(ExperimentConfig)}
    assert by_key["model.phi_co_bias"][1:3] == ("bool", "false")
    assert by_key["train.contrastive_classes"][1:3] == ("all|pair", "all")
    cfg = load_config(None, ["model.phi_co_bias=true", "train.contrastive_classes=pair"])
    assert cfg.model.phi_co_bias is True and cfg.train.contrastive_classes == "pair"
    msg = error_of(None, ["model.phi_co_bias=true", "model.shared_phi=true"])
    assert "phi_co_bias" in msg and "shared_phi" in msg
    assert "pair" in error_of(None, ["train.contrastive_classes=union"])
