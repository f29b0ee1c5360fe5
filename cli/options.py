"""Typer commands generated from config dataclasses: a setting's flag, help, default and validation
are written once, on the config's field.

    @app.command("train")
    @config_command(TrainConfig, prog="kd-train")
    def train_cmd(cfg: TrainConfig) -> None: ...

Every field whose ``metadata`` has ``help`` becomes the option ``--field-name`` with the field's
default (a field without one is a required option); the parsed values build the config, whose
``__post_init__`` validates them and names the flag in its messages. A user error
(``kd_cache.errors.USER_ERRORS``) from building it or from the command's body is reported by ``fail``:
one line, ``<prog>: error: <message>``, exit code 2 (``user_errors`` does the same for a command
written by hand). The function typer inspects is generated: its ``__signature__`` holds one keyword-only
``Annotated[type, typer.Option(help=...)]`` parameter per flag, in field order.

Field metadata read here:

* ``help``: the option's help (a field without it is not a flag: set by code only);
* ``flag``: the option's name when it is not ``--field-name`` (e.g. ``"--json"``);
* ``choices``: the enum members offered, an ``Enum`` class for all of them; for a ``str`` field
  (the config receives the member's value) or to offer a subset of the field's own enum;
* ``parse``: the option takes a string that ``parse`` turns into the value (not given: the field's
  default), e.g. a JSON object;
* ``type``: the option's type when the field's annotation is a union other than ``X | None`` (the
  field accepts more than the command line gives it, e.g. ``str | tuple[str, ...]``).

Other keys (``resume``, ``identity``) belong to the configs.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from enum import Enum
from typing import Annotated, Any, NoReturn, TypeVar, Union, get_args, get_origin, get_type_hints

import typer

from kd_cache.errors import USER_ERRORS

C = TypeVar("C")


def flag_fields(config_cls: type) -> list[Field]:
    """The fields of ``config_cls`` that are command-line flags, in order."""
    return [f for f in fields(config_cls) if "help" in f.metadata]


def choices(members: Iterable[Enum]) -> type[Enum]:
    """An enum offering ``members`` on the command line: their own class when they are all of it."""
    members = list(members)
    own = type(members[0])
    if members == list(own):
        return own
    return Enum(own.__name__, {m.name: m.value for m in members}, type=str)


def _optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False); any other union -> (None, False)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (args[0], True) if len(args) == 1 else (None, False)
    return hint, False


class _Flag:
    """One field as a typer option: its parameter, and its value's way back into the config."""

    def __init__(self, f: Field, hint: Any, owner: str):
        self.field = f
        meta = f.metadata
        self.parse: Callable[[str], Any] | None = meta.get("parse")
        base, optional = _optional(meta.get("type", hint))
        if base is None:
            raise TypeError(f"{owner}.{f.name}: annotation {hint} is a union the command line cannot take; "
                            "give the option's type as metadata['type']")
        # The field's own enum, if any: a value from a subset enum is turned back into it.
        self.enum = base if isinstance(base, type) and issubclass(base, Enum) else None
        if self.parse is not None:
            cli_type, default = str | None, None
        else:
            offered = choices(meta["choices"]) if "choices" in meta else self.enum
            default = self._default(f, owner)
            if offered is not None and default not in (None, inspect.Parameter.empty):
                default = offered(default.value if isinstance(default, Enum) else default)
            cli_type = offered or base
            if optional:
                cli_type = cli_type | None
        decls = (meta["flag"],) if "flag" in meta else ()
        self.parameter = inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[cli_type, typer.Option(*decls, help=meta["help"])])

    @staticmethod
    def _default(f: Field, owner: str) -> Any:
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            raise TypeError(f"{owner}.{f.name}: a default_factory field needs metadata['parse'] to be a flag")
        return inspect.Parameter.empty  # a required option

    def value(self, given: Any) -> Any:
        """The config's value for what the command line gave (MISSING: leave the field's default)."""
        if self.parse is not None:
            return MISSING if given is None else self.parse(given)
        if isinstance(given, Enum):
            return self.enum(given.value) if self.enum is not None else given.value
        return given


def command_app(prog: str, help: str, *, no_args_is_help: bool = True) -> typer.Typer:
    """The typer app of command ``prog``: no shell-completion options, and no rich tracebacks (a user
    error is one line, see ``fail``; any other exception is a bug and keeps Python's own traceback)."""
    return typer.Typer(name=prog, help=help, no_args_is_help=no_args_is_help, add_completion=False,
                       pretty_exceptions_enable=False)


def fail(prog: str, err: Exception | str) -> NoReturn:
    """Report a user error as one line, ``<prog>: error: <message>`` (plus the error's ``hint``, if it has
    one), and exit with code 2."""
    hint = getattr(err, "hint", None)
    typer.echo(f"{prog}: error: {err}" + (f" ({hint})" if hint else ""), err=True)
    raise typer.Exit(code=2)


def user_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a command: a ``kd_cache.errors.USER_ERRORS`` exception it raises is reported by
    ``fail`` (one line, exit code 2); any other exception keeps its traceback."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                fail(prog, e)

        return command

    return decorate


def config_command(config_cls: type[C], prog: str) -> Callable[[Callable[[C], Any]], Callable[..., Any]]:
    """Decorator: ``body(config)`` -> a typer command whose options are ``config_cls``'s flag fields.

    A user error from building the config (its validation) or from ``body`` is reported by ``fail``."""
    hints = get_type_hints(config_cls)
    flags = [_Flag(f, hints[f.name], config_cls.__name__) for f in flag_fields(config_cls)]

    def decorate(body: Callable[[C], Any]) -> Callable[..., Any]:
        @user_errors(prog)
        def command(**given: Any) -> Any:
            values = {fl.field.name: fl.value(given[fl.field.name]) for fl in flags}
            return body(config_cls(**{k: v for k, v in values.items() if v is not MISSING}))

        command.__signature__ = inspect.Signature([fl.parameter for fl in flags])
        command.__name__, command.__qualname__ = body.__name__, body.__qualname__
        command.__doc__, command.__module__ = body.__doc__, body.__module__
        return command

    return decorate
