"""Chat records windowed like text, through the real HTTP app and a real chat-template tokenizer.

The engine is the real ``Engine`` (tokenizer, chat template, truncation) with its scoring replaced by
the stand-in's (``tests/standin.py``), so this runs in seconds without vLLM; ``tests/test_corpora.py``
does the same against a real engine.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from teacher_farm.client.cache import CacheOptions, CacheRun
from teacher_farm.client.transport import HttpTeacher
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.windows import window_starts
from teacher_farm.schemas.wire import Info, TopkRequest, Versions
from teacher_farm.server import settings as settings_module
from teacher_farm.server.app import create_app
from teacher_farm.server.engine import Engine
from teacher_farm.server.settings import ServerSettings
from tests import standin
from tests.conftest import SAMPLE, read_lines, wait_for

K = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny model's tokenizer (byte-level BPE, BOS added, Llama-3's chat layout)."""
    from transformers import AutoTokenizer

    from teacher_farm.server.tinymodel import make_tiny_model

    path = make_tiny_model(
        tmp_path_factory.mktemp("tok") / "tiny",
        [SAMPLE],
        vocab_size=512,
        hidden_size=64,
        num_layers=1,
        num_heads=1,
    )
    return AutoTokenizer.from_pretrained(path)


class _LLM:
    errored = False

    def shutdown(self, timeout: float) -> None:
        pass


class StandInScoring(Engine):
    """The real request handling of ``Engine`` with the stand-in's answers, counting the tokens scored."""

    def __init__(self, tokenizer) -> None:
        info = Info(
            model="tiny",
            model_fingerprint="m" * 16,
            tokenizer_fingerprint="t" * 16,
            vocab_size=len(tokenizer),
            k_max=16,
            max_model_len=1024,
            max_input_tokens=1023,
            max_inputs_per_request=1 << 30,
            adds_bos=True,
            versions=Versions(teacher_farm="-", schema_version=1, vllm="-"),
        )
        super().__init__(_LLM(), tokenizer, info)
        self.tokens_scored = 0

    async def score(self, ids, token_ids, scoring, selected=None, *, draws_at_last=False):
        self.tokens_scored += sum(len(t) for t in token_ids)
        return [
            standin.score(i, np.asarray(t, np.int32), scoring.k, self.info.vocab_size)
            for i, t in zip(ids, token_ids)
        ]


@pytest.fixture
def served(tokenizer, monkeypatch):
    monkeypatch.setattr(settings_module, "_settings", ServerSettings(api_key=None))
    engine = StandInScoring(tokenizer)
    app = create_app(lambda: engine)
    with TestClient(app) as client:
        wait_for(lambda: client.get("/health").status_code == 200, 10, "/health to answer 200", interval=0.05)
        yield SimpleNamespace(client=client, engine=engine, app=app)


def texts(n: int) -> list[str]:
    return [json.loads(x)["text"] for x in read_lines(SAMPLE, n)]


def a_chat(n: int = 4, chars: int = 300) -> list[dict]:
    """A system turn, then ``n`` turns of sample text, ``chars`` characters each."""
    return [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": x[:chars]} for i, x in enumerate(texts(n))
    ]


def render(tokenizer, chat: list[dict], **kw) -> list[int]:
    kw.setdefault("add_generation_prompt", False)
    return tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False, **kw)


def test_tokenize_with_messages_gives_the_ids_topk_scores_for_the_record_in_full(served, tokenizer):
    chat = a_chat()
    full = render(tokenizer, chat)
    assert 37 < len(full) < 1023
    r = served.client.post("/tokenize", json={"messages": chat, "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == full and body["count"] == len(full) and body["max_model_len"] == 1024
    assert body["token_strs"] is None
    # What /v1/topk scores for the record: all of it, or its first max_length tokens when cut.
    for max_length, want in ((None, full), (37, full[:37])):
        r = served.client.post(
            "/v1/topk", json={"k": K, "max_length": max_length, "inputs": [{"messages": chat}]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["input_ids"] == want
    # vLLM's defaults and options: a generation prompt unless told otherwise, special tokens on request.
    with_prompt = served.client.post("/tokenize", json={"messages": chat}).json()["tokens"]
    assert (
        with_prompt == render(tokenizer, chat, add_generation_prompt=True)
        and with_prompt[: len(full)] == full
    )
    assert len(with_prompt) > len(full)
    bos = tokenizer.bos_token_id
    doubled = served.client.post(
        "/tokenize",
        json={
            "messages": chat,
            "add_generation_prompt": False,
            "add_special_tokens": True,
            "return_token_strs": True,
        },
    ).json()
    assert doubled["tokens"] == [bos] + full and full[0] == bos
    assert doubled["token_strs"] == tokenizer.convert_ids_to_tokens([bos] + full)
    open_ended = served.client.post(
        "/tokenize", json={"messages": chat, "continue_final_message": True}
    ).json()["tokens"]
    assert open_ended == render(tokenizer, chat, continue_final_message=True) and open_ended != full
    # The prompt form is as before.
    assert (
        served.client.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
        == tokenizer("Hello")["input_ids"]
    )


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
            "not both",
        ),
    ],
)
def test_bad_chat_tokenize_requests_get_a_422(served, body, words):
    r = served.client.post("/tokenize", json=body)
    assert r.status_code == 422 and words in r.json()["error"], r.text


def test_a_chat_template_that_refuses_the_messages_refuses_the_request(served, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    for path, body in (
        ("/tokenize", {"messages": a_chat(1)}),
        ("/v1/topk", {"k": K, "inputs": [{"messages": a_chat(1)}]}),
    ):
        r = served.client.post(path, json=body)
        assert r.status_code == 422 and "roles must alternate" in r.json()["error"], r.text


def test_text_cut_by_the_tokenizer_is_the_first_tokens_of_its_full_tokenization(served):
    """What lets the cache keep a text line's cut row as its window 0."""
    engine = served.engine
    for text in texts(20):
        full = engine.tokenize([text], None)[0]
        for max_length in (1, 2, 7, 64, len(full) - 1):
            assert engine.tokenize([text], max_length)[0] == full[:max_length]
        req = TopkRequest(
            k=K, max_length=16, inputs=[{"text": text}, {"messages": [{"role": "user", "content": text}]}]
        )
        cut_text, cut_chat = engine.prepare(req)
        assert cut_text == full[:16]
        assert cut_chat == engine.render_chats([[{"role": "user", "content": text}]], None)[0][:16]


def test_a_long_chat_record_is_windowed_through_the_server_and_each_window_scored_once(
    served, tokenizer, tmp_path
):
    from teacher_farm.training import TopkDataset

    chat, short = a_chat(), [{"role": "user", "content": "Hi."}]
    long_text = " ".join(texts(8))
    inp = tmp_path / "a.jsonl"
    inp.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "chat", "messages": chat},
                {"id": "short", "messages": short},
                {"id": "text", "text": long_text},
            ]
        )
        + "\n"
    )
    L, S = 48, 20
    opts = CacheOptions(
        input=str(inp),
        out_dir=tmp_path / "out",
        scoring=Scoring(k=K),
        max_length=L,
        long_lines="window",
        stride=S,
    )

    async def cache():
        teacher = HttpTeacher("http://teacher", transport=httpx.ASGITransport(app=served.app))
        try:
            return await CacheRun(opts, teacher).run()
        finally:
            await teacher.aclose()

    summary = asyncio.run(cache())
    got = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).to_pylist()
    vocab = len(tokenizer)
    fulls = {
        "chat": render(tokenizer, chat),
        "short": render(tokenizer, short),
        "text": tokenizer(long_text)["input_ids"],
    }
    assert len(fulls["chat"]) > 3 * L and len(fulls["text"]) > 3 * L and len(fulls["short"]) < L
    for seq_id, full in fulls.items():
        windows = [r for r in got if r["id"] == seq_id]
        starts = window_starts(len(full), L, S).tolist()
        assert [w["offset"] for w in windows] == starts, seq_id
        for w in windows:
            ids = full[w["offset"] : w["offset"] + L]
            assert w["input_ids"] == ids and w["source"] == str(inp)
            # Scored on the window's own ids, as scoring those ids directly gives.
            assert w["topk_ids"] == standin.expected_topk(np.array(ids), K, vocab).tolist()
    # No token was scored twice: the cut rows of the batch are the lines' first windows.
    assert served.engine.tokens_scored == summary.tokens == sum(len(r["input_ids"]) for r in got)
    items = list(TopkDataset(tmp_path / "out", join_windows=True))
    assert [x["input_ids"].tolist() for x in items] == list(fulls.values())
    assert [x["source"] for x in items] == [str(inp)] * 3
