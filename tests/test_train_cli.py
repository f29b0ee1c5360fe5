"""The kd-train command line: both forms, every documented flag, enums for choices, clear errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.kd_train_cli import _with_default_command, app, main

ISSUE_FLAGS = ["--stage", "--student", "--cache", "--out", "--image-folder", "--epochs", "--max-steps", "--lr",
               "--batch-size", "--grad-accum", "--warmup-ratio", "--weight-decay", "--seed", "--alpha", "--beta",
               "--gamma", "--divergence", "--jsd-beta", "--skew", "--temperature", "--sparse-mode", "--num-workers", "--save-every", "--resume",
               "--report-to", "--train-modules"]


def test_help_lists_both_commands_and_every_flag():
    runner = CliRunner()
    wide = {"COLUMNS": "240", "TERMINAL_WIDTH": "240"}
    res = runner.invoke(app, ["--help"], env=wide)
    assert res.exit_code == 0 and "train" in res.output and "init-student" in res.output
    res = runner.invoke(app, ["train", "--help"], env=wide)
    assert res.exit_code == 0
    for flag in ISSUE_FLAGS:
        assert flag in res.output, flag
    for choices in ("dpt|sft|dft", "fkl|rkl|jsd|tvd|skl|srkl", "tail|renorm", "none|tensorboard|wandb"):
        assert choices in res.output, choices
    res = runner.invoke(app, ["init-student", "--help"], env=wide)
    assert res.exit_code == 0 and all(f in res.output for f in ("--vision", "--llm", "--out"))


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


def test_skew_and_temperature_reach_the_losses(tmp_path, monkeypatch):
    """--divergence srkl --skew A --temperature T end up in the divergence options of the step."""
    import student.train as train_mod

    seen = {}

    def fake_train(cfg):
        seen["options"] = cfg.loss_settings().options
        return {"step": 0, "out": cfg.out, "main_process": True}

    monkeypatch.setattr(train_mod, "train", fake_train)
    res = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", "s", "--cache", "c", "--out", str(tmp_path),
                                   "--divergence", "srkl", "--skew", "0.3", "--temperature", "2"])
    assert res.exit_code == 0, res.output
    opts = seen["options"]
    assert (opts.divergence.value, opts.skew, opts.temperature) == ("srkl", 0.3, 2.0)
    for flag, value, message in (("--skew", "1", "--skew must lie in [0, 1)"),
                                 ("--temperature", "0", "--temperature must be > 0")):
        res = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", "s", "--cache", "c", "--out",
                                       str(tmp_path), flag, value])
        assert res.exit_code == 2 and message in res.output, res.output
