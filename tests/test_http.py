"""The HTTP API as a client meets it: answers, formats, errors, the API key."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pytest

from teacher_farm.schemas import ARROW_STREAM, SCHEMA_VERSION
from teacher_farm.schemas.arrow import result_schema
from tests.conftest import API_KEY, MAX_MODEL_LEN, table_to_results

pytestmark = pytest.mark.engine


def topk(http, body, **headers):
    return http.post(
        "/v1/topk", content=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}
    )


def test_health_is_open_and_info_describes_the_teacher(server, http, tiny_model):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = http.get("/v1/info").json()
    assert info["vocab_size"] == 2048 and info["k_max"] == 256
    assert info["max_model_len"] == MAX_MODEL_LEN and info["max_input_tokens"] == MAX_MODEL_LEN - 1
    assert info["scoring"] == "pooled" and info["max_samples"] == 256
    assert "passed the self-test" in info["scoring_reason"]
    assert info["adds_bos"] is True and len(info["tokenizer_fingerprint"]) == 16
    assert info["model"] == str(tiny_model) and info["versions"]["schema_version"] == SCHEMA_VERSION
    # The worker timed the reduction's kernels at this vocabulary up to k_max, and said which it chose.
    kernels = info["kernels"]
    assert kernels["vocab"] == 2048 and set(kernels["topk"]) == {"16", "64", "256"}
    for bucket, way in kernels["topk"].items():
        assert kernels["timings_ms"][f"topk k<={bucket}"][way] == min(
            kernels["timings_ms"][f"topk k<={bucket}"].values()
        )


@pytest.mark.parametrize("path", ["/v1/info", "/metrics", "/openapi.json"])
def test_every_endpoint_but_health_needs_the_key(server, path):
    assert httpx.get(server.url + path).status_code == 401
    wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
    assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    post = httpx.post(server.url + "/v1/topk", json={"k": 2, "inputs": [{"text": "x"}]})
    assert post.status_code == 401


def test_json_answer_text_and_token_ids(http, reference):
    text = "Teachers distil knowledge."
    r = topk(http, {"k": 5, "inputs": [{"id": "a", "text": text}, {"token_ids": [7, 8, 9, 10]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 5 and len(body["results"]) == 2
    a, b = body["results"]
    assert a["id"] == "a" and b["id"] is None
    assert a["input_ids"] == reference.tokenize(text)
    assert b["input_ids"] == [7, 8, 9, 10]
    n = len(a["input_ids"])
    assert np.array(a["topk_ids"]).shape == (n, 5) and np.array(a["topk_logprobs"]).shape == (n, 5)
    assert len(a["target_logprobs"]) == len(a["target_ranks"]) == n - 1
    lps = np.array(a["topk_logprobs"])
    assert (np.diff(lps, axis=1) <= 0).all() and (lps <= 0).all()


def test_arrow_answer_equals_json_answer(http):
    body = {
        "k": 8,
        "inputs": [{"id": "u", "text": "Ünïcödé 🧪 tëxt"}, {"id": "v", "text": "plain text here"}],
    }
    as_json = topk(http, body).json()["results"]
    r = topk(http, body, Accept=ARROW_STREAM)
    assert r.headers["content-type"] == ARROW_STREAM
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.schema.equals(result_schema())
    for j, row in zip(as_json, table_to_results(table)):
        assert row.id == j["id"]
        assert row.input_ids.tolist() == j["input_ids"]
        assert row.topk_ids.tolist() == j["topk_ids"]
        np.testing.assert_array_equal(row.topk_logprobs, np.array(j["topk_logprobs"], dtype=np.float32))
        np.testing.assert_array_equal(row.target_logprobs, np.array(j["target_logprobs"], dtype=np.float32))
        assert row.target_ranks.tolist() == j["target_ranks"]


def test_max_length_truncates_and_single_token_input_works(http):
    long = "word " * 400
    r = topk(http, {"k": 3, "max_length": 17, "inputs": [{"text": long}, {"token_ids": [5]}]}).json()[
        "results"
    ]
    assert len(r[0]["input_ids"]) == 17 and len(r[0]["topk_ids"]) == 17
    assert r[1]["input_ids"] == [5] and len(r[1]["topk_ids"]) == 1 and r[1]["target_logprobs"] == []
    capped = topk(http, {"k": 3, "inputs": [{"token_ids": [5] * (MAX_MODEL_LEN + 50)}]}).json()["results"][0]
    assert len(capped["input_ids"]) == MAX_MODEL_LEN - 1


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"k": 257, "inputs": [{"text": "x"}]}, 422, "k_max=256"),
        ({"k": 0, "inputs": [{"text": "x"}]}, 422, "k"),
        ({"k": 2, "inputs": []}, 422, "inputs"),
        ({"k": 2, "inputs": [{"text": ""}]}, 422, "empty"),
        ({"k": 2, "inputs": [{"text": 5}]}, 422, "text"),
        ({"k": 2, "inputs": [{"text": "a", "token_ids": [1]}]}, 422, "exactly one"),
        ({"k": 2, "inputs": [{}]}, 422, "exactly one"),
        ({"k": 2, "inputs": [{"token_ids": [1, 2048]}]}, 422, "outside the vocabulary"),
        ({"k": 2, "inputs": [{"token_ids": [-1]}]}, 422, "token_ids"),
        ({"k": 2, "inputs": [{"text": "x"}], "top_p": 1}, 422, "top_p"),
        ({"k": 2, "inputs": [{"text": "x"}], "temperature": 0}, 422, "temperature"),
        ({"k": 2, "inputs": [{"text": "x"}], "targets": "all"}, 422, "targets"),
        ({"k": 2, "inputs": [{"text": "x"}], "targets": "sampled", "samples": 257}, 422, "max_samples=256"),
        ({"k": 2, "inputs": [{"text": "x"}], "seed": -1}, 422, "seed"),
        ({"k": 2, "inputs": [{"text": "x"}], "max_length": 0}, 422, "max_length"),
        ({"k": 2, "inputs": [{"text": "x"}] * 257}, 413, "limit is 256"),
    ],
)
def test_bad_requests_get_a_clear_json_error(http, body, status, words):
    r = topk(http, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_malformed_and_oversized_bodies(http):
    r = http.post("/v1/topk", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    big = orjson.dumps({"k": 2, "inputs": [{"text": "x" * (3 << 20)}]})
    r = http.post("/v1/topk", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_metrics_count_scored_tokens(http):
    before = _counter(http, "teacher_farm_tokens_scored_total")
    topk(http, {"k": 2, "inputs": [{"token_ids": [1, 2, 3, 4, 5]}]})
    assert _counter(http, "teacher_farm_tokens_scored_total") == before + 5


def _counter(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
