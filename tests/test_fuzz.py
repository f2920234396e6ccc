"""Hostile and random request bodies never get a 5xx: a clear 4xx JSON error or a correct answer."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.engine

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)

inputs = st.fixed_dictionaries(
    {},
    optional={
        "id": json_scalars,
        "text": st.text(max_size=60) | json_scalars,
        "token_ids": st.lists(st.integers(-5, 2100), max_size=12) | json_values,
        "extra": json_values,
    },
)
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "k": st.integers(-3, 70) | json_scalars,
            "inputs": st.lists(inputs, max_size=4) | json_values,
            "max_length": st.integers(-2, 40) | json_scalars,
            "logprob_dtype": st.sampled_from(["float32", "float16", "float64", ""]) | json_scalars,
            "temperature": st.floats(-1, 5, allow_nan=False) | json_scalars,
            "targets": st.sampled_from(["topk", "sampled", "both", "all"]) | json_scalars,
            "samples": st.integers(-2, 300) | json_scalars,
            "seed": st.integers(-2, 2**33) | json_scalars,
        },
    )
    | json_values
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_random_bodies_get_an_answer_or_a_clear_4xx(http, body):
    r = http.post("/v1/topk", content=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 413, 422), r.text
    if r.status_code == 200:
        results = r.json()["results"]
        assert len(results) == len(body["inputs"])
        for res in results:
            n = len(res["input_ids"])
            if body.get("targets", "topk") != "sampled":
                assert len(res["topk_ids"]) == n and all(
                    len(row) == body.get("k", 16) for row in res["topk_ids"]
                )
            if body.get("targets", "topk") != "topk":
                assert [sum(c) for c in res["sample_counts"]] == [body.get("samples", 64)] * n
    else:
        assert r.json()["error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_a_clear_4xx(http, raw):
    r = http.post("/v1/topk", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 422), r.text
    assert r.status_code == 200 or r.json()["error"]
