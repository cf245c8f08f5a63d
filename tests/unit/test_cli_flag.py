"""captioner.cli: the one parser of environment flags. The strict reading won over the
lenient one: a typo must not silently switch a flag off."""

from __future__ import annotations

import pytest

from captioner.cli import env, flag
from client import __main__ as client_cli


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "On"])
def test_yes_words_are_true(text):
    assert flag(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", " OFF "])
def test_no_words_are_false(text):
    assert flag(text) is False


@pytest.mark.parametrize("text", ["ture", "2", "enabled", "y"])
def test_anything_else_is_an_error_naming_the_value(text):
    with pytest.raises(ValueError, match=repr(text)):
        flag(text)


def test_env_names_the_variable_whose_value_is_bad(monkeypatch):
    monkeypatch.setenv("CAPTIONER_X", "ture")
    with pytest.raises(ValueError, match=r"^\$CAPTIONER_X: 'ture' is not a yes/no value"):
        env("CAPTIONER_X", False, flag)
    monkeypatch.setenv("CAPTIONER_X", "")
    assert env("CAPTIONER_X", True, flag) is True  # empty is unset: the default


def test_a_client_flag_with_a_typo_is_refused_not_read_as_off(monkeypatch):
    monkeypatch.setenv("CAPTIONER_STATS", "yes")
    assert client_cli.build_parser().parse_args(["x.png"]).stats is True
    monkeypatch.setenv("CAPTIONER_STATS", "yse")
    with pytest.raises(ValueError, match="CAPTIONER_STATS"):
        client_cli.build_parser()
