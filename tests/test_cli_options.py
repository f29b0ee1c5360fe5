"""cli/options.py: a config dataclass becomes a typer command (flags, help, defaults, validation from its fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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

    def fail(err: Exception):
        typer.echo(f"demo: error: {err}", err=True)
        raise typer.Exit(code=2)

    @app.command()
    @config_command(Demo, on_error=fail)
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
        config_command(Bad, on_error=print)
