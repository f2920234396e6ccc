"""The training reader: a hand-built cache streamed back exactly, padded, and turned into a KD loss."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from teacher_farm.client.manifest import save_manifest  # noqa: E402
from teacher_farm.schemas.arrow import ScoredSequence, results_to_table  # noqa: E402
from teacher_farm.schemas.cache_dir import Manifest, RunIdentity  # noqa: E402
from teacher_farm.schemas.errors import CacheMismatch, InputError  # noqa: E402
from teacher_farm.schemas.fingerprints import tokenizer_fingerprint  # noqa: E402
from teacher_farm.training import (  # noqa: E402
    TAIL_FLOOR,
    TopkDataset,
    assert_same_tokenizer,
    cache_metadata_of,
    check_alignment,
    collate_topk,
    kd_loss,
    shard_paths,
)
from tests.helpers import (  # noqa: E402
    SHARDS,
    UNEVEN,
    VOCAB,
    Cache,
    FakeTokenizer,
    K,
    items,
    true_tail,
    write_cache,
    write_window_cache,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    return write_cache(tmp_path_factory.mktemp("cache"), SHARDS)


# ------------------------------------------------------------------------------------ shard_paths


def test_shard_paths_are_the_manifests_shards_in_line_order(cache, tmp_path):
    assert [p.name for p in shard_paths(cache.path)] == [f"part-{j:06d}.parquet" for j in (0, 1, 2)]
    # Files the manifest does not name (unfinished, stray) are not part of the cache.
    copy = tmp_path / "c"
    shutil.copytree(cache.path, copy)
    shutil.copy(copy / "part-000000.parquet", copy / "part-000009.parquet")
    (copy / ".part-000003.parquet.tmp").write_bytes(b"partial")
    assert [p.name for p in shard_paths(copy)] == [f"part-{j:06d}.parquet" for j in (0, 1, 2)]


def test_shard_paths_union_split_manifests(tmp_path):
    write_cache(
        tmp_path,
        SHARDS,
        manifests={"manifest-00000-of-00002.json": [0, 2], "manifest-00001-of-00002.json": [1]},
    )
    assert [p.name for p in shard_paths(tmp_path)] == [f"part-{j:06d}.parquet" for j in (0, 1, 2)]


def test_shard_paths_refuse_a_directory_without_manifest_or_with_a_missing_shard(tmp_path, cache):
    with pytest.raises(InputError, match="no manifest"):
        shard_paths(tmp_path)
    copy = tmp_path / "c"
    shutil.copytree(cache.path, copy)
    (copy / "part-000001.parquet").unlink()
    with pytest.raises(InputError, match="missing"):
        shard_paths(copy)


def test_shard_paths_refuse_manifests_of_different_teachers(tmp_path):
    write_cache(tmp_path, {0: [3]}, manifests={"manifest-a.json": [0]})
    other = Manifest.model_validate_json((tmp_path / "manifest-a.json").read_bytes())
    other.identity = RunIdentity.from_entries(
        {**other.identity.entries(), "tokenizer_fingerprint": "someone-else"}
    )
    other.shards = {}
    save_manifest(other, tmp_path, "manifest-b.json")
    with pytest.raises(InputError, match="tokenizer_fingerprint"):
        shard_paths(tmp_path)


# ------------------------------------------------------------------------------------ the dataset


def test_dataset_yields_every_row_once_with_exact_values(cache):
    ds = TopkDataset(cache.path)
    assert ds.num_rows == len(cache.rows)
    assert len(ds.units) > len(SHARDS)  # several row groups per shard
    got = items(ds)
    assert sorted(got) == sorted(cache.rows)
    assert list(got) == sorted(got)  # unshuffled: line order
    for line, item in got.items():
        seq, n = cache.rows[line], len(cache.rows[line].input_ids)
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (n,)
        assert item["topk_ids"].dtype == torch.long and item["topk_ids"].shape == (n, K)
        assert item["topk_logprobs"].dtype == torch.float32 and item["topk_logprobs"].shape == (n, K)
        assert item["tail_logprob"].dtype == torch.float32 and item["tail_logprob"].shape == (n,)
        assert item["target_logprobs"].dtype == torch.float32 and item["target_logprobs"].shape == (n - 1,)
        np.testing.assert_array_equal(item["input_ids"].numpy(), seq.input_ids)
        np.testing.assert_array_equal(item["topk_ids"].numpy(), seq.topk_ids)
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), seq.topk_logprobs)
        np.testing.assert_array_equal(item["target_logprobs"].numpy(), seq.target_logprobs)


def test_hugging_face_datasets_reads_the_same_rows(cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in shard_paths(cache.path)],
        split="train",
        cache_dir=str(tmp_path),
    )
    assert ds.num_rows == len(cache.rows)
    for row in ds:
        seq = cache.rows[row["line"]]
        assert row["input_ids"] == seq.input_ids.tolist() and row["topk_ids"] == seq.topk_ids.tolist()
        np.testing.assert_array_equal(np.array(row["topk_logprobs"], np.float32), seq.topk_logprobs)


def test_tail_logprob_is_the_log_of_the_mass_outside_the_topk(cache):
    for line, item in items(TopkDataset(cache.path)).items():
        want = true_tail(cache.full[line], cache.rows[line].topk_ids)
        assert (want > np.log(0.05)).all()  # a real tail, not the floor
        np.testing.assert_allclose(item["tail_logprob"].numpy(), want, atol=2e-5)


def test_renormalize_gives_a_distribution_over_the_topk(cache):
    raw = items(TopkDataset(cache.path))
    for line, item in items(TopkDataset(cache.path, renormalize=True)).items():
        lp = item["topk_logprobs"]
        torch.testing.assert_close(
            lp.double().exp().sum(-1), torch.ones(lp.shape[0], dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            lp, torch.log_softmax(raw[line]["topk_logprobs"], dim=-1), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(item["tail_logprob"], raw[line]["tail_logprob"])
        torch.testing.assert_close(item["topk_ids"], raw[line]["topk_ids"])


def test_max_length_truncates_every_array(cache):
    for line, item in items(TopkDataset(cache.path, max_length=4)).items():
        seq = cache.rows[line]
        n = min(len(seq.input_ids), 4)
        np.testing.assert_array_equal(item["input_ids"].numpy(), seq.input_ids[:n])
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), seq.topk_logprobs[:n])
        np.testing.assert_array_equal(item["target_logprobs"].numpy(), seq.target_logprobs[: n - 1])
        assert item["tail_logprob"].shape == (n,)


def test_two_dataloader_workers_read_every_row_exactly_once(cache):
    from torch.utils.data import DataLoader

    lines = []
    loader = DataLoader(TopkDataset(cache.path), batch_size=3, num_workers=2, collate_fn=collate_topk)
    for batch in loader:
        lines += batch["line"].tolist()
    assert sorted(lines) == sorted(cache.rows)


def test_ranks_and_shuffle_split_the_rows_without_overlap(cache):
    per_rank = [
        items(TopkDataset(cache.path, rank=r, world_size=2, shuffle_shards=True, seed=3)) for r in (0, 1)
    ]
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted([*per_rank[0], *per_rank[1]]) == sorted(cache.rows)
    ds = TopkDataset(cache.path, shuffle_shards=True, seed=3)
    orders = []
    for epoch in (0, 0, 1):
        ds.set_epoch(epoch)
        orders.append([int(x["line"]) for x in ds])
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(orders[2]) == sorted(cache.rows)
    assert orders[0] != sorted(orders[0]) or orders[2] != sorted(orders[2])


#: Row groups of 3, 3, 1 and 3, 1 rows: 11 rows, which no world of 2, 3 or 4 ranks divides.


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_yields_as_many_rows_padded_by_default_or_dropped(tmp_path, world):
    cache = write_cache(tmp_path, UNEVEN)
    n = len(cache.rows)
    for drop_last in (False, True):
        datasets = [
            TopkDataset(tmp_path, rank=r, world_size=world, shuffle_shards=True, seed=1, drop_last=drop_last)
            for r in range(world)
        ]
        per_rank = -(-n // world) if not drop_last else n // world
        assert [ds.sequences_per_rank() for ds in datasets] == [per_rank] * world
        seen_epochs = []
        for epoch in (0, 1):
            for ds in datasets:
                ds.set_epoch(epoch)
            got = [[int(x["line"]) for x in ds] for ds in datasets]
            assert [len(g) for g in got] == [per_rank] * world
            every = [line for g in got for line in g]
            if drop_last:  # each row at most once; fewer than `world` rows left out
                assert len(set(every)) == len(every) and n - len(every) < world
            else:  # every row, and fewer than `world` of them a second time
                assert set(every) == set(cache.rows) and len(every) - n < world
            seen_epochs.append(every)
        assert seen_epochs[0] != seen_epochs[1]  # a new order each epoch


def test_a_cache_of_one_row_group_feeds_every_rank(tmp_path):
    """The demo's cache shape (one shard, one row group): no rank may get nothing."""
    cache = write_cache(tmp_path, {0: [6, 3, 5]})
    assert len(TopkDataset(tmp_path).units) == 1
    got = [[int(x["line"]) for x in TopkDataset(tmp_path, rank=r, world_size=2)] for r in (0, 1)]
    assert got == [[0, 1], [2, 0]]  # 3 rows for 2 ranks: the third row's rank repeats the first
    got = [
        [int(x["line"]) for x in TopkDataset(tmp_path, rank=r, world_size=2, drop_last=True)] for r in (0, 1)
    ]
    assert got == [[0], [1]] and sorted(cache.rows) == [0, 1, 2]


def test_workers_of_each_rank_split_its_share(tmp_path):
    from torch.utils.data import DataLoader

    write_cache(tmp_path, UNEVEN)
    per_rank = []
    for r in (0, 1):
        ds = TopkDataset(tmp_path, rank=r, world_size=2)
        batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_topk))
        per_rank.append(([line for b in batches for line in b["line"].tolist()], len(batches)))
    # 11 rows, padded to 6 a rank, 3 a worker: batches of 2 and 1 from each worker.
    assert [steps for _, steps in per_rank] == [4, 4]
    assert sorted(per_rank[0][0]) == [0, 1, 2, 3, 4, 5]
    assert sorted(per_rank[1][0]) == [0, 6, 8, 9, 10, 11]


def test_joined_windows_split_by_whole_lines_over_ranks(tmp_path):
    lines = write_window_cache(tmp_path / "windows", [30, 4, 17, 9, 40, 3, 12, 25, 6])  # 9 lines, 19 windows
    assert TopkDataset(tmp_path / "windows").num_rows > len(lines)
    for drop_last in (False, True):
        got = []
        for r in (0, 1):
            ds = TopkDataset(
                tmp_path / "windows",
                join_windows=True,
                rank=r,
                world_size=2,
                drop_last=drop_last,
                shuffle_shards=True,
                seed=2,
            )
            items_r = list(ds)
            assert len(items_r) == ds.sequences_per_rank() == (4 if drop_last else 5)
            for item in items_r:  # every line whole: all of its windows were read by this rank
                assert item["input_ids"].tolist() == lines[int(item["line"])]
            got.append([int(x["line"]) for x in items_r])
        every = got[0] + got[1]
        if drop_last:
            assert len(set(every)) == 8
        else:
            assert set(every) == set(lines) and len(every) == 10


def test_dataset_survives_pickling_for_spawned_workers(cache):
    ds = pickle.loads(pickle.dumps(TopkDataset(cache.path, renormalize=True)))
    assert type(ds) is TopkDataset and ds.renormalize
    assert sorted(items(ds)) == sorted(cache.rows)


def test_float16_shards_read_back_as_float32(tmp_path):
    cache = write_cache(tmp_path, {0: [4, 6], 1: [3]}, dtype="float16")
    assert cache_metadata_of(tmp_path)["logprob_dtype"] == "float16"
    for line, item in items(TopkDataset(tmp_path)).items():
        seq = cache.rows[line]
        assert (
            item["topk_logprobs"].dtype
            == item["target_logprobs"].dtype
            == item["tail_logprob"].dtype
            == torch.float32
        )
        np.testing.assert_array_equal(
            item["topk_logprobs"].numpy(), seq.topk_logprobs.astype(np.float16).astype(np.float32)
        )
        np.testing.assert_array_equal(
            item["target_logprobs"].numpy(), seq.target_logprobs.astype(np.float16).astype(np.float32)
        )
        np.testing.assert_allclose(
            item["tail_logprob"].numpy(), true_tail(cache.full[line], seq.topk_ids), atol=5e-3
        )


# ------------------------------------------------------------------------------------ collate


def test_collate_pads_and_masks(cache):
    got = items(TopkDataset(cache.path))
    seqs = [got[line] for line in (0, 1, 2)]  # 5, 2 and 7 tokens
    lengths = [len(s["input_ids"]) for s in seqs]
    batch = collate_topk(seqs, pad_id=-7)
    T = max(lengths)
    assert batch["input_ids"].shape == (3, T) and batch["topk_ids"].shape == (3, T, K)
    assert batch["lengths"].tolist() == lengths and batch["line"].tolist() == [0, 1, 2]
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert batch["target_mask"][b].tolist() == [True] * (n - 1) + [False] * (T - n + 1)
        assert batch["input_ids"][b].tolist() == s["input_ids"].tolist() + [-7] * (T - n)
        assert batch["labels"][b].tolist() == s["input_ids"].tolist() + [-100] * (T - n)
        torch.testing.assert_close(batch["topk_logprobs"][b, :n], s["topk_logprobs"])
        torch.testing.assert_close(batch["topk_ids"][b, :n], s["topk_ids"])
        torch.testing.assert_close(batch["tail_logprob"][b, :n], s["tail_logprob"])
        torch.testing.assert_close(batch["target_logprobs"][b, : n - 1], s["target_logprobs"])
        assert (batch["target_logprobs"][b, n - 1 :] == 0).all()
        assert (
            torch.isfinite(batch["topk_logprobs"][b]).all() and torch.isfinite(batch["tail_logprob"][b]).all()
        )
    assert collate_topk(seqs, pad_to_multiple_of=8)["input_ids"].shape == (3, 8)


# ------------------------------------------------------------------------------------ kd_loss


def teacher_logits(cache: Cache, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's full log-softmax at every position of the batch (zeros on padding)."""
    B, T = batch["input_ids"].shape
    out = torch.zeros(B, T, VOCAB)
    for b, (line, n) in enumerate(zip(batch["line"].tolist(), batch["lengths"].tolist())):
        out[b, :n] = torch.from_numpy(cache.full[line])
    return out


@pytest.fixture(scope="module")
def batch(cache) -> dict[str, torch.Tensor]:
    got = items(TopkDataset(cache.path))
    return collate_topk([got[line] for line in sorted(got)])


@pytest.mark.parametrize("tail", [True, False])
def test_kd_loss_is_zero_for_the_teacher_itself(cache, batch, tail):
    logits = teacher_logits(cache, batch) + 3.0  # a shift of the logits is the same distribution
    assert abs(kd_loss(logits, batch, tail=tail).item()) < 1e-5
    assert abs(kd_loss(logits, batch, temperature=1.0, tail=tail).item()) < 1e-5


def test_kd_loss_refuses_a_temperature_other_than_the_caches(batch):
    assert batch["temperature"].tolist() == [1.0] * len(batch["lengths"])
    with pytest.raises(ValueError, match="cached at temperature 1 and the loss asks for 2"):
        kd_loss(torch.zeros(*batch["input_ids"].shape, VOCAB), batch, temperature=2.0)


def test_kd_loss_ignores_padding_and_is_zero_on_renormalized_rows(cache, batch):
    logits = teacher_logits(cache, batch)
    logits[batch["attention_mask"] == 0] = torch.randn(int((batch["attention_mask"] == 0).sum()), VOCAB) * 50
    assert abs(kd_loss(logits, batch).item()) < 1e-5
    got = items(TopkDataset(cache.path, renormalize=True))
    renorm = collate_topk([got[line] for line in sorted(got)])
    assert abs(kd_loss(teacher_logits(cache, renorm), renorm).item()) < 1e-5


def test_kd_loss_is_the_bucket_kl_and_its_gradient_flows(cache, batch):
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    loss = kd_loss(logits, batch)
    assert loss.item() > 0.1
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    mask = batch["attention_mask"].bool()
    assert logits.grad[mask].abs().sum() > 0 and (logits.grad[~mask] == 0).all()
    # The same number by brute force over the k + 1 buckets, in float64 from the full distributions.
    total, count = 0.0, 0
    q_all = torch.log_softmax(logits.detach().double(), dim=-1)
    for b, (line, n) in enumerate(zip(batch["line"].tolist(), batch["lengths"].tolist())):
        p_full, ids = cache.full[line].astype(np.float64), cache.rows[line].topk_ids.astype(np.int64)
        q_full = q_all[b, :n].numpy()
        p_top, q_top = np.take_along_axis(p_full, ids, 1), np.take_along_axis(q_full, ids, 1)
        p_tail = true_tail(p_full, ids)
        q = np.exp(q_full)
        np.put_along_axis(q, ids, 0.0, axis=1)
        q_tail = np.log(q.sum(1))
        total += (np.exp(p_top) * (p_top - q_top)).sum() + (np.exp(p_tail) * (p_tail - q_tail)).sum()
        count += n
    assert loss.item() == pytest.approx(total / count, rel=1e-4)
    assert kd_loss(logits.detach(), batch, tail=False).item() > 0


def test_kd_loss_stays_finite_when_the_teacher_rules_a_token_out(batch):
    ruled_out = {**batch, "topk_logprobs": batch["topk_logprobs"].clone()}
    ruled_out["topk_logprobs"][:, :, -1] = float("-inf")
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    loss = kd_loss(logits, ruled_out)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_kd_loss_refuses_logits_that_do_not_cover_the_batch(batch):
    with pytest.raises(ValueError, match="positions"):
        kd_loss(torch.zeros(1, 3, VOCAB), batch)


# ------------------------------------------------------------------------------------ tokenizer


def test_assert_same_tokenizer(cache):
    assert assert_same_tokenizer(cache.path, FakeTokenizer()) == tokenizer_fingerprint(FakeTokenizer())
    with pytest.raises(CacheMismatch, match="same tokenizer"):
        assert_same_tokenizer(cache.path, FakeTokenizer(vocab=VOCAB + 1))
    with pytest.raises(CacheMismatch):
        assert_same_tokenizer(cache.path, FakeTokenizer(bos=3))


def test_check_alignment(cache):
    ids = cache.rows[0].input_ids
    check_alignment(list(ids), torch.from_numpy(ids.astype(np.int64)))
    check_alignment([*ids, 4], ids, allow_truncation=True)
    with pytest.raises(InputError, match="token 1 differs"):
        check_alignment([ids[0], (ids[1] + 1) % VOCAB, *ids[2:]], ids)
    with pytest.raises(InputError, match="tokens"):
        check_alignment([*ids, 4], ids)


# ------------------------------------------------------------------------------------ no torch


def test_module_imports_without_torch(cache):
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["vllm"] = None
import teacher_farm.training as t
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
assert [p.name for p in t.shard_paths({str(cache.path)!r})][0] == "part-000000.parquet"
class Tok:
    bos_token_id, eos_token_id = 1, 2
    def get_vocab(self):
        return {{f"t{{i}}": i for i in range({VOCAB})}}
t.assert_same_tokenizer({str(cache.path)!r}, Tok())
try:
    t.TopkDataset
except ImportError as exc:
    assert "torch" in str(exc)
else:
    raise AssertionError("TopkDataset without torch")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_tail_floor_is_what_a_full_topk_reports(tmp_path):
    # With k equal to the whole vocabulary nothing is left out: the tail sits at the floor.
    from teacher_farm.training import row_group_arrays

    full = torch.log_softmax(torch.randn(3, 4), dim=-1)
    values, ids = torch.topk(full, 4, dim=-1)
    seq = ScoredSequence(
        "x",
        np.arange(3, dtype=np.int32),
        ids.numpy().astype(np.int32),
        values.numpy(),
        np.zeros(2, np.float32),
        np.ones(2, np.int32),
    )
    table = results_to_table([seq], 4).add_column(1, "line", pa.array([0], type=pa.int64()))
    arrays = row_group_arrays(table)
    assert np.all(arrays.tail_logprob <= np.log(1e-6)) and np.all(
        arrays.tail_logprob >= np.float32(np.log(TAIL_FLOOR))
    )


# ------------------------------------------------------------------------------------ sampled targets


@pytest.mark.parametrize("targets", ["both", "sampled"])
def test_sampled_targets_stream_back_padded_per_position(tmp_path, targets):
    cache = write_cache(tmp_path, SHARDS, targets=targets, temperature=1.5, samples=12)
    got = items(TopkDataset(tmp_path))
    assert sorted(got) == sorted(cache.rows)
    for line, item in got.items():
        seq, n = cache.rows[line], len(cache.rows[line].input_ids)
        assert ("topk_ids" in item) == (targets == "both") and ("tail_logprob" in item) == (targets == "both")
        assert item["temperature"].item() == 1.5
        cut = np.concatenate([[0], np.cumsum(seq.sample_lengths)])
        S = int(seq.sample_lengths.max())
        assert (
            item["sample_ids"].shape == item["sample_counts"].shape == item["sample_logprobs"].shape == (n, S)
        )
        assert item["sample_ids"].dtype == torch.long and item["sample_counts"].dtype == torch.int16
        assert item["sample_logprobs"].dtype == torch.float32
        for i in range(n):
            m = int(seq.sample_lengths[i])
            np.testing.assert_array_equal(
                item["sample_ids"][i, :m].numpy(), seq.sample_ids[cut[i] : cut[i + 1]]
            )
            np.testing.assert_array_equal(
                item["sample_counts"][i, :m].numpy(), seq.sample_counts[cut[i] : cut[i + 1]]
            )
            np.testing.assert_array_equal(
                item["sample_logprobs"][i, :m].numpy(), seq.sample_logprobs[cut[i] : cut[i + 1]]
            )
            assert (item["sample_counts"][i, m:] == 0).all() and (item["sample_ids"][i, m:] == 0).all()
        assert (item["sample_counts"].sum(-1) == 12).all()


def test_collate_pads_sampled_targets_with_a_mask(tmp_path):
    write_cache(tmp_path, SHARDS, targets="sampled", samples=12)
    got = items(TopkDataset(tmp_path, max_length=4))
    seqs = [got[line] for line in (0, 1, 2)]
    batch = collate_topk(seqs)
    S = max(int(s["sample_ids"].shape[1]) for s in seqs)
    assert (
        batch["sample_ids"].shape == batch["sample_counts"].shape == batch["sample_mask"].shape == (3, 4, S)
    )
    assert "topk_ids" not in batch and batch["temperature"].tolist() == [1.0] * 3
    for b, s in enumerate(seqs):
        n, w = s["sample_ids"].shape
        torch.testing.assert_close(batch["sample_ids"][b, :n, :w], s["sample_ids"])
        torch.testing.assert_close(batch["sample_logprobs"][b, :n, :w], s["sample_logprobs"])
        assert (batch["sample_mask"][b, :n, :w] == (s["sample_counts"] > 0)).all()
        assert not batch["sample_mask"][b, n:].any() and not batch["sample_mask"][b, :, w:].any()
    assert (batch["sample_counts"].sum(-1)[batch["attention_mask"].bool()] == 12).all()


def test_a_dataset_refuses_shards_cached_at_different_temperatures(tmp_path):
    write_cache(tmp_path / "a", {0: [3]}, manifests={"manifest-a.json": [0]})
    write_cache(tmp_path / "b", {1: [3]}, manifests={"manifest-b.json": [1]}, temperature=2.0)
    shutil.copy(tmp_path / "b" / "part-000001.parquet", tmp_path / "a")
    shutil.copy(tmp_path / "b" / "manifest-b.json", tmp_path / "a")
    with pytest.raises(InputError, match="temperature"):
        TopkDataset(tmp_path / "a")


def test_a_dataset_checks_each_shards_own_metadata(tmp_path):
    # Manifests that agree do not hide a shard written at another temperature.
    write_cache(tmp_path / "a", {0: [3]}, manifests={"manifest-a.json": [0]})
    write_cache(tmp_path / "b", {1: [3]}, manifests={"manifest-b.json": [1]}, temperature=2.0)
    shutil.copy(tmp_path / "b" / "part-000001.parquet", tmp_path / "a")
    other = Manifest.model_validate_json((tmp_path / "b" / "manifest-b.json").read_bytes())
    other.identity = RunIdentity.from_entries({**other.identity.entries(), "temperature": 1.0})
    save_manifest(other, tmp_path / "a", "manifest-b.json")
    with pytest.raises(InputError, match="part-000001.parquet was cached with temperature=2.0"):
        TopkDataset(tmp_path / "a")


# ----------------------------------------------------------------------------------- every format, every loss


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8-gap"])
def test_every_loss_reads_every_format(tmp_path, fmt):
    from teacher_farm.schemas.formats import FORMATS
    from teacher_farm.training import SampledKDLoss, TopkRenormKLLoss, TopkTailKLLoss

    cache = write_cache(tmp_path, SHARDS, targets="both", samples=12, fmt=fmt)
    got = items(TopkDataset(tmp_path))
    assert sorted(got) == sorted(cache.rows)
    for line, item in got.items():
        seq = cache.rows[line]
        np.testing.assert_array_equal(item["topk_ids"].numpy(), seq.topk_ids)
        want = FORMATS[fmt].round_trip(seq.topk_logprobs)
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), want)
        assert np.abs(want - seq.topk_logprobs).max() <= (1 / 32 if fmt == "uint8-gap" else 5e-3)
        assert (item["sample_counts"].sum(-1) == 12).all() and item["sample_counts"].dtype == torch.int16
    batch = collate_topk([got[line] for line in sorted(got)])
    logits = teacher_logits(cache, batch)
    # The teacher itself, read back from a rounded cache: near 0, by as much as the format rounds.
    close = {"float32": 1e-5, "float16": 1e-4, "uint8-gap": 2e-3}[fmt]
    assert abs(TopkTailKLLoss()(logits, batch).item()) < close
    assert abs(TopkRenormKLLoss()(logits, batch).item()) < close
    sampled = SampledKDLoss(entropy=True)(logits, batch)
    assert abs(sampled.item()) < 5e-3  # float16 sample logprobs: within 0.004 nat


def test_a_loss_needing_sample_logprobs_says_which_cache_has_them(tmp_path):
    from teacher_farm.training import SampledKDLoss

    write_cache(tmp_path, SHARDS, targets="sampled", samples=12, fmt="uint8-gap", sample_logprobs=False)
    got = items(TopkDataset(tmp_path))
    assert all("sample_logprobs" not in item for item in got.values())
    batch = collate_topk([got[line] for line in sorted(got)])
    assert "sample_logprobs" not in batch and batch["sample_ids"].shape == batch["sample_mask"].shape
    logits = torch.randn(*batch["input_ids"].shape, VOCAB)
    assert torch.isfinite(SampledKDLoss()(logits, batch))
    with pytest.raises(
        ValueError, match="needs sample_logprobs in the batch: a cache written with --sample-logprobs"
    ):
        SampledKDLoss(entropy=True)(logits, batch)


def test_the_tokenizer_fingerprint_ignores_truncation_and_padding_left_set(tiny_model):
    from transformers import AutoTokenizer

    from teacher_farm.schemas.fingerprints import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_model)
    before = tokenizer_fingerprint(tok)
    tok(["a b c", "d"], truncation=True, max_length=2)
    assert tok.backend_tokenizer.truncation is not None
    assert tokenizer_fingerprint(tok) == before
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model)) == before
