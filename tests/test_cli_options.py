"""cli/options.py: a config dataclass becomes a typer command (flags, help, defaults, validation from its fields)."""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum

import pytest
import typer
from typer.testing import CliRunner

from cli.options import config_command


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Shape(str, Enum):
    round = "round"
    square = "square"


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"--extra must be a JSON object, got {text!r}")
    return value


@dataclass
class Demo:
    name: str = field(metadata={"help": "Who to greet."})
    count: int = field(default=2, metadata={"help": "How many times."})
    ratio: float = field(default=0.5, metadata={"help": "A ratio."})
    loud: bool = field(default=False, metadata={"help": "Shout."})
    color: Color = field(default=Color.red, metadata={"help": "Ink colour."})
    warm: Color = field(default=Color.red, metadata={"help": "A warm colour.", "choices": (Color.red, Color.green)})
    shape: str = field(default="round", metadata={"help": "Outline.", "choices": Shape})
    limit: int | None = field(default=None, metadata={"help": "At most this many."})
    tags: str | tuple[str, ...] = field(default="a,b", metadata={"help": "Comma-separated tags.", "type": str})
    extra: dict = field(default_factory=dict, metadata={"help": "JSON object of extras.", "parse": _json_object})
    as_json: bool = field(default=False, metadata={"help": "Print JSON.", "flag": "--json"})
    internal: int = 7  # no help: set by code, not a flag

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"--count must be >= 1, got {self.count}")
        if isinstance(self.tags, str):
            self.tags = tuple(self.tags.split(","))


def _app():
    seen: list[Demo] = []
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    @config_command(Demo, prog="demo")
    def greet(cfg: Demo) -> None:
        """Greet someone."""
        seen.append(cfg)

    return app, seen


def _params():
    app, _ = _app()
    return {p.name: p for p in typer.main.get_command(app).params}


def test_every_field_with_help_is_a_flag_with_its_default_and_help():
    params = _params()
    assert list(params) == ["name", "count", "ratio", "loud", "color", "warm", "shape", "limit", "tags", "extra",
                            "as_json"]
    assert params["as_json"].opts == ["--json"] and params["loud"].secondary_opts == ["--no-loud"]
    assert params["name"].required and not params["count"].required
    assert params["count"].default == 2 and params["ratio"].default == 0.5 and params["limit"].default is None
    assert params["color"].default.value == "red" and params["shape"].default.value == "round"
    assert params["extra"].default is None
    assert params["name"].help == "Who to greet." and params["extra"].help == "JSON object of extras."
    res = CliRunner().invoke(_app()[0], ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0
    for text in ("--name", "Who to greet.", "--no-loud", "red|green|blue", "round|square", "--json"):
        assert text in res.output, text
    assert "--internal" not in res.output


def test_parsed_values_build_the_config():
    app, seen = _app()
    res = CliRunner().invoke(app, ["--name", "x", "--count", "3", "--ratio", "0.25", "--loud", "--color", "blue",
                                   "--warm", "green", "--shape", "square", "--limit", "4", "--tags", "p,q",
                                   "--extra", '{"k": 1}', "--json"])
    assert res.exit_code == 0, res.output
    assert seen == [Demo(name="x", count=3, ratio=0.25, loud=True, color=Color.blue, warm=Color.green,
                         shape="square", limit=4, tags="p,q", extra={"k": 1}, as_json=True)]
    cfg = seen[0]
    assert cfg.color is Color.blue and cfg.warm is Color.green  # the field's own enum, also from a subset
    assert type(cfg.shape) is str and cfg.tags == ("p", "q")


def test_defaults_come_from_the_fields():
    app, seen = _app()
    assert CliRunner().invoke(app, ["--name", "x"]).exit_code == 0
    assert seen == [Demo(name="x")]


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "demo: error: --count must be >= 1, got 0"),
    (["--extra", "[1]"], "demo: error: --extra must be a JSON object, got '[1]'"),
])
def test_validation_errors_exit_2_naming_the_flag(args, message):
    app, seen = _app()
    res = CliRunner().invoke(app, ["--name", "x", *args])
    assert res.exit_code == 2 and message in res.output and not seen


@pytest.mark.parametrize("args", [["--warm", "blue"], ["--color", "cyan"], ["--count", "two"], []])
def test_usage_errors_exit_2(args):
    app, seen = _app()
    res = CliRunner().invoke(app, ([] if not args else ["--name", "x"]) + args)
    assert res.exit_code == 2 and not seen


def test_a_union_without_an_option_type_is_refused():
    @dataclass
    class Bad:
        spec: str | tuple[str, ...] = field(default="a", metadata={"help": "A spec."})

    with pytest.raises(TypeError, match=r"Bad.spec: .* metadata\['type'\]"):
        config_command(Bad, prog="demo")


# ------------------------------------------------------------------ the commands generated from the configs

# The options and choices of `kd-train train` and `kd-cache build` as the hand-written commands had them
# before the config fields generated them (plus --skew, --temperature and srkl, added since): the generated
# commands keep them exactly.
TRAIN_FLAGS = [
    "--stage", "--student", "--cache", "--out", "--image-folder", "--epochs", "--max-steps", "--lr", "--batch-size",
    "--grad-accum", "--warmup-ratio", "--weight-decay", "--max-grad-norm", "--seed", "--alpha", "--beta", "--gamma",
    "--positions", "--delta", "--hidden-weight", "--hidden-loss", "--affinity-weight", "--zscore", "--no-zscore",
    "--divergence", "--jsd-beta", "--skew", "--temperature", "--tail-mode", "--chunk-size", "--head-memory-mb", "--num-workers", "--shuffle",
    "--no-shuffle", "--block-shards", "--save-every", "--resume", "--no-resume", "--overwrite", "--no-overwrite", "--report-to", "--train-modules",
    "--gradient-checkpointing", "--no-gradient-checkpointing", "--lora-r", "--lora-alpha", "--lora-dropout",
    "--lora-target-modules", "--merge", "--no-merge", "--load-in-4bit", "--no-load-in-4bit", "--mixed-precision",
    "--alignment", "--visual-alignment", "--any-template",
    "--no-any-template", "--storage-options", "--progress", "--no-progress"]
TRAIN_CHOICES = {"--stage": ["dpt", "sft", "dft"], "--hidden-loss": ["mse", "cosine"],
                 "--divergence": ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"], "--tail-mode": ["tail", "renorm"],
                 "--report-to": ["none", "tensorboard", "wandb"], "--mixed-precision": ["auto", "no", "bf16"],
                 "--alignment": ["auto", "same", "cross"], "--visual-alignment": ["overlap", "hungarian"]}
BUILD_FLAGS = [
    "--teacher", "--data", "--out", "--split", "--subset", "--streaming", "--no-streaming", "--id-column",
    "--image-column", "--conversation-column", "--image-folder", "--store-images", "--no-store-images",
    "--template", "--sparse", "--top-k", "--samples",
    "--sample-scheme", "--sample-logprobs", "--no-sample-logprobs", "--relation", "--batch-size", "--max-batch-tokens",
    "--sort-window", "--shard-size", "--max-length", "--dtype", "--device", "--gpus-per-teacher", "--max-memory",
    "--quantize", "--strict", "--no-strict", "--max-skip-share", "--limit", "--seed", "--positions", "--hidden",
    "--no-hidden", "--generate", "--no-generate", "--max-new-tokens", "--generate-temperature", "--progress",
    "--no-progress", "--repair", "--no-repair", "--overwrite", "--no-overwrite", "--storage-options"]
BUILD_CHOICES = {"--template": ["chat", "pretrain"], "--sparse": ["topk", "sample"],
                 "--sample-scheme": ["systematic", "multinomial"], "--dtype": ["auto", "float32", "bfloat16", "float16"],
                 "--quantize": ["none", "8bit", "4bit"]}


def _train():
    import student.train
    from cli.kd_train_cli import app
    from student.config import TrainConfig

    values = {"stage": "dft", "positions": "response", "train_modules": "llm", "storage_options": {"anon": True}}
    return (app, "train", TrainConfig, (student.train, "train", {"main_process": False}), values, TRAIN_FLAGS,
            TRAIN_CHOICES, ["--stage", "--student", "--cache", "--out"])


def _build():
    import kd_cache.build
    from cli.kd_cache_cli import app
    from kd_cache.build_config import BuildConfig

    values = {"relation": "lowrank:4", "positions": "response", "device": "cpu", "max_memory": {"cpu": "1GiB"},
              "storage_options": {"anon": True}}
    return (app, "build", BuildConfig, (kd_cache.build, "build_cache", None), values, BUILD_FLAGS, BUILD_CHOICES,
            ["--teacher", "--data", "--out"])


COMMANDS = {"kd-train train": _train, "kd-cache build": _build}


def _command(app, name):
    group = typer.main.get_command(app)
    return group.commands[name]


def _choices(param) -> list[str] | None:
    ann = param.type_descriptor.annotation
    base = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
    return [m.value for m in base] if isinstance(base, type) and issubclass(base, Enum) else None


@pytest.mark.parametrize("which", COMMANDS)
def test_generated_command_keeps_its_flags_and_takes_them_from_the_fields(which):
    app, name, config_cls, _, _, flags, choices, required = COMMANDS[which]()
    params = _command(app, name).params
    flag_fields = [f for f in fields(config_cls) if "help" in f.metadata]
    assert [p.name for p in params] == [f.name for f in flag_fields]
    assert [o for p in params for o in (*p.opts, *p.secondary_opts)] == flags
    assert {p.opts[0]: _choices(p) for p in params if _choices(p)} == choices
    assert [p.opts[0] for p in params if p.required] == required
    for p, f in zip(params, flag_fields):
        assert p.help == f.metadata["help"]
        if "parse" not in f.metadata and not p.required:
            default = p.default.value if isinstance(p.default, Enum) else p.default
            assert default == (f.default.value if isinstance(f.default, Enum) else f.default), f.name
    assert CliRunner().invoke(app, [name, "--help"]).exit_code == 0


def _other_value(param, f, values):
    """A valid command-line value for ``f`` other than its default (None: a switch, flipped)."""
    if f.name in values:
        return values[f.name]
    if param.secondary_opts:
        return None
    options = _choices(param)
    if options:
        default = f.default.value if isinstance(f.default, Enum) else f.default
        return next(c for c in options if c != default)
    if param.required or "str" in str(f.type):
        return f.name + "-given"
    return 0.25 if "float" in str(f.type) else 3


@pytest.mark.parametrize("which", COMMANDS)
def test_every_flag_reaches_the_config(which, monkeypatch):
    app, name, config_cls, (module, attr, result), values, *_ = COMMANDS[which]()
    seen = []
    monkeypatch.setattr(module, attr, lambda cfg: seen.append(cfg) or result)
    if which == "kd-cache build":
        monkeypatch.setattr(module, "summary", lambda manifest: "")
    args, expect = [name], {}
    for param, f in zip(_command(app, name).params, [f for f in fields(config_cls) if "help" in f.metadata]):
        value = _other_value(param, f, values)
        if value is None:
            args.append(param.secondary_opts[0] if f.default else param.opts[0])
            expect[f.name] = not f.default
        else:
            args += [param.opts[0], json.dumps(value) if isinstance(value, dict) else str(value)]
            expect[f.name] = value
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    [cfg] = seen
    assert cfg == config_cls(**expect)
    required = {f.name: expect[f.name] for f in fields(config_cls)
                if f.default is MISSING and f.default_factory is MISSING}
    defaults = config_cls(**required)
    assert [k for k in expect if k not in required and getattr(cfg, k) == getattr(defaults, k)] == []
