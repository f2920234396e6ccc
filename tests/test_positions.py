"""Position rules: the entropy computed beside the reduction, the top-F selection, a chat's assistant turns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.scoring import PackedLayout, Scoring
from teacher_farm.server.packed import top_entropy, unpack
from teacher_farm.server.reduce import reduce_rows

V = 512


def test_the_rule_is_part_of_the_scoring_contract():
    assert Scoring().positions == "all" and Scoring().entropy_share is None
    assert Scoring(positions="entropy:.25").positions == "entropy:0.25"
    assert Scoring(positions="entropy:0.25").entropy_share == 0.25
    assert Scoring(positions="entropy:1").layout == PackedLayout(16, 0, entropy=True)
    for bad in ("entropy:0", "entropy:1.5", "entropy:x", "entropy", "some"):
        with pytest.raises(ValueError, match="positions must be"):
            Scoring(positions=bad)
    # Older servers know no such field: a request leaves it out unless it asks for a rule.
    assert "positions" not in Scoring().wire_fields()
    assert Scoring(positions="assistant").wire_fields()["positions"] == "assistant"


def test_entropy_needs_the_pooled_backend():
    class Info:
        k_max, max_samples, scoring = 256, 256, "prompt-logprobs"

    reason, flag = Scoring(positions="entropy:0.5").refusal(Info())
    assert "entropy" in reason and flag == "--scoring pooled"
    assert Scoring(positions="assistant").refusal(Info()) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_worker_entropy_equals_dense_math(temperature):
    logits = np.random.default_rng(1).normal(0, 3, size=(40, V)).astype(np.float32)
    logits[3, 100:] = -np.inf  # a teacher that rules tokens out: 0 log 0 counts as 0
    rows = logits.shape[0]
    packed = reduce_rows(
        torch.from_numpy(logits), torch.zeros(rows, dtype=torch.int64), torch.full((rows,), 1.0 / temperature), 4, 8,
        torch.zeros(rows, dtype=torch.int64), torch.arange(rows), entropy=True,
    ).numpy()
    layout = PackedLayout(4, 8, entropy=True)
    assert packed.shape == (rows, layout.width)
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(lp)
    dense = -(p * np.where(p > 0, lp, 0.0)).sum(axis=1)
    got = unpack(np.concatenate([packed, packed[-1:]]), layout).entropy[:rows]
    np.testing.assert_allclose(got, dense, rtol=2e-5, atol=2e-5)
    # The rest of the row is what the rule-less reduction gives.
    plain = reduce_rows(
        torch.from_numpy(logits), torch.zeros(rows, dtype=torch.int64), torch.full((rows,), 1.0 / temperature), 4, 8,
        torch.zeros(rows, dtype=torch.int64), torch.arange(rows),
    ).numpy()
    np.testing.assert_array_equal(packed[:, layout.columns_of(PackedLayout(4, 8))], plain)


def test_top_entropy_keeps_the_highest_share_earlier_first_among_equals():
    h = np.array([0.5, 2.0, 1.0, 2.0, 0.1, 3.0, 0.0, 1.0])
    assert np.flatnonzero(top_entropy(h, 0.25)).tolist() == [1, 5]  # stable: position 1 before 3
    assert top_entropy(h, 1.0).all() and top_entropy(h, 0.01).sum() == 1  # at least one position
    assert np.flatnonzero(top_entropy(h, 0.5)).tolist() == [1, 2, 3, 5]


def test_assistant_turns_are_found_in_the_tokens(tiny_model):
    from transformers import AutoTokenizer

    from teacher_farm.server.chat import assistant_tokens, next_token_inside

    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three and three?"},
        {"role": "assistant", "content": "Six, of course."},
    ]
    ids, inside = assistant_tokens(tok, chat)
    assert ids == list(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, return_dict=False))
    # The marked tokens decode to the assistant's words and end-of-turn tokens, and nothing else.
    runs = np.split(np.flatnonzero(inside), np.flatnonzero(np.diff(np.flatnonzero(inside)) > 1) + 1)
    texts = [tok.decode([ids[i] for i in run]) for run in runs]
    assert len(texts) == 2 and texts[0].startswith("Four.") and texts[1].startswith("Six, of course.")
    assert all(t.endswith("<|eot_id|>") for t in texts)
    assert not any("user" in t or "assistant" in t for t in texts)
    selected = next_token_inside(inside, len(ids))
    assert selected[:-1].tolist() == inside[1:].tolist() and not selected[-1]


def test_a_template_that_is_not_prefix_consistent_is_refused():
    from teacher_farm.server.chat import assistant_tokens

    class Odd:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in reversed(messages)) + ("|A:" if add_generation_prompt else "")

    with pytest.raises(InputError, match="cannot be found"):
        assistant_tokens(Odd(), [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}])
