"""vLLM's ``prompt_logprobs`` answer built from arrays (``server/prompt_logprobs.py``), and the
completions options it goes with: no engine, no server (well under a second)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import InputError
from teacher_farm.server.openai_compat import CompletionRequest, check_completion, completion_scoring
from teacher_farm.server.prompt_logprobs import TokenTable, prompt_logprobs_json


class Tokenizer:
    """Decodes id i as "t<i>" (id 3 as nothing), and 10 then 11 as the two bytes of "é" (each alone
    half a character); no backend, so no space marker."""

    def decode(self, ids, skip_special_tokens=False):
        text = "".join({3: "", 10: "\x01", 11: "\x02"}.get(i, f"t{i}") for i in ids)
        return text.replace("\x01\x02", "é").replace("\x01", "\ufffd").replace("\x02", "\ufffd")

    def batch_decode(self, ids, skip_special_tokens=False):
        return [self.decode(x) for x in ids]


def sequence(input_ids, topk_ids, topk_lps, target_lps, target_ranks) -> ScoredSequence:
    return ScoredSequence(
        id=None,
        input_ids=np.asarray(input_ids, np.int32),
        topk_ids=np.asarray(topk_ids, np.int32),
        topk_logprobs=np.asarray(topk_lps, np.float32),
        target_logprobs=np.asarray(target_lps, np.float32),
        target_ranks=np.asarray(target_ranks, np.int32),
        selected=None,
    )


def test_actual_token_first_then_the_top_k_as_vllm_builds_its_dicts():
    # Row 0 predicts token 7 (outside the top 2); row 1 predicts 3, the second most likely; row 2 is
    # the last position (no prompt token to score: it is not in prompt_logprobs).
    s = sequence(
        [1, 7, 3],
        [[4, 5, 6], [2, 3, 6], [0, 1, 2]],
        [[-0.5, -1.5, -2.0], [-0.25, -0.75, -np.inf], [-1, -2, -3]],
        [-np.inf, -0.75],
        [9, 2],
    )
    got = orjson.loads(prompt_logprobs_json(s, 2, TokenTable(Tokenizer(), 8)))
    assert got[0] is None and len(got) == 3
    assert list(got[1].items()) == [
        ("7", {"logprob": -9999.0, "rank": 9, "decoded_token": "t7"}),
        ("4", {"logprob": -0.5, "rank": 1, "decoded_token": "t4"}),
        ("5", {"logprob": -1.5, "rank": 2, "decoded_token": "t5"}),
    ]
    # The actual token among the top k keeps the first place, with the top-k entry's rank.
    assert list(got[2].items()) == [
        ("3", {"logprob": -0.75, "rank": 2, "decoded_token": ""}),
        ("2", {"logprob": -0.25, "rank": 1, "decoded_token": "t2"}),
    ]
    # prompt_logprobs=0: the actual token alone.
    only = orjson.loads(prompt_logprobs_json(s, 0, TokenTable(Tokenizer(), 8)))
    assert [list(d) for d in only[1:]] == [["7"], ["3"]]


def test_a_one_token_prompt_has_only_the_null_entry():
    s = sequence([5], [[1, 2]], [[-0.1, -3.0]], [], [])
    assert prompt_logprobs_json(s, 2, TokenTable(Tokenizer(), 8)) == b"[null]"


def test_long_prompts_are_joined_in_blocks(monkeypatch):
    import teacher_farm.server.prompt_logprobs as module

    rng = np.random.default_rng(0)
    n, k = 50, 3
    ids = rng.integers(0, 20, n)
    top = np.stack([rng.permutation(20)[:k] for _ in range(n)])
    lps = -np.sort(rng.random((n, k)), axis=1)
    s = sequence(ids, top, lps, rng.random(n - 1) * -5, rng.integers(1, 20, n - 1))
    table = TokenTable(Tokenizer(), 20)
    whole = prompt_logprobs_json(s, k, table)
    monkeypatch.setattr(module, "BLOCK_ENTRIES", 7)
    assert prompt_logprobs_json(s, k, table) == whole
    assert len(orjson.loads(whole)) == n


def request(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": [[1, 2, 3]], **fields})


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"prompt_logprobs": -1, "max_tokens": 1}, "prompt_logprobs=64 or less"),
        ({"prompt_logprobs": 65, "max_tokens": 1}, "over this server's k_max=64"),
        ({"prompt_logprobs": -2, "max_tokens": 1}, "must be 0 or more"),
        ({"prompt_logprobs": 4, "max_tokens": 1, "temperature": 0.001}, "send 0 (greedy)"),
        ({"prompt_logprobs": 4, "max_tokens": 1, "temperature": -1}, "send 0 (greedy)"),
        ({"prompt_logprobs": 4, "max_tokens": 2}, "max_tokens=0 or 1"),
    ],
)
def test_what_cannot_be_answered_is_refused_clearly(fields, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_completion(request(**fields), k_max=64)


def test_prompt_logprobs_alone_is_something_to_answer():
    check_completion(request(prompt_logprobs=4, max_tokens=0), k_max=64)
    check_completion(request(prompt_logprobs=0, max_tokens=1, temperature=2.0), k_max=64)
    # An explicit null reads as vLLM's default (16): more than this server generates.
    with pytest.raises(InputError, match="max_tokens is not set"):
        check_completion(request(prompt_logprobs=4, max_tokens=None), k_max=64)


def test_scoring_of_a_completion():
    # TRL's request: the top K at T, one token drawn at T at the last position, seeded.
    s = completion_scoring(request(prompt_logprobs=16, max_tokens=1, temperature=2.0, seed=2**40 + 5))
    assert (s.k, s.temperature, s.targets, s.samples, s.seed) == (16, 2.0, "both", 1, 5)
    # Greedy: logprobs at T = 1 (vLLM's), the argmax generated, nothing drawn.
    s = completion_scoring(request(prompt_logprobs=4, logprobs=8, max_tokens=1, temperature=0))
    assert (s.k, s.temperature, s.targets) == (8, 1.0, "topk")
    # Unset temperature: vLLM's default 1, drawn.
    assert completion_scoring(request(prompt_logprobs=4, max_tokens=1)).targets == "both"
    assert completion_scoring(request(prompt_logprobs=4, max_tokens=0, temperature=0.5)).targets == "topk"


def test_half_characters_are_mended_with_the_prompt_before_them():
    # vLLM's output processor mends a token that decodes to half a character with up to four prompt
    # tokens before it: 11 after 10 reads "é"; 10 with nothing to complete it reads "".
    s = sequence(
        [1, 10, 11, 2], [[11, 2], [11, 10], [10, 11], [0, 1]], [[-1, -2]] * 4, [-1, -1, -3], [1, 2, 9]
    )
    got = orjson.loads(prompt_logprobs_json(s, 2, TokenTable(Tokenizer(), 12)))
    assert {key: e["decoded_token"] for key, e in got[1].items()} == {"10": "", "11": "", "2": "t2"}
    assert {key: e["decoded_token"] for key, e in got[2].items()} == {"11": "é", "10": ""}
    # After 10 11 (a whole character) nothing completes a lone 10 or 11.
    assert {key: e["decoded_token"] for key, e in got[3].items()} == {"2": "t2", "10": "", "11": ""}


def test_ids_beyond_the_tokenizer_decode_to_nothing():
    # A model's vocabulary padded beyond its tokenizer's (Qwen's 151,936 over 151,665 tokens).
    class Short(Tokenizer):
        def __len__(self):
            return 6

        def batch_decode(self, ids, skip_special_tokens=False):
            assert max(i for (i,) in ids) < 6
            return super().batch_decode(ids)

    s = sequence([1, 7], [[7, 2], [0, 1]], [[-0.5, -1.0], [-1, -2]], [-0.5], [1])
    got = orjson.loads(prompt_logprobs_json(s, 2, TokenTable(Short(), 8)))
    assert {key: e["decoded_token"] for key, e in got[1].items()} == {"7": "", "2": "t2"}
