"""Typed stage configs: YAML loading, overrides, validation and the generated CLI options."""

from __future__ import annotations

from typing import Literal

import click
import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from trackb_core.config import (
    StageConfig,
    build_config,
    config_options,
    declared_inputs,
    describe_defaults,
    input_field,
    load_yaml,
    merge,
    options_to_overrides,
    parse_dotted_overrides,
)
from trackb_core.errors import EXIT_CONFIG, ConfigError


class Train(StageConfig):
    """Fine-tune a model.

    Reads a dataset; writes an adapter.
    """

    dataset: str = input_field("", description="The dataset folder or file.", kind="file",
                               filename="train.jsonl")
    base: str | None = input_field(None, description="An optional base model.", kind="model")
    epochs: int = Field(3, description="Passes over the data.")
    lr: float = Field(2e-4, description="Learning rate.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Weights dtype.")
    packing: bool = Field(False, description="Pack short examples together.")
    targets: list[str] = Field(["q_proj", "v_proj"], description="LoRA target modules.")
    seed: int | None = Field(None, description="Random seed.")


# -- build_config -------------------------------------------------------------------


def test_build_config_validates_and_coerces():
    config = build_config(Train, {"dataset": "d", "epochs": "2", "targets": ["o_proj"]})

    assert (config.dataset, config.epochs, config.targets, config.lr) == ("d", 2, ["o_proj"], 2e-4)


def test_build_config_errors_name_every_bad_field():
    with pytest.raises(ConfigError) as err:
        build_config(Train, {"epochs": "many", "precision": "fp8", "lerning_rate": 1},
                     source="jobs/configs/train.yaml")

    message = str(err.value)
    assert message.startswith("invalid jobs/configs/train.yaml for Train: ")
    assert "epochs:" in message
    assert "precision:" in message
    assert "lerning_rate: Extra inputs are not permitted" in message
    assert "\n" not in message
    assert err.value.exit_code == EXIT_CONFIG


def test_assignment_is_validated_too():
    config = Train()

    with pytest.raises(ValueError, match="epochs"):
        config.epochs = "lots"


# -- load_yaml ----------------------------------------------------------------------


def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# trackb train --config c.yaml\nepochs: 1\ntrain:\n  lr: 0.1\n")

    assert load_yaml(path) == {"epochs": 1, "train": {"lr": 0.1}}


def test_load_yaml_of_an_empty_file_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")

    assert load_yaml(path) == {}


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml$"):
        load_yaml(tmp_path / "nope.yaml")


def test_load_yaml_unreadable_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path)  # a folder


def test_load_yaml_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2\nlr: 0.1\n")

    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML") as err:
        load_yaml(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"),
                                            ("just text\n", "str")])
def test_load_yaml_rejects_a_non_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=f"must hold a mapping, not {kind}$"):
        load_yaml(path)


# -- overrides and merge ------------------------------------------------------------


def test_parse_dotted_overrides_builds_nested_yaml_values():
    got = parse_dotted_overrides([
        "train.epochs=1", "train.lr=0.001", "run_id=abc", "flag=true", "none=null",
        "targets=[q_proj, k_proj]", "empty=", "url=http://h:8000/v1?a=b", "train.name=x",
    ])

    assert got == {
        "train": {"epochs": 1, "lr": 0.001, "name": "x"},
        "run_id": "abc",
        "flag": True,
        "none": None,
        "targets": ["q_proj", "k_proj"],
        "empty": "",
        "url": "http://h:8000/v1?a=b",
    }


def test_parse_dotted_overrides_later_wins():
    assert parse_dotted_overrides(["a.b=1", "a.b=2"]) == {"a": {"b": 2}}


def test_parse_dotted_overrides_needs_an_equals_sign():
    with pytest.raises(ConfigError, match=r"override 'train\.epochs' must look like key=value"):
        parse_dotted_overrides(["train.epochs"])


@pytest.mark.parametrize("pairs", [["a=1", "a.b=2"], ["lr=[1"]])
def test_parse_dotted_overrides_rejects_malformed_items(pairs):
    with pytest.raises(ConfigError):
        parse_dotted_overrides(pairs)


@pytest.mark.parametrize("pair", ["=3", "train.=1", ".x=1"])
def test_parse_dotted_overrides_rejects_empty_keys(pair):
    with pytest.raises(ConfigError, match="key"):
        parse_dotted_overrides([pair])


def test_yaml_1_1_exponents_stay_strings_until_validated():
    # PyYAML reads "1e-3" as a string (YAML 1.1 wants "1.0e-3"); the typed config fixes it.
    overrides = parse_dotted_overrides(["lr=1e-3"])

    assert overrides == {"lr": "1e-3"}
    assert build_config(Train, overrides).lr == 0.001


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": 1, "train": {"epochs": 3, "lr": 0.1}, "tags": ["x"]}
    overrides = {"train": {"epochs": 1}, "tags": ["y"], "new": {"k": "v"}}

    merged = merge(base, overrides)

    assert merged == {"a": 1, "train": {"epochs": 1, "lr": 0.1}, "tags": ["y"], "new": {"k": "v"}}
    assert base == {"a": 1, "train": {"epochs": 3, "lr": 0.1}, "tags": ["x"]}
    assert merge({"t": {"x": 1}}, {"t": 5}) == {"t": 5}
    assert merge({"t": 5}, {"t": {"x": 1}}) == {"t": {"x": 1}}


# -- declared inputs ----------------------------------------------------------------


def test_declared_inputs_lists_only_given_inputs():
    assert declared_inputs(Train(dataset="runs/r/build")) == [
        ("dataset", "runs/r/build", "file", "train.jsonl"),
    ]
    assert declared_inputs(Train(dataset="d", base="Qwen/x")) == [
        ("dataset", "d", "file", "train.jsonl"), ("base", "Qwen/x", "model", ""),
    ]
    assert declared_inputs(Train()) == []


# -- the generated CLI options ------------------------------------------------------


def _command(**decorator_kwargs):
    seen = {}

    @click.command(help=Train.__doc__)
    @click.option("--config", "config_path", default=None)
    @config_options(Train, **decorator_kwargs)
    def train(config_path, **kwargs):
        seen["overrides"] = options_to_overrides(Train, kwargs)
        seen["kwargs"] = kwargs

    return train, seen


def test_options_not_given_do_not_override():
    command, seen = _command()

    result = CliRunner().invoke(command, [])

    assert result.exit_code == 0, result.output
    assert seen["overrides"] == {}


def test_given_options_become_typed_overrides():
    command, seen = _command()

    result = CliRunner().invoke(command, [
        "--dataset", "runs/r/build", "--epochs", "1", "--lr", "0.5", "--precision", "bf16",
        "--packing", "--targets", "q_proj, o_proj,,", "--seed", "7",
    ])

    assert result.exit_code == 0, result.output
    assert seen["overrides"] == {
        "dataset": "runs/r/build", "epochs": 1, "lr": 0.5, "precision": "bf16",
        "packing": True, "targets": ["q_proj", "o_proj"], "seed": 7,
    }
    config = build_config(Train, merge({"epochs": 5, "seed": 1}, seen["overrides"]))
    assert (config.epochs, config.seed, config.targets) == (1, 7, ["q_proj", "o_proj"])


def test_negative_flag_overrides_a_true_yaml_value():
    command, seen = _command()

    CliRunner().invoke(command, ["--no-packing"])

    assert seen["overrides"] == {"packing": False}
    assert build_config(Train, merge({"packing": True}, seen["overrides"])).packing is False


@pytest.mark.parametrize(("args", "complaint"), [
    (["--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16'"),
    (["--epochs", "three"], "'three' is not a valid integer"),
    (["--lr", "fast"], "'fast' is not a valid float"),
])
def test_bad_option_values_are_usage_errors(args, complaint):
    command, _ = _command()

    result = CliRunner().invoke(command, args)

    assert result.exit_code == 2
    assert complaint in result.output


def test_help_shows_docstring_descriptions_and_defaults():
    command, _ = _command()

    result = CliRunner().invoke(command, ["--help"], terminal_width=200)

    assert result.exit_code == 0
    out = result.output
    assert "Fine-tune a model." in out
    assert "Reads a dataset; writes an adapter." in out
    assert "--epochs INT" in out and "Passes over the data.  [default: 3]" in out
    assert "--lr FLOAT" in out and "[default: 0.0002]" in out
    assert "--precision [fp32|bf16]" in out
    assert "--packing / --no-packing" in out
    assert "LoRA target modules.  [default: q_proj,v_proj]" in out
    assert "Random seed.  [default: None]" in out


def test_skipped_fields_get_no_option():
    command, seen = _command(skip=("dataset",))

    result = CliRunner().invoke(command, ["--dataset", "x"])

    assert result.exit_code == 2
    assert "No such option" in result.output and "--dataset" in result.output
    assert "dataset" not in [p.name for p in command.params]


class WithFactory(StageConfig):
    """A config with a factory default."""

    tags: list[str] = Field(default_factory=list, description="Extra tags.")


def test_help_of_a_default_factory_field_shows_the_real_default():
    @click.command()
    @config_options(WithFactory)
    def cmd(**kwargs):
        pass

    result = CliRunner().invoke(cmd, ["--help"])

    assert "PydanticUndefined" not in result.output


# -- describe_defaults --------------------------------------------------------------


def test_describe_defaults_is_commented_yaml_of_the_defaults():
    text = describe_defaults(Train)

    assert text.splitlines()[0] == "# Fine-tune a model."
    assert "# Passes over the data." in text
    assert yaml.safe_load(text) == Train().model_dump(mode="json")
    assert build_config(Train, yaml.safe_load(text)) == Train()


def test_describe_defaults_handles_default_factory():
    assert yaml.safe_load(describe_defaults(WithFactory)) == {"tags": []}
