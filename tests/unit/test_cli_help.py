"""Help that teaches (pipeline/cli.py): every --help ends with an example that parses; an unknown command
or config name is answered with the closest one."""

from __future__ import annotations

import shlex

import pytest

from pipeline.cli import COMMANDS, EXAMPLES, build_parser, main


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_ends_with_its_example(capsys, command):
    text = help_text(capsys, command).rstrip("\n").splitlines()
    examples = [f"  {line.format(prog='python -m pipeline')}" for line in EXAMPLES[command]]
    assert text[-len(examples):] == examples
    assert text[-len(examples) - 1] in ("example:", "examples:")


def test_main_help_ends_with_first_steps(capsys):
    text = help_text(capsys).rstrip("\n").splitlines()
    assert text[-5] == "examples:"
    assert text[-4].startswith("  python -m pipeline run tiny ")
    assert text[-1].startswith("  python -m pipeline run --help ")


def test_every_example_parses():
    parser = build_parser("alignpipe")
    for command, lines in EXAMPLES.items():
        for line in lines:
            words = shlex.split(line.format(prog="alignpipe"), comments=True)[1:]
            args, extra = parser.parse_known_args(words)
            assert args.command == command, line
            assert all("=" in word for word in extra), line  # only key=value overrides left over


@pytest.mark.parametrize("argv, expected", [
    (["rnu", "tiny"], "unknown command 'rnu'; did you mean 'run'?"),
    (["stauts", "tiny"], "unknown command 'stauts'; did you mean 'status'?"),
    (["tiny"], "'tiny' is not a command; to run that config: python -m pipeline run tiny"),
    (["xyzzy"], "unknown command 'xyzzy' (commands: run, status"),
])
def test_unknown_command_suggests_the_closest(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_unknown_config_name_suggests_the_closest(capsys):
    assert main(["status", "tnyi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file not found: tnyi; did you mean 'tiny'? ")
    assert "demo" in err and "tiny" in err
