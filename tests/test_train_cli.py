"""The kd-train command line: both forms, one flag per TrainConfig field, enums for choices, clear errors."""

from __future__ import annotations

import typing
from dataclasses import fields
from enum import Enum

import pytest
import typer
from typer.testing import CliRunner

import student.train
from cli.kd_train_cli import COMMANDS, _with_default_command, app, main
from student.config import TrainConfig

# `kd-train train`'s options and choices as the hand-written command had them before TrainConfig's
# fields generated it: the generated command keeps them exactly.
TRAIN_FLAGS = [
    "--stage", "--student", "--cache", "--out", "--image-folder", "--epochs", "--max-steps", "--lr", "--batch-size",
    "--grad-accum", "--warmup-ratio", "--weight-decay", "--max-grad-norm", "--seed", "--alpha", "--beta", "--gamma",
    "--positions", "--delta", "--hidden-weight", "--hidden-loss", "--affinity-weight", "--zscore", "--no-zscore",
    "--divergence", "--jsd-beta", "--sparse-mode", "--chunk-size", "--head-memory-mb", "--num-workers", "--shuffle",
    "--no-shuffle", "--block-shards", "--save-every", "--resume", "--no-resume", "--report-to", "--train-modules",
    "--gradient-checkpointing", "--no-gradient-checkpointing", "--mixed-precision", "--any-template",
    "--no-any-template", "--storage-options", "--progress", "--no-progress"]
TRAIN_CHOICES = {"--stage": ["dpt", "sft", "dft"], "--hidden-loss": ["mse", "cosine"],
                 "--divergence": ["fkl", "rkl", "jsd", "tvd", "skl"], "--sparse-mode": ["tail", "renorm"],
                 "--report-to": ["none", "tensorboard", "wandb"], "--mixed-precision": ["auto", "no", "bf16"]}
REQUIRED = ["--stage", "--student", "--cache", "--out"]


def _params(name: str) -> list:
    return typer.main.get_command(app).commands[name].params


def _choices(param) -> list[str] | None:
    ann = param.type_descriptor.annotation
    base = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
    return [m.value for m in base] if isinstance(base, type) and issubclass(base, Enum) else None


def test_train_options_are_the_config_fields_and_keep_their_flags():
    params = _params("train")
    assert [p.name for p in params] == [f.name for f in fields(TrainConfig)]  # every field is a flag
    assert [o for p in params for o in (*p.opts, *p.secondary_opts)] == TRAIN_FLAGS
    assert {p.opts[0]: _choices(p) for p in params if _choices(p)} == TRAIN_CHOICES
    assert [p.opts[0] for p in params if p.required] == REQUIRED
    for p, f in zip(params, fields(TrainConfig)):
        assert p.help == f.metadata["help"]
        if f.name != "storage_options":  # a JSON string on the command line, {} in the config
            default = p.default.value if isinstance(p.default, Enum) else p.default
            assert p.required or default == (f.default.value if isinstance(f.default, Enum) else f.default), f.name
    assert set(typer.main.get_command(app).commands) == set(COMMANDS)
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0


def _other_value(param, f):
    """A valid command-line value for ``f`` other than its default."""
    special = {"stage": "dpt", "positions": "response", "train_modules": "llm", "storage_options": '{"anon": true}',
               "image_folder": "imgs"}
    if f.name in special:
        return special[f.name]
    if f.type == "bool" or param.secondary_opts:
        return None  # a switch: flip it
    choices = _choices(param)
    if choices:
        default = f.default.value
        return next(c for c in choices if c != default)
    if f.name in ("student", "cache", "out"):
        return f.name + "-path"
    return "0.25" if "float" in str(f.type) else "3"


def test_every_flag_reaches_the_config(monkeypatch):
    seen = []
    monkeypatch.setattr(student.train, "train", lambda cfg: seen.append(cfg) or {"main_process": False})
    args, expect = ["train"], {}
    for param, f in zip(_params("train"), fields(TrainConfig)):
        value = _other_value(param, f)
        if value is None:
            args.append(param.secondary_opts[0] if f.default else param.opts[0])
            expect[f.name] = not f.default
        else:
            args += [param.opts[0], value]
            expect[f.name] = value
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    [cfg] = seen
    got = cfg.to_dict()
    got["storage_options"] = cfg.storage_options
    for name, value in expect.items():
        want = {"storage_options": {"anon": True}}.get(name, value)
        if isinstance(got[name], (int, float)) and not isinstance(got[name], bool):
            want = type(got[name])(value)
        assert got[name] == want, name


def test_no_subcommand_form_means_train():
    assert _with_default_command(["--stage", "dft"]) == ["train", "--stage", "dft"]
    assert _with_default_command(["init-student", "--vision", "v"]) == ["init-student", "--vision", "v"]
    assert _with_default_command(["--help"]) == ["--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", "pretrain", "--student", "s", "--cache", "c", "--out", "o"])
    assert exit_info.value.code == 2  # an enum choice outside dpt|sft|dft is a usage error


def test_bad_values_exit_2_with_the_flag_named(tmp_path, capsys):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--stage", "dft", "--student", "s", "--cache", "c", "--out", str(tmp_path),
                              "--grad-accum", "0"])
    assert res.exit_code == 2 and "--grad-accum must be an integer >= 1" in res.output
    res = runner.invoke(app, ["train", "--stage", "dft", "--student", str(tmp_path), "--cache", str(tmp_path / "nope"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no cache at" in res.output
    res = runner.invoke(app, ["train", "--stage", "dft", "--student", "s", "--cache", "c", "--out", str(tmp_path),
                              "--storage-options", "[1]"])
    assert res.exit_code == 2 and "--storage-options must be a JSON object" in res.output
