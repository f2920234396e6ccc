"""Position rules: the entropy computed beside the reduction, the top-F selection,
a chat's assistant turns."""

from __future__ import annotations

import json

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
        torch.from_numpy(logits),
        torch.zeros(rows, dtype=torch.int64),
        PackedLayout(4, 8, entropy=True),
        torch.full((rows,), 1.0 / temperature),
        torch.zeros(rows, dtype=torch.int64),
        torch.arange(rows),
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
        torch.from_numpy(logits),
        torch.zeros(rows, dtype=torch.int64),
        PackedLayout(4, 8),
        torch.full((rows,), 1.0 / temperature),
        torch.zeros(rows, dtype=torch.int64),
        torch.arange(rows),
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
    assert ids == list(
        tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, return_dict=False)
    )
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
            return "|".join(m["content"] for m in reversed(messages)) + (
                "|A:" if add_generation_prompt else ""
            )

    with pytest.raises(InputError, match="cannot be found"):
        assistant_tokens(
            Odd(),
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "v"},
                {"role": "assistant", "content": "b"},
            ],
        )


def test_dropped_positions_are_null_lists_and_cost_no_values(tmp_path):
    import pyarrow.parquet as pq

    from teacher_farm.schemas.arrow import ScoredSequence, results_to_table
    from teacher_farm.schemas.positions import kept_mask

    rng = np.random.default_rng(3)

    def seq(n, selected):
        lengths = rng.integers(1, 5, n).astype(np.int32)
        return ScoredSequence(
            "s",
            np.arange(n, dtype=np.int32),
            rng.integers(0, 99, (n, 4)).astype(np.int32),
            rng.normal(size=(n, 4)).astype(np.float32),
            rng.normal(size=n - 1).astype(np.float32),
            np.ones(n - 1, np.int32),
            lengths,
            rng.integers(0, 99, lengths.sum()).astype(np.int32),
            np.ones(lengths.sum(), np.int16),
            rng.normal(size=lengths.sum()).astype(np.float32),
            selected=selected,
        )

    a, b, c = seq(6, np.array([1, 0, 0, 1, 0, 1], bool)), seq(3, None), seq(4, np.zeros(4, bool))
    full = results_to_table([a, b, c], 4, "both")
    kept = kept_mask(full.column("topk_ids"))
    assert kept.tolist() == [1, 0, 0, 1, 0, 1] + [1, 1, 1] + [0, 0, 0, 0]
    for name in ("sample_ids", "sample_counts", "sample_logprobs", "topk_logprobs"):
        assert kept_mask(full.column(name)).tolist() == kept.tolist()
    rows = full.to_pylist()
    assert rows[0]["topk_ids"][0] == a.topk_ids[0].tolist() and rows[0]["topk_ids"][1] is None
    assert rows[0]["target_logprobs"] == pytest.approx(a.target_logprobs.tolist())  # kept at every position
    assert rows[1]["topk_ids"] == b.topk_ids.tolist()
    # Parquet stores no value for a dropped position.
    dense = results_to_table([seq(400, None)], 4, "both")
    thin = results_to_table([seq(400, np.arange(400) % 4 == 0)], 4, "both")
    pq.write_table(dense, tmp_path / "dense.parquet")
    pq.write_table(thin, tmp_path / "thin.parquet")

    def target_bytes(path):
        meta = pq.ParquetFile(path).metadata.row_group(0)
        return sum(
            meta.column(i).total_compressed_size
            for i in range(meta.num_columns)
            if meta.column(i).path_in_schema.split(".")[0]
            in ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts", "sample_logprobs")
        )

    # A quarter of the positions kept: about a quarter of the target bytes (the nulls cost a bit each).
    assert target_bytes(tmp_path / "thin.parquet") < 0.35 * target_bytes(tmp_path / "dense.parquet")


@pytest.mark.engine
def test_a_cache_keeps_targets_at_the_highest_entropy_positions_of_each_line(server, reference, tmp_path):
    import pyarrow.parquet as pq

    from teacher_farm.schemas.cache_dir import read_metadata
    from teacher_farm.schemas.positions import kept_mask
    from tests.conftest import API_KEY, SAMPLE, read_lines, teacher_farm

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(read_lines(SAMPLE, 10)) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    args = (
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "4",
        "--targets",
        "both",
        "--samples",
        "8",
        "--temperature",
        "0.8",
        "--positions",
        "entropy:0.25",
    )
    proc = teacher_farm(*args)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert read_metadata(table.schema)["positions"] == "entropy:0.25"
    kept = kept_mask(table.column("topk_ids"))
    assert (kept_mask(table.column("sample_ids")) == kept).all()
    start = 0
    for row in table.to_pylist():
        ids = row["input_ids"]
        n = len(ids)
        mine = kept[start : start + n]
        start += n
        assert mine.sum() == int(np.ceil(0.25 * n - 1e-9))
        assert len(row["target_logprobs"]) == n - 1  # the target logprob stays at every position
        _, _, full = reference.topk(ids, 1, 0.8)
        p = np.exp(full.astype(np.float64))
        h = -(p * np.where(p > 0, full, 0.0)).sum(axis=1)
        # The kept positions are the reference's top quarter, but for entropies within float error of the cut.
        cut = np.sort(h)[::-1][mine.sum() - 1]
        clear = np.abs(h - cut) > 1e-3
        assert (mine[clear] == (h[clear] > cut)).all()
        for pos in np.flatnonzero(mine):
            assert row["topk_ids"][pos] is not None and len(row["topk_ids"][pos]) == 4
        assert all(row["topk_ids"][pos] is None for pos in np.flatnonzero(~mine))
    # verify re-scores under the same rule: the same positions, the same values, the same draws.
    check = teacher_farm("verify", str(out), "--server", server.url, "--api-key", API_KEY, "--sample", "6")
    assert check.returncode == 0 and "status:     OK" in check.stdout, check.stdout + check.stderr
    # The rule is part of the cache's identity: another rule into the same directory is refused.
    other = teacher_farm(*args[:-1], "entropy:0.5")
    assert other.returncode != 0 and "positions" in other.stderr


@pytest.mark.engine
def test_a_chat_keeps_targets_where_the_next_token_is_the_assistants(server, reference, tmp_path):
    import pyarrow.parquet as pq

    from teacher_farm.schemas.positions import kept_mask
    from tests.conftest import API_KEY, teacher_farm

    chat = [
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "the lazy dog"},
        {"role": "assistant", "content": "and sleeps"},
    ]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        json.dumps({"id": "c", "messages": chat})
        + "\n"
        + json.dumps({"id": "t", "text": "plain text"})
        + "\n"
    )
    out = tmp_path / "o"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "4",
        "--positions",
        "assistant",
    )
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    rows = {r["id"]: r for r in table.to_pylist()}
    kept = kept_mask(table.column("topk_ids"))
    n_chat = len(rows["c"]["input_ids"])
    chat_kept = kept[:n_chat] if table.column("id")[0].as_py() == "c" else kept[-n_chat:]
    next_tokens = [rows["c"]["input_ids"][i + 1] for i in np.flatnonzero(chat_kept)]
    text = reference.tokenizer.decode(next_tokens)
    assert "jumps over" in text and "and sleeps" in text and "fox" not in text and "lazy" not in text
    assert rows["t"]["topk_ids"][0] is not None and all(
        x is not None for x in rows["t"]["topk_ids"]
    )  # not a chat


def test_the_losses_average_over_the_kept_positions_only():
    from teacher_farm.training import TopkTailKLLoss, collate_topk

    rng = np.random.default_rng(5)
    n, k, V = 6, 3, 11

    def item(kept):
        lp = torch.log_softmax(torch.tensor(rng.normal(size=(n, V)), dtype=torch.float32), -1)
        top = lp.topk(k, -1)
        out = {
            "input_ids": torch.arange(n),
            "topk_ids": top.indices,
            "topk_logprobs": top.values,
            "tail_logprob": torch.log1p(-top.values.exp().sum(-1)),
            "target_logprobs": torch.zeros(n - 1),
        }
        return out | ({"kept": torch.tensor(kept)} if kept is not None else {})

    kept = [True, False, True, False, False, True]
    batch = collate_topk([item(kept), item(None)])
    assert batch["kept_mask"].tolist() == [kept, [True] * n]
    logits = torch.tensor(rng.normal(size=(2, n, V)), dtype=torch.float32)
    loss = TopkTailKLLoss()
    per = loss.per_token(logits, batch, 1.0)
    want = (per[0][torch.tensor(kept)].sum() + per[1].sum()) / (sum(kept) + n)
    assert loss(logits, batch).item() == pytest.approx(want.item(), rel=1e-6)
    # Without the mask the dropped positions (zeros in the batch) would count.
    unmasked = {key: v for key, v in batch.items() if key != "kept_mask"}
    assert loss(logits, unmasked).item() != pytest.approx(want.item(), rel=1e-3)


def test_assistant_positions_and_windows_are_refused_together(tmp_path):
    from teacher_farm.client.cache import CacheOptions, CacheRun

    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="--long-lines truncate"):
        CacheRun(
            CacheOptions(
                input=str(tmp_path / "x.jsonl"),
                out_dir=tmp_path / "o",
                long_lines="window",
                scoring=Scoring(positions="assistant"),
            ),
            teacher=None,
        )


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8-gap"])
@pytest.mark.parametrize("targets", ["topk", "both", "sampled"])
def test_every_format_stores_only_the_kept_positions_and_reads_them_back(tmp_path, fmt, targets):
    import pyarrow.parquet as pq

    from teacher_farm.schemas.arrow import (
        ScoredSequence,
        cache_schema,
        cast_logprobs,
        encode_rows,
        results_to_table,
        with_source_columns,
    )
    from teacher_farm.schemas.formats import FORMATS
    from teacher_farm.training.reader import row_group_arrays

    rng = np.random.default_rng(7)
    k = 4

    def seq(n, selected):
        lp = np.sort(rng.normal(-3, 2, size=(n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        lengths = rng.integers(1, 5, n).astype(np.int32)
        ids = np.concatenate([np.sort(rng.choice(300, m, replace=False)) for m in lengths]).astype(np.int32)
        return ScoredSequence(
            None,
            rng.integers(0, 300, n).astype(np.int32),
            rng.integers(0, 300, (n, k)).astype(np.int32),
            lp,
            rng.normal(-2, 1, n - 1).astype(np.float32),
            np.ones(n - 1, np.int32),
            lengths,
            ids,
            np.concatenate(
                [
                    np.diff([0, *np.sort(rng.choice(np.arange(1, 8), m - 1, replace=False)), 8])
                    for m in lengths
                ]
            ).astype(np.int16),  # positive counts summing to the 8 draws
            rng.normal(-2, 1, lengths.sum()).astype(np.float32),
            selected=selected,
        )

    seqs = [seq(9, np.arange(9) % 3 == 0), seq(5, np.zeros(5, bool)), seq(7, np.arange(7) % 2 == 1)]
    kept = np.concatenate([s.selected for s in seqs])
    table = with_source_columns(results_to_table(seqs, k, targets), [0, 1, 2], ["a.jsonl"] * 3)
    wire = "float32" if fmt != "float16" else "float16"
    schema = cache_schema(fmt, targets, k=k, samples=8, sample_logprobs=True)
    pq.write_table(encode_rows(cast_logprobs(table, wire), schema), tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    a = row_group_arrays(back)
    assert a.kept.tolist() == kept.tolist()
    if targets != "sampled":
        want_ids = np.concatenate([s.topk_ids for s in seqs])
        want_lp = FORMATS[fmt].round_trip(np.concatenate([s.topk_logprobs for s in seqs]))
        np.testing.assert_array_equal(a.topk_ids[kept], want_ids[kept])
        np.testing.assert_allclose(a.topk_logprobs[kept], want_lp[kept], atol=1e-6)
        assert (a.topk_ids[~kept] == 0).all()
    if targets != "topk":
        lengths = np.concatenate([s.sample_lengths for s in seqs])
        assert a.sample_lengths.tolist() == np.where(kept, lengths, 0).tolist()
    # Targets stay at every position.
    assert len(a.target_logprobs) == sum(len(s.input_ids) - 1 for s in seqs)
    # The report counts the kept positions only (every token towards its source).
    from teacher_farm.client.report import CacheStats

    stats = CacheStats(k=k, samples=8)
    stats.add(back)
    assert stats.tokens == len(kept)
    if targets != "sampled":
        assert stats.topk_positions == kept.sum() and stats.mass_hist.sum() == kept.sum()
    if targets != "topk":
        assert stats.distinct_counts.sum() == kept.sum()
