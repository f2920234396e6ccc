"""TRL's own teacher client and trainer against ``teacher-farm serve`` on the real teacher.

``trl.generation.vllm_client.VLLMClient.get_sequence_logprobs`` (what ``ServerDistillationTrainer``
and the async distillation worker call) posts vLLM's ``prompt_logprobs`` request to
``/v1/completions`` and parses the answer itself: what it returns must be ``/v1/topk`` at the same
temperature, entry for entry, and the actual tokens' logprobs ``/v1/topk``'s ``target_logprobs``.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.engine

TEXTS = [
    "Knowledge distillation trains a small student to match a large teacher's distribution.",
    "The farm caches the teacher's top-k next-token probabilities once, for many students.",
    "Hello!",
    "A student that sees the teacher's soft targets learns more from each token than one that sees "
    "only the hard labels, which is why distillation works.",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def client(real_server):
    from trl.generation.vllm_client import VLLMClient

    return VLLMClient(base_url=real_server.url, connection_timeout=60)


def topk(url: str, sequences: list[list[int]], k: int, temperature: float) -> list[dict]:
    body = {"k": k, "temperature": temperature, "inputs": [{"token_ids": ids} for ids in sequences]}
    r = httpx.post(url + "/v1/topk", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.mark.parametrize("k, temperature", [(16, 1.0), (64, 2.0)])
def test_trl_client_reads_the_topk_answer(real_server, client, sequences, k, temperature):
    # Prompt length 1: every scored position comes back (position 0 has no distribution).
    got = client.get_sequence_logprobs(
        sequences, [1] * len(sequences), top_logprobs=k, temperature=temperature
    )
    want = topk(real_server.url, sequences, k, temperature)
    for i, (ids, ref) in enumerate(zip(sequences, want)):
        n = len(ids)
        assert len(got["logprobs"][i]) == n - 1
        # Position p is scored by /v1/topk's row p - 1.
        np.testing.assert_array_equal(
            np.asarray(got["logprob_token_ids"][i]), np.asarray(ref["topk_ids"])[:-1]
        )
        np.testing.assert_array_equal(
            np.asarray(got["logprobs"][i], np.float32), np.asarray(ref["topk_logprobs"], np.float32)[:-1]
        )
        # The actual token is in every entry whatever its rank, so TRL's reverse-KL term has it.
        actual = np.asarray(got["actual_logprobs"][i], np.float32)[:, 0]
        np.testing.assert_array_equal(actual, np.asarray(ref["target_logprobs"], np.float32))
        assert np.all(np.isfinite(actual)) and got["actual_token_ids"][i] == [[t] for t in ids[1:]]


def test_the_answer_is_vllms_prompt_logprobs(real_server, sequences, tokenizer):
    """The raw answer, as the async distillation worker reads it: the actual token first, then the top
    K by rank (K + 1 keys where the actual token is outside them), vLLM's keys."""
    k = 8
    body = {"model": "x", "prompt": sequences, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
    answer = httpx.post(real_server.url + "/v1/completions", json=body, timeout=300).json()
    want = topk(real_server.url, sequences, k, 1.0)
    assert answer["usage"]["prompt_tokens"] == sum(map(len, sequences))
    outside = 0
    for ids, choice, ref in zip(sequences, answer["choices"], want):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        assert choice["prompt_token_ids"] is None and choice["token_ids"] is None  # vLLM's, unasked
        for p in range(1, len(ids)):
            top, rank = ref["topk_ids"][p - 1], ref["target_ranks"][p - 1]
            keys = [int(key) for key in entries[p]]
            assert keys[0] == ids[p]
            assert keys[1:] == [t for t in top if t != ids[p]]
            first = entries[p][str(ids[p])]
            assert first["rank"] == (top.index(ids[p]) + 1 if ids[p] in top else rank)
            assert first["decoded_token"] == tokenizer.decode([ids[p]])
            assert [entries[p][str(t)]["rank"] for t in top] == list(range(1, k + 1))
            outside += ids[p] not in top
    assert outside  # the test covers both kinds of position


def test_the_generated_token_is_drawn_at_the_temperature_and_seeded(real_server, sequences, tokenizer):
    body = {
        "model": "x",
        "prompt": sequences,
        "max_tokens": 1,
        "temperature": 1.5,
        "seed": 7,
        "prompt_logprobs": 1,
        "logprobs": 1,
        "return_token_ids": True,
    }
    first = httpx.post(real_server.url + "/v1/completions", json=body, timeout=300).json()
    again = httpx.post(real_server.url + "/v1/completions", json=body, timeout=300).json()
    other = httpx.post(real_server.url + "/v1/completions", json={**body, "seed": 8}, timeout=300).json()
    drawn = [c["token_ids"][0] for c in first["choices"]]
    assert drawn == [c["token_ids"][0] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == len(sequences)
    # Its logprob is the teacher's at T = 1.5 for that token after the prompt.
    ref = topk(real_server.url, [ids + [t] for ids, t in zip(sequences, drawn)], 1, 1.5)
    for ids, choice, r, t in zip(sequences, first["choices"], ref, drawn):
        assert choice["prompt_token_ids"] == ids and choice["text"] == tokenizer.decode([t])
        assert choice["logprobs"]["token_logprobs"] == [pytest.approx(r["target_logprobs"][-1], abs=1e-6)]
    # Seeds differ, draws differ somewhere (four prompts at T = 1.5); greedy is the argmax.
    greedy = httpx.post(
        real_server.url + "/v1/completions", json={**body, "temperature": 0}, timeout=300
    ).json()
    argmax = [r["topk_ids"][-1][0] for r in topk(real_server.url, sequences, 1, 1.0)]
    assert [c["token_ids"][0] for c in greedy["choices"]] == argmax
    assert drawn != [c["token_ids"][0] for c in other["choices"]] or drawn != argmax


@pytest.mark.parametrize(
    "fields, words",
    [({"prompt_logprobs": -1}, "whole vocabulary"), ({"prompt_logprobs": 65}, "k_max=64")],
)
def test_more_logprobs_than_the_server_holds_get_a_clear_422(real_server, fields, words):
    body = {"prompt": [[1, 2, 3]], "max_tokens": 1, "temperature": 1.0, **fields}
    r = httpx.post(real_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 422 and words in r.json()["error"]


def test_server_distillation_trainer_steps(real_server, smollm2, tokenizer, tmp_path):
    """A few optimizer steps of TRL's ServerDistillationTrainer: a tiny random student of the teacher's
    vocabulary, on-policy completions from its own ``generate``, the teacher's top 4 from the server."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    torch.manual_seed(0)
    student = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    )
    args = ServerDistillationConfig(
        output_dir=str(tmp_path),
        teacher_model_server_url=real_server.url,
        beta=0.0,
        loss_top_k=4,
        temperature=1.0,
        max_completion_length=8,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
    )
    data = Dataset.from_dict({"prompt": TEXTS[:2] * 3})
    trainer = ServerDistillationTrainer(
        model=student, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), trainer.state.log_history


@pytest.mark.parametrize("k", [0, 8])
def test_ms_swifts_parse_reads_the_answer(real_server, sequences, k):
    """ms-swift's GKD and OPD-RL read a teacher's ``prompt_logprobs`` as
    ``swift/rlhf_trainers/utils.py`` ``parse_prompt_logprobs`` does (modelscope/ms-swift at 3602360a,
    2026-08-22), after asking for ``prompt_logprobs=K, max_tokens=1, temperature=0``: with K = 0 each
    position's first (only) entry is the actual token; with K > 0 the K entries of highest logprob are
    the top K. (Its transport is swift's own ``/infer/`` protocol of ``swift deploy``/``swift rollout``,
    which this server does not speak; the parse is what a bridge would rely on.)"""
    body = {"model": "x", "prompt": sequences, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
    answer = httpx.post(real_server.url + "/v1/completions", json=body, timeout=300).json()
    want = topk(real_server.url, sequences, max(k, 1), 1.0)
    for ids, choice, ref in zip(sequences, answer["choices"], want):
        for p, entry in enumerate(choice["prompt_logprobs"][1:], start=1):
            if k == 0:
                (token, info), *rest = entry.items()
                assert not rest and int(token) == ids[p]
                assert np.float32(info["logprob"]) == np.float32(ref["target_logprobs"][p - 1])
            else:
                best = sorted(entry.items(), key=lambda item: -item[1]["logprob"])[:k]
                assert [int(t) for t, _ in best] == ref["topk_ids"][p - 1]
