"""OpenAI-style discovery: ``GET /v1/models`` and ``GET /v1/models/{id}``, read by the official ``openai``
client.

The name a client discovers there must be the one the completions answers carry, and the key guards
these routes like every other ``/v1`` route.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.conftest import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.engine

openai = pytest.importorskip("openai", reason="the openai client is not installed")


def client(server, api_key: str = API_KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=300)


def test_models_list_is_openai_shaped_and_names_the_served_model(server, http, tiny_model):
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    (card,) = body["data"]
    created = card.pop("created")
    assert body["object"] == "list"
    assert card == {
        "id": str(tiny_model),
        "object": "model",
        "owned_by": "teacher-farm",
        "root": str(tiny_model),
        "parent": None,
        "max_model_len": MAX_MODEL_LEN,
        "permission": [],
    }
    # ``created`` is when the server started: after its process was started, not per request.
    started = time.time() - (time.monotonic() - server.started)
    assert isinstance(created, int) and started - 1 <= created <= time.time()
    assert http.get("/v1/models").json()["data"][0]["created"] == created
    assert card["id"] == http.get("/v1/info").json()["model"]


def test_openai_client_discovers_the_model_and_completes_with_it(server, http, reference):
    openai_client = client(server)
    models = openai_client.models.list()
    (model,) = models.data
    assert isinstance(model, openai.types.Model)
    assert model.object == "model" and model.owned_by == "teacher-farm" and isinstance(model.created, int)
    assert model.model_extra["max_model_len"] == MAX_MODEL_LEN

    text = "Teachers distil knowledge into students."
    done = openai_client.completions.create(
        model=model.id,
        prompt=text,
        max_tokens=0,
        echo=True,
        logprobs=2,
        temperature=0,
    )
    assert done.model == model.id
    (choice,) = done.choices
    ids = reference.tokenize(text)
    (ref,) = http.post("/v1/topk", json={"k": 2, "inputs": [{"token_ids": ids}]}).json()["results"]
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], ref["target_logprobs"], rtol=0, atol=1e-6)


def test_openai_client_retrieves_the_model_and_not_another(server):
    openai_client = client(server)
    (listed,) = openai_client.models.list().data
    # The tests' model name is a path: the client sends its slashes percent-encoded.
    assert "/" in listed.id
    assert openai_client.models.retrieve(listed.id) == listed
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.models.retrieve("teacher")
    # OpenAI's error shape, so the client's exception carries the server's message and code.
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "`teacher` does not exist" in str(caught.value) and listed.id in str(caught.value)
    assert caught.value.response.json()["kind"] == "ModelNotFound"


def test_model_routes_need_the_key(server):
    wrong = client(server, api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.models.retrieve("teacher")
    for path in ("/v1/models", "/v1/models/teacher"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and "API key" in r.json()["error"]
