"""One request that would exhaust or stall a server, on loopback: each is refused, bounded or aborted.

Without an engine (seconds): the answer-size estimate and its 413, admission held until the answer is
sent, JSON encoded in short pieces, a chat's turns found in linear time and bounded, the minimum
temperature, token ids beyond int64, the number count of a body, a ``$`` in a report's file name.
With a real engine: the heaviest allowed answers in parallel while ``/health`` answers and the server's
memory stays under its stated bound, half-open connections, a trickled body, a client that disconnects.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import orjson
import psutil
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from teacher_farm.schemas import ARROW_STREAM
from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import ServerBusy
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.server import intake
from teacher_farm.server import settings as settings_module
from teacher_farm.server.app import create_app
from teacher_farm.server.settings import ServerSettings
from tests.conftest import API_KEY, Server, descendants, fake_engine_info, running, wait_for

MiB = 2**20


class FakeTeacher:
    """A loaded teacher without vLLM: token ids as given, answers of the right shapes."""

    def __init__(self) -> None:
        self.llm = SimpleNamespace(errored=False)
        self.info = fake_engine_info(k_max=4, vocab_size=16)
        self.tokenizer = None
        self.scored = 0

    def prepare(self, req):
        return [x.token_ids if x.token_ids is not None else [1] * len(x.messages) for x in req.inputs]

    async def score_request(self, req, token_ids):
        self.scored += 1
        out = []
        for x, ids in zip(req.inputs, token_ids):
            n = len(ids)
            out.append(
                ScoredSequence(
                    id=x.id,
                    input_ids=np.asarray(ids, np.int32),
                    topk_ids=np.zeros((n, req.scoring.k), np.int32),
                    topk_logprobs=np.full((n, req.scoring.k), -1.5, np.float32),
                    target_logprobs=np.full(n - 1, -2.0, np.float32),
                    target_ranks=np.ones(n - 1, np.int32),
                )
            )
        return out

    def shutdown(self) -> None:
        pass


@pytest.fixture
def app_on(monkeypatch):
    """A running app on a fake teacher, under the settings given (no API key)."""

    def start(**limits):
        monkeypatch.setattr(settings_module, "_settings", ServerSettings(api_key=None, **limits))
        fake = FakeTeacher()
        client = TestClient(create_app(lambda: fake)).__enter__()
        wait_for(lambda: client.get("/health").status_code == 200, 10, "/health to answer 200", interval=0.05)
        started.append(client)
        return SimpleNamespace(client=client, teacher=fake)

    started: list[TestClient] = []
    yield start
    for client in started:
        client.__exit__(None, None, None)


# -- the answer's size ---------------------------------------------------------------------------


def test_an_answer_over_the_cap_is_413_naming_it_and_arrow_helps(app_on):
    served = app_on(max_answer_bytes=MiB)
    body = {"k": 4, "inputs": [{"token_ids": [1] * 60}] * 70}  # 4,200 tokens x 15 numbers
    r = served.client.post("/v1/topk", json=body)
    assert r.status_code == 413, r.text
    assert "max_answer_bytes" in r.json()["error"] and "Arrow" in r.json()["error"]
    assert served.teacher.scored == 0  # refused before any engine work
    r = served.client.post("/v1/topk", json=body, headers={"Accept": ARROW_STREAM})
    assert r.status_code == 200 and r.headers["content-type"] == ARROW_STREAM


def test_completions_are_admitted_by_their_top_logprobs(app_on):
    served = app_on(max_answer_bytes=2 * MiB)
    body = {"prompt": [[1] * 60] * 32, "echo": True, "logprobs": 4, "max_tokens": 0}
    r = served.client.post("/v1/completions", json=body)
    assert (
        r.status_code == 413 and "max_answer_bytes" in r.json()["error"] and "logprobs" in r.json()["error"]
    )
    assert served.teacher.scored == 0


def test_the_clients_heaviest_batch_fits_the_default_cap_as_arrow_not_as_json():
    # 32 lines of 8,192 tokens (the client's batch) at k=256 with 256 draws of both targets.
    heaviest, cap = Scoring(k=256, targets="both", samples=256), ServerSettings().max_answer_bytes
    assert intake.topk_answer_bytes(heaviest, 32 * 8192, 32, arrow=True) <= cap
    assert intake.topk_answer_bytes(heaviest, 32 * 8192, 32, arrow=False) > cap


def test_admission_holds_answer_bytes_until_released():
    admission = intake.Admission(limit=10**9, max_answer_bytes=100)
    release = admission.acquire(10, 2, answer_bytes=80)
    with pytest.raises(ServerBusy, match="bytes in flight"):
        admission.acquire(10, 2, answer_bytes=30)
    release()
    release()  # idempotent: an answer sent and then failed releases once
    assert admission.answer_bytes == 0 and admission.queued == 0
    admission.acquire(10, 2, answer_bytes=30)()


def test_an_answer_holds_its_admission_until_sent_then_gives_it_back(app_on):
    served = app_on()
    r = served.client.post("/v1/topk", json={"k": 2, "inputs": [{"token_ids": [1, 2, 3]}]})
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    admission = served.client.app.state.admission
    assert admission.answer_bytes == 0 and admission.queued == 0


def test_json_is_encoded_in_short_pieces_that_join_to_orjsons_answer(monkeypatch):
    monkeypatch.setattr(intake, "JSON_CHUNK_NUMBERS", 7)
    monkeypatch.setattr(intake, "SEND_CHUNK_BYTES", 50)
    rng = np.random.default_rng(0)
    body = {
        "model": "m",
        "k": 3,
        "results": [
            {
                "id": None,
                "topk_logprobs": rng.random((20, 3), dtype=np.float32),
                "ids": np.arange(30),
                "kept": np.ones(5, bool),
                "sample_ids": [np.arange(i) for i in range(9)],
            }
            for _ in range(3)
        ],
        "choices": [
            {"logprobs": {"tokens": ["a", "b"] * 20, "top_logprobs": [None] + [{"a": 1.0, "b": -2.5}] * 30}}
        ],
        "empty": [],
    }
    pieces = intake.json_chunks(body)
    assert len(pieces) > 10 and b"".join(pieces) == orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


# -- bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_a_bodys_numbers_are_counted_outside_strings(chunk):
    body = orjson.dumps(
        {
            "inputs": [{"text": 'a,b,\\",c\\\\' * 40 + ",,"}, {"token_ids": list(range(1000))}],
            "k": 4,
            "x": "\\\\,\\" + '"',
        }
    )
    # 999 commas between the ids, one between the inputs, two between the fields.
    assert intake.count_numbers(body, chunk) == 1003


def test_a_body_of_too_many_ids_is_refused_before_it_is_parsed(app_on):
    served = app_on(max_tokens_per_request=1000)
    body = b'{"k": 2, "inputs": [{"token_ids": [' + b"1," * 20_000 + b"1]}]}"
    r = served.client.post("/v1/topk", content=body)
    assert r.status_code == 413 and "limit of 1000 tokens" in r.json()["error"]


def test_token_ids_beyond_int64_are_a_4xx_not_a_500(app_on):
    served = app_on()
    r = served.client.post(
        "/v1/completions", json={"prompt": [1, 2**64], "echo": True, "logprobs": 1, "max_tokens": 0}
    )
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]
    r = served.client.post("/detokenize", json={"tokens": [2**64]})
    assert r.status_code == 422


def test_tokenize_and_detokenize_are_bounded(app_on):
    served = app_on(max_tokens_per_request=1000, max_chat_turns=8)
    r = served.client.post("/detokenize", json={"tokens": [1] * 1001})
    assert r.status_code == 413 and "max_tokens_per_request" in r.json()["error"]
    turns = [{"role": "user", "content": "x"}] * 9
    r = served.client.post("/tokenize", json={"messages": turns})
    assert r.status_code == 413 and "max_chat_turns" in r.json()["error"]


# -- chats, temperature, report -----------------------------------------------------------------


def test_a_chat_of_too_many_turns_is_refused_before_it_is_rendered(app_on):
    served = app_on()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(20_000)]
    started = time.monotonic()
    r = served.client.post(
        "/v1/topk", json={"k": 2, "positions": "assistant", "inputs": [{"messages": turns}]}
    )
    assert r.status_code == 413 and "max_chat_turns" in r.json()["error"]
    assert time.monotonic() - started < 1.0 and served.teacher.scored == 0


def test_a_long_chats_turns_are_found_in_linear_time_and_as_by_every_prefix(tiny_model):
    from transformers import AutoTokenizer

    from teacher_farm.server import chat

    tok = AutoTokenizer.from_pretrained(tiny_model)
    short = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}, said"} for i in range(40)]
    text = chat._render(tok, short, False)
    assert chat._spans_by_window(tok, short, text) == chat._spans_by_prefixes(tok, short, text)
    long = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i}"}
        for i in range(ServerSettings().max_chat_turns)
    ]
    started = time.monotonic()
    ids, inside = chat.assistant_tokens(tok, long)
    assert time.monotonic() - started < 1.0
    assert 0 < inside.sum() < len(ids)


def test_a_temperature_too_small_for_fp32_is_refused_and_the_reduction_stays_finite(app_on):
    import torch

    from teacher_farm.schemas.scoring import PackedLayout
    from teacher_farm.server.reduce import reduce_rows

    with pytest.raises(ValidationError, match="temperature"):
        Scoring(temperature=1e-40)
    served = app_on()
    r = served.client.post("/v1/topk", json={"k": 2, "temperature": 1e-40, "inputs": [{"token_ids": [1, 2]}]})
    assert r.status_code == 422 and "temperature" in r.json()["error"]
    logits = torch.randn(4, 64) * 30
    rows = reduce_rows(
        logits, torch.zeros(4, dtype=torch.int64), PackedLayout(8, 0, entropy=True), torch.full((4,), 1e38)
    )
    assert torch.isfinite(rows[:, 8:16].view(torch.float32)).all()
    assert torch.isfinite(rows[:, -1].view(torch.float32)).all()


def test_a_dollar_in_a_source_name_is_drawn_as_typed():
    pytest.importorskip("matplotlib")
    from teacher_farm.client import report

    stats = SimpleNamespace(sources={"data/a$\\foo$.jsonl": [3, 120], "data/b.jsonl": [1, 10]})
    figure = report._sources_figure(report._pyplot(), stats)
    assert figure.png.startswith(b"\x89PNG")


# -- against a real server -----------------------------------------------------------------------

#: The small-capped server's limits: each attack below meets one of them.
CAPS = {
    "TEACHER_FARM_MAX_ANSWER_BYTES": str(64 * MiB),
    "TEACHER_FARM_MAX_ANSWER_BYTES_IN_FLIGHT": str(128 * MiB),
    "TEACHER_FARM_HEADER_TIMEOUT_S": "2",
    "TEACHER_FARM_BODY_TIMEOUT_S": "3",
    "TEACHER_FARM_MAX_CONNECTIONS": "1024",
}
#: What the server process tree may grow by beyond the answers in flight (engine steps, allocator slack).
RSS_SLACK = 256 * MiB


@pytest.fixture(scope="module")
def capped(tiny_model, tmp_path_factory):
    """A server with small answer caps and short connection deadlines, to meet them quickly."""
    yield from running(Server(tiny_model, tmp_path_factory.mktemp("logs") / "capped.log", env=CAPS))


def _rss(pid: int) -> int:
    total = 0
    for p in [psutil.Process(pid), *descendants(pid)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.engine
def test_the_heaviest_allowed_answers_in_parallel_keep_health_fast_and_memory_bounded(capped):
    # k=256, both targets, 256 draws: ~36 kB of JSON estimate per token, so ~1,800 tokens fill the cap.
    heavy = {
        "k": 256,
        "targets": "both",
        "samples": 256,
        "inputs": [
            {"token_ids": list(np.arange(900) % 2000 + 1)},
            {"token_ids": list(np.arange(880) % 1999 + 3)},
        ],
    }
    body = orjson.dumps(heavy, option=orjson.OPT_SERIALIZE_NUMPY)
    with httpx.Client(base_url=capped.url, timeout=300) as c:
        assert (
            c.post("/v1/topk", content=body).status_code == 200
        )  # warm: allocator pools exist before the baseline
        time.sleep(1)
        baseline = _rss(capped.proc.pid)
        peak, slowest, answers, stop = [baseline], [0.0], [], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                started = time.monotonic()
                assert httpx.get(capped.url + "/health", timeout=10).status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - started)
                peak[0] = max(peak[0], _rss(capped.proc.pid))
                time.sleep(0.05)

        def send() -> None:
            with httpx.Client(base_url=capped.url, timeout=300) as own:
                for _ in range(3):
                    r = own.post("/v1/topk", content=body)
                    answers.append(r.status_code)
                    if r.status_code == 429:
                        time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        senders = [threading.Thread(target=send) for _ in range(6)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(600)
        stop.set()
        watcher.join(30)
        assert answers.count(200) >= 3 and set(answers) <= {200, 429}, answers
        assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f} s while answers were built"
        grew = peak[0] - baseline
        print(
            f"server tree grew {grew / MiB:.0f} MiB at most; /health took {slowest[0]:.3f} s at most; "
            f"{answers}"
        )
        assert grew < int(CAPS["TEACHER_FARM_MAX_ANSWER_BYTES_IN_FLIGHT"]) + RSS_SLACK, (
            f"grew {grew / MiB:.0f} MiB"
        )
        assert _metric(capped.url, "teacher_farm_answer_bytes_in_flight") == 0
        # One over the per-request cap is refused by its estimate, before any engine work.
        over = {**heavy, "inputs": heavy["inputs"] * 2}
        r = c.post("/v1/topk", content=orjson.dumps(over, option=orjson.OPT_SERIALIZE_NUMPY))
        assert r.status_code == 413 and "max_answer_bytes" in r.json()["error"]


@pytest.mark.engine
def test_half_open_connections_are_closed_and_a_request_is_still_answered(capped):
    conns = []
    try:
        for i in range(500):
            s = socket.create_connection(("127.0.0.1", capped.port), timeout=10)
            if i % 2:
                s.sendall(b"POST /v1/topk HTTP/1.1\r\nHost: x\r\n")  # headers begun, never ended
            conns.append(s)
        assert httpx.get(capped.url + "/health", timeout=10).status_code == 200
        time.sleep(float(CAPS["TEACHER_FARM_HEADER_TIMEOUT_S"]) + 2)
        for s in conns:
            s.settimeout(5)
            assert s.recv(1024) == b""  # closed by the server
        assert httpx.get(capped.url + "/health", timeout=10).status_code == 200
    finally:
        for s in conns:
            s.close()


@pytest.mark.engine
def test_a_trickled_body_gets_408(capped):
    with socket.create_connection(("127.0.0.1", capped.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/topk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        s.sendall(b'{"k": 2, "inputs": [{"token_ids": [1, 2')
        started = time.monotonic()
        answer = b""
        # Until the server closes: the head and the body may come in separate packets.
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"RequestTimeout" in answer
    assert time.monotonic() - started < float(CAPS["TEACHER_FARM_BODY_TIMEOUT_S"]) + 5


@pytest.mark.engine
def test_a_client_that_disconnects_has_its_engine_work_aborted(capped):
    # 200,000 tokens at k=1 as Arrow: within the answer cap, and seconds of engine work.
    body = orjson.dumps(
        {"k": 1, "inputs": [{"token_ids": [1 + i % 1000 for i in range(1000)]}] * 200},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    aborted = _metric(capped.url, "teacher_farm_requests_aborted_total")
    with socket.create_connection(("127.0.0.1", capped.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/topk HTTP/1.1\r\nHost: x\r\nAccept: "
            + ARROW_STREAM.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        wait_for(
            lambda: _metric(capped.url, "teacher_farm_engine_requests") > 0,
            30,
            "the engine to take the request",
        )
    wait_for(
        lambda: _metric(capped.url, "teacher_farm_requests_aborted_total") == aborted + 1, 10, "the abort"
    )
    wait_for(
        lambda: _metric(capped.url, "teacher_farm_engine_requests") == 0,
        10,
        "the engine to drop its requests",
    )
    assert _metric(capped.url, "teacher_farm_answer_bytes_in_flight") == 0


@pytest.mark.engine
def test_the_shared_server_refuses_answers_too_large_for_it(server):
    """The shapes that built GBs of answer: 256 prompts of 1,023 ids with logprobs 256,
    and k=256 with draws."""
    ids = [[1 + (i * 7 + j) % 2000 for j in range(1023)] for i in range(256)]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 256, "max_tokens": 0})
        assert r.status_code == 413 and "max_answer_bytes" in r.json()["error"], r.text
        r = c.post(
            "/v1/topk",
            json={"k": 256, "targets": "both", "samples": 256, "inputs": [{"token_ids": x} for x in ids]},
        )
        assert r.status_code == 413 and "Arrow" in r.json()["error"], r.text
        r = c.post("/v1/topk", json={"k": 2, "temperature": 1e-40, "inputs": [{"token_ids": [1, 2]}]})
        assert r.status_code == 422 and "temperature" in r.json()["error"]
        r = c.post(
            "/v1/completions", json={"prompt": [1, 2**64], "echo": True, "logprobs": 1, "max_tokens": 0}
        )
        assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]
