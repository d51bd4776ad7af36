"""The shared --key=value parser: typed values, unknown keys and bad values rejected with the valid keys listed."""

import dataclasses

import pytest

from common import inherit, parse_args


@dataclasses.dataclass
class Config:
    steps: int = 10          # an int
    lr: float = 1e-3         # a float
    compile: bool = False    # a bool
    teacher: str = ""        # a string, "" = inherit
    layers: str = ""         # a comma list kept as text


def test_parse_typed_values():
    cfg = parse_args(Config, ["--steps=5", "--lr=2e-4", "--compile=true", "--teacher=a/b", "--layers=1,2"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.teacher, cfg.layers) == (5, 2e-4, True, "a/b", "1,2")
    assert parse_args(Config, []) == Config()


@pytest.mark.parametrize("argv, message", [
    (["--stepz=5"], "unknown key --stepz"),
    (["--steps=five"], "--steps takes an integer"),
    (["--lr=fast"], "--lr takes a number"),
    (["--compile=maybe"], "--compile takes true or false"),
    (["steps=5"], "expected --key=value"),
])
def test_bad_flags_name_the_problem_and_the_valid_keys(argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(Config, argv)
    assert message in str(e.value) and "--steps, --lr, --compile, --teacher, --layers" in str(e.value)


def test_inherit_fills_only_unset_fields(capsys):
    cfg = Config(steps=7)
    inherit(cfg, {"teacher": "smollm2", "steps": 3}, ["teacher", "steps"])
    assert cfg.teacher == "smollm2" and cfg.steps == 7
    assert "inherited teacher" in capsys.readouterr().out
