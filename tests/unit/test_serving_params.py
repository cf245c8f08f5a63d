"""Request parameters of the captioner ensemble: what a client may send and what it hears back."""

import json

import pytest

from captioner.decoding import DecodeParams
from captioner.serving.params import DecodeDefaults, ParamError, decode_params, request_parameters

DEFAULTS = DecodeDefaults(max_length=17, length_penalty=0.6)


def test_no_parameters_decode_greedily_with_the_checkpoint_defaults():
    for raw in (None, "", "{}", {}):
        assert decode_params(raw, DEFAULTS) == DecodeParams(beam_size=1, max_length=17, temperature=None, length_penalty=0.6)


def test_parameters_arrive_as_the_backend_json_string():
    p = decode_params(json.dumps({"beam_size": 3, "max_length": 9}), DEFAULTS)
    assert (p.beam_size, p.max_length, p.temperature) == (3, 9, None)
    p = decode_params(json.dumps({"temperature": 0.5}), DEFAULTS)
    assert p.temperature == 0.5 and p.beam_size == 1


@pytest.mark.parametrize("value", [3, "3", " 3 ", 3.0])
def test_integer_forms_a_client_may_send(value):
    assert decode_params({"beam_size": value}, DEFAULTS).beam_size == 3


@pytest.mark.parametrize(
    "params, message",
    [
        ({"beam_size": 0}, "beam_size must be in 1..10, got 0"),
        ({"beam_size": 1000}, "beam_size must be in 1..10, got 1000"),
        ({"beam_size": 11}, "beam_size must be in 1..10, got 11"),
        ({"beam_size": "abc"}, "beam_size must be an integer, got 'abc'"),
        ({"beam_size": 2.5}, "beam_size must be an integer, got 2.5"),
        ({"beam_size": True}, "beam_size must be an integer, got a boolean"),
        ({"max_length": 0}, "max_length must be in 1..50, got 0"),
        ({"max_length": 51}, "max_length must be in 1..50, got 51"),
        ({"max_length": "ten"}, "max_length must be an integer, got 'ten'"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"temperature": "nan"}, "temperature must be a finite number"),
        ({"temperature": 0}, "temperature must be in (0, 100], got 0.0"),
        ({"temperature": -1.5}, "temperature must be in (0, 100], got -1.5"),
        ({"temperature": 1.0, "beam_size": 3}, "temperature (sampling) cannot be combined with beam_size > 1"),
        ({"beam": 3}, "unknown parameter(s) beam; accepted: beam_size, max_length, temperature"),
    ],
)
def test_bad_parameters_are_refused_with_a_message_naming_the_problem(params, message):
    with pytest.raises(ParamError) as e:
        decode_params(json.dumps(params), DEFAULTS)
    assert message in str(e.value)


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"beam_size"'])
def test_parameters_that_are_not_a_json_object(raw):
    with pytest.raises(ParamError, match="request parameters"):
        request_parameters(raw)


def test_defaults_come_from_model_config_parameters():
    assert DecodeDefaults.from_config({"max_length": "20", "length_penalty": "0.7"}) == DecodeDefaults(20, 0.7)
