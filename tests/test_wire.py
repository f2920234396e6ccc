"""The ``/v1/topk`` body: flat scoring fields on the wire, one ``Scoring`` held by the request."""

from __future__ import annotations

import orjson
import pytest

from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.wire import TopkRequest
from teacher_farm.server.intake import parse_body


def test_a_body_s_options_become_the_request_s_scoring():
    body = {
        "k": 3,
        "temperature": 0.5,
        "targets": "both",
        "samples": 8,
        "seed": 4,
        "positions": "entropy:0.50",
        "inputs": [{"text": "x"}],
        "max_length": 7,
    }
    req = parse_body(TopkRequest, orjson.dumps(body))
    assert req.scoring == Scoring(
        k=3, temperature=0.5, targets="both", samples=8, seed=4, positions="entropy:0.5"
    )
    assert req.max_length == 7 and req.logprob_dtype == "float32"
    # What a client sends (its options' wire fields beside the inputs) reads back as those options.
    sent = Scoring(k=5, targets="sampled", samples=2)
    req = parse_body(TopkRequest, orjson.dumps({**sent.wire_fields(), "inputs": [{"token_ids": [1]}]}))
    assert req.scoring == sent
    assert TopkRequest(scoring=sent, inputs=[{"token_ids": [1]}]).scoring is sent


@pytest.mark.parametrize(
    "body, problem",
    [
        (
            {"k": 0, "inputs": [{"text": "x"}]},
            "invalid request: k: Input should be greater than or equal to 1",
        ),
        (
            {"positions": "some", "inputs": [{"text": "x"}]},
            "invalid request: positions: Value error, positions must be",
        ),
        (
            {"k": 2, "inputs": [{"text": "x"}], "top_p": 1},
            "invalid request: top_p: Extra inputs are not permitted",
        ),
        ({"scoring": {"k": 2}, "inputs": [{"text": "x"}]}, "Extra inputs are not permitted: 'scoring'"),
    ],
)
def test_errors_name_the_body_s_own_fields(body, problem):
    with pytest.raises(InputError) as exc:
        parse_body(TopkRequest, orjson.dumps(body))
    assert problem in str(exc.value), str(exc.value)
