"""The kd-train command line: both forms, clear errors (its options: tests/test_cli_options.py)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cli.kd_train_cli import COMMANDS, _with_default_command, app, main


def test_both_commands_exist():
    assert set(typer.main.get_command(app).commands) == set(COMMANDS)
    assert CliRunner().invoke(app, ["train", "--help"]).exit_code == 0


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
