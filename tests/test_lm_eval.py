"""lm-evaluation-harness against the farm: ``/v1/completions``, ``/tokenize``, ``/tokenizer_info``.

The completions answer must be ``/v1/topk`` reshaped: ``token_logprobs[i]`` is ``target_logprobs[i - 1]``
and ``top_logprobs[i]`` is the top-N of row ``i - 1``, so lm-eval's loglikelihood and ``is_greedy``
come out of the one scoring path.
"""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.engine

TEXT = "Teachers distil knowledge into students."


def post(http, path, body):
    return http.post(path, content=orjson.dumps(body), headers={"Content-Type": "application/json"})


def complete(http, prompt, *, max_tokens=0, logprobs=1, **extra):
    """lm-eval's ``local-completions`` loglikelihood request, field for field."""
    body = {
        "model": "teacher",
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "seed": 1234,
        "echo": True,
        **extra,
    }
    r = post(http, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def topk(http, token_ids, k):
    r = post(http, "/v1/topk", {"k": k, "inputs": [{"token_ids": ids} for ids in token_ids]})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def first_wins(keys, values):
    """``{key: value}`` keeping each key's first (most likely) value, as the server builds it."""
    out = {}
    for key, value in zip(keys, values):
        out.setdefault(key, value)
    return out


def greedy_prompt(http, prefix, steps=3):
    """``prefix`` followed by ``steps`` greedy tokens: their target ranks are all 1."""
    ids = list(prefix)
    for _ in range(steps):
        ids.append(topk(http, [ids], 1)[0]["topk_ids"][-1][0])
    return ids


@pytest.fixture(scope="module")
def prompts(http, reference):
    """lm-eval's batched shape: token-id lists of different lengths, one of them ending greedily."""
    return [
        reference.tokenize(TEXT),
        [7, 8, 9, 10, 11, 12, 13],
        greedy_prompt(http, reference.tokenize("The farm")),
    ]


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("logprobs", [1, 5])
def test_completions_are_topk_reshaped(http, reference, prompts, max_tokens, logprobs):
    body = complete(http, prompts, max_tokens=max_tokens, logprobs=logprobs)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int) and body["model"]
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert body["usage"]["completion_tokens"] == max_tokens * len(prompts)
    expected = topk(http, prompts, logprobs)
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    decode = lambda i: reference.tokenizer.decode([i])  # noqa: E731

    for ids, choice, ref in zip(prompts, body["choices"], expected):
        n = len(ids)
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length"
        lengths = {len(lp[f]) for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert lengths == {n + max_tokens}
        assert lp["tokens"][:n] == [decode(i) for i in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"][0] == 0 and np.all(
            np.diff(lp["text_offset"]) == [len(t) for t in lp["tokens"][:-1]]
        )

        # The prompt's logprobs are /v1/topk's target_logprobs, to float32 precision.
        got = np.array(lp["token_logprobs"][1:n], dtype=np.float64)
        np.testing.assert_allclose(got, ref["target_logprobs"], rtol=0, atol=1e-6)
        # Each position's top-N is the previous row of /v1/topk.
        for i in range(1, n):
            row_ids, row_lps = ref["topk_ids"][i - 1][:logprobs], ref["topk_logprobs"][i - 1][:logprobs]
            top = lp["top_logprobs"][i]
            want = first_wins([decode(t) for t in row_ids], row_lps)
            assert list(top) == list(want)
            np.testing.assert_allclose(list(top.values()), list(want.values()), rtol=0, atol=1e-6)
            # lm-eval's is_greedy: the token's logprob equals the best of the top dict exactly when it is the
            # argmax.
            rank = ref["target_ranks"][i - 1]
            assert (lp["token_logprobs"][i] == max(top.values())) == (rank == 1)
            if rank == 1:
                assert row_ids[0] == ids[i]

        if max_tokens == 1:
            next_id, next_lp = ref["topk_ids"][-1][0], ref["topk_logprobs"][-1][0]
            assert lp["tokens"][-1] == decode(next_id)
            assert lp["token_logprobs"][-1] == pytest.approx(next_lp, abs=1e-6)
            assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
            assert list(lp["top_logprobs"][-1]) == list(
                first_wins([decode(t) for t in ref["topk_ids"][-1][:logprobs]], ref["topk_logprobs"][-1])
            )
            assert choice["text"] == reference.tokenizer.decode(ids) + decode(next_id)
        else:
            assert choice["text"] == reference.tokenizer.decode(ids)


def test_lm_eval_style_parse_finds_the_greedy_continuation(http, prompts):
    """The sum and ``is_greedy`` lm-eval computes from the answer (``[ctxlen:-1]``, max_tokens=1)."""
    body = complete(http, prompts, max_tokens=1, logprobs=1)
    expected = topk(http, prompts, 1)
    ctxlen = len(prompts[2]) - 3  # the last prompt's final three tokens are greedy
    for _ids, choice, ref in zip(prompts, body["choices"], expected):
        lp = choice["logprobs"]
        conts, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(conts, tops))
        assert is_greedy == all(r == 1 for r in ref["target_ranks"][ctxlen - 1 :])
        assert sum(conts) == pytest.approx(sum(ref["target_logprobs"][ctxlen - 1 :]), abs=1e-5)
    assert is_greedy  # the greedy prompt came last


def test_token_ids_as_keys_and_one_flat_prompt(http, prompts):
    """vLLM's ``return_tokens_as_token_ids``: the top dicts are exactly the topk rows."""
    ids = prompts[0]
    body = complete(http, ids, max_tokens=1, logprobs=5, return_tokens_as_token_ids=True)
    (choice,) = body["choices"]
    (ref,) = topk(http, [ids], 5)
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids + [ref["topk_ids"][-1][0]]]
    for i, top in enumerate(lp["top_logprobs"][1:]):
        assert list(top) == [f"token_id:{t}" for t in ref["topk_ids"][i]]
        np.testing.assert_allclose(list(top.values()), ref["topk_logprobs"][i], rtol=0, atol=1e-6)


def test_text_prompts_go_through_the_teacher_tokenizer(http, reference):
    texts = [TEXT, "Ünïcödé 🧪 tëxt"]
    body = complete(http, texts, max_tokens=0, logprobs=3, return_tokens_as_token_ids=True)
    single = complete(http, TEXT, max_tokens=0, logprobs=3)
    r = post(http, "/v1/topk", {"k": 3, "inputs": [{"text": t} for t in texts]})
    expected = r.json()["results"]
    for text, choice, ref in zip(texts, body["choices"], expected):
        assert ref["input_ids"] == reference.tokenize(text)
        assert choice["text"] == text
        assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in ref["input_ids"]]
        np.testing.assert_allclose(
            np.array(choice["logprobs"]["token_logprobs"][1:], dtype=np.float64),
            ref["target_logprobs"],
            rtol=0,
            atol=1e-6,
        )
    assert single["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        body["choices"][0]["logprobs"]["token_logprobs"], abs=1e-6
    )


def test_single_token_prompt_without_echo_and_without_logprobs(http):
    (ref,) = topk(http, [[5]], 2)
    body = complete(http, [5], max_tokens=1, logprobs=2, echo=False)
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([ref["topk_logprobs"][0][0]], abs=1e-6)
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == 1 and len(lp["top_logprobs"][0]) <= 2
    echoed = complete(http, [5], max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
    assert echoed["token_logprobs"] == [None] and echoed["top_logprobs"] == [None]
    zero = complete(http, [5, 6, 7], max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [None, {}, {}] and None not in zero["token_logprobs"][1:]
    none = complete(http, [5, 6, 7], max_tokens=0, logprobs=None)["choices"][0]
    assert none["logprobs"] is None and none["text"]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_uses_the_teacher_tokenizer(http, reference, add_special_tokens):
    text = "Ünïcödé 🧪 " + TEXT
    r = post(
        http, "/tokenize", {"model": "teacher", "prompt": text, "add_special_tokens": add_special_tokens}
    )
    assert r.status_code == 200, r.text
    want = reference.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert r.json() == {
        "tokens": want,
        "count": len(want),
        "max_model_len": MAX_MODEL_LEN,
        "token_strs": None,
    }
    strs = post(http, "/tokenize", {"prompt": text, "return_token_strs": True}).json()["token_strs"]
    assert strs == reference.tokenizer.convert_ids_to_tokens(reference.tokenize(text))
    back = post(http, "/detokenize", {"tokens": want}).json()["prompt"]
    assert back == reference.tokenizer.decode(want)


def test_tokenizer_info_describes_the_teacher_tokenizer(http, reference):
    r = http.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info, tok = r.json(), reference.tokenizer
    assert info["tokenizer_class"] == type(tok).__name__
    assert (
        (info["bos_token"], info["bos_token_id"])
        == (tok.bos_token, tok.bos_token_id)
        == ("<|begin_of_text|>", 0)
    )
    assert (info["eos_token"], info["eos_token_id"]) == (tok.eos_token, tok.eos_token_id)
    assert info["vocab_size"] == len(tok) and info["model_max_length"] == tok.model_max_length
    assert info["max_model_len"] == MAX_MODEL_LEN
    assert info.get("chat_template") == tok.chat_template  # the tiny tokenizer has none
    assert "vocab_file" not in info and "merges_file" not in info


@pytest.mark.parametrize("path", ["/tokenizer_info", "/v1/completions", "/tokenize", "/detokenize"])
def test_compat_endpoints_need_the_key(server, path):
    if path == "/tokenizer_info":
        r = httpx.get(server.url + path)
    else:
        r = httpx.post(server.url + path, json={"prompt": [1], "max_tokens": 0, "echo": True})
    assert r.status_code == 401 and "API key" in r.json()["error"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"prompt": [[1, 2]], "max_tokens": 5, "echo": True, "logprobs": 1}, "scores prompts only"),
        ({"prompt": [[1, 2]], "echo": True, "logprobs": 1}, "max_tokens is not set"),
        ({"prompt": [[1, 2]], "max_tokens": 0, "echo": False, "logprobs": 1}, "echo=true"),
        ({"prompt": [[1, 2]], "max_tokens": 0, "echo": True, "logprobs": 257}, "k_max=256"),
        ({"prompt": [[1, 2]], "max_tokens": 0, "echo": True, "logprobs": -1}, "logprobs=-1"),
        (
            {"prompt": [[1, 2]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.001},
            "send 0 (greedy)",
        ),
        ({"prompt": [[1, 2]], "max_tokens": 0, "echo": True, "stream": True}, "stream"),
        ({"prompt": [[1, 2]], "max_tokens": 0, "echo": True, "n": 2}, "n and best_of"),
        ({"prompt": [], "max_tokens": 0, "echo": True}, "prompt is empty"),
        ({"prompt": [[1, 2], []], "max_tokens": 0, "echo": True}, "prompt.1"),
        ({"prompt": "", "max_tokens": 0, "echo": True}, "empty string"),
        ({"prompt": [1, "a"], "max_tokens": 0, "echo": True}, "list of token ids"),
        ({"prompt": [[1, 2048]], "max_tokens": 0, "echo": True}, "outside the vocabulary"),
        ({"prompt": [[1, -3]], "max_tokens": 0, "echo": True}, "outside the vocabulary"),
        ({"prompt": [[1] * MAX_MODEL_LEN], "max_tokens": 0, "echo": True}, f"at most {MAX_MODEL_LEN - 1}"),
        ({"max_tokens": 0, "echo": True}, "prompt"),
    ],
)
def test_bad_completions_get_a_clear_422(http, body, words):
    r = post(http, "/v1/completions", body)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]


def test_bad_tokenize_requests(http):
    assert post(http, "/tokenize", {"messages": []}).status_code == 422
    r = post(http, "/detokenize", {"tokens": [1, 99999]})
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]
    r = http.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


# --- lm-eval's own code against the live server ------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_api():
    return pytest.importorskip("lm_eval.models.openai_completions", reason="lm_eval is not installed")


def test_lm_eval_payload_and_parse_logprobs(server, http, lm_eval_api, prompts):
    lm = lm_eval_api.LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model="teacher",
        tokenizer_backend=None,
    )
    payload = lm._create_payload(prompts, generate=False, seed=1234)
    assert payload["echo"] is True and payload["max_tokens"] in (0, 1)
    r = post(http, "/v1/completions", payload)
    assert r.status_code == 200, r.text
    ctxlens = [1, 4, len(prompts[2]) - 3]
    parsed = lm.parse_logprobs(r.json(), tokens=prompts, ctxlens=ctxlens)
    expected = topk(http, prompts, 1)
    for (ll, greedy), ref, ctxlen in zip(parsed, expected, ctxlens):
        assert ll == pytest.approx(sum(ref["target_logprobs"][ctxlen - 1 :]), abs=1e-5)
        assert greedy == all(rank == 1 for rank in ref["target_ranks"][ctxlen - 1 :])
    assert parsed[2][1] is True


def test_lm_eval_loglikelihood_end_to_end_with_remote_tokenizer(server, http, reference, lm_eval_api):
    """``tokenizer_backend=auto`` finds ``/tokenizer_info`` + ``/tokenize``; scores via ``/v1/completions``.

    lm-eval 0.4.13 never asks ``/v1/models`` (it sends ``model=`` as given, null when left out); the
    name a user would look up there is the one used here.
    """
    from lm_eval.api.instance import Instance

    (served,) = http.get("/v1/models").json()["data"]
    lm = lm_eval_api.LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=served["id"],
        tokenizer_backend="auto",
        auth_token=API_KEY,
        header={"Authorization": f"Bearer {API_KEY}"},
        batch_size=2,
        max_length=MAX_MODEL_LEN,
    )
    assert lm.tokenizer_backend == "remote"
    assert lm._create_payload([[1, 2]], generate=False)["model"] == served["id"]
    assert lm.tokenizer.bos_token_id == reference.tokenizer.bos_token_id == 0
    assert lm.eot_token_id == reference.tokenizer.eos_token_id
    # lm-eval's remote backend picks ``bos_token_id or eos_token_id``: a BOS id of 0 falls through to EOS.
    prefix = lm.prefix_token_id
    assert prefix in (reference.tokenizer.bos_token_id, reference.tokenizer.eos_token_id)

    pairs = [("The teacher says", " hello world"), ("Knowledge", " distils"), ("", "Teachers distil")]
    requests = [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)

    encode = lambda s: reference.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for (context, continuation), (ll, greedy) in zip(pairs, results):
        # lm-eval's split: an empty context becomes the prefix (BOS) token; trailing spaces move over.
        ctx = encode(context) if context else [prefix]
        whole = encode(context + continuation) if context else ctx + encode(continuation)
        cont = whole[len(ctx) :]
        (ref,) = topk(http, [ctx + cont], 1)
        assert ll == pytest.approx(sum(ref["target_logprobs"][len(ctx) - 1 :]), abs=1e-5)
        assert greedy == all(rank == 1 for rank in ref["target_ranks"][len(ctx) - 1 :])
