"""Every distillation loss against a dense reference computed by hand, in float64, from the full
distributions behind a hand-built cache; the sampled estimator's expectation over many draws."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from teacher_farm.training import TopkDataset, collate_topk, kd_loss, sampled_kd_loss  # noqa: E402
from teacher_farm.training.losses import ChunkedKDLoss, SampledKDLoss, TopkRenormKLLoss, TopkTailKLLoss  # noqa: E402
from tests.helpers import SHARDS, VOCAB, items, true_tail, write_cache  # noqa: E402

T_CACHE = 2.0  # the caches here are written at temperature 2: the losses must work at it, unrescaled


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(
        tmp_path_factory.mktemp("both"), SHARDS, temperature=T_CACHE, targets="both", samples=16, seed=5
    )


@pytest.fixture(scope="module")
def batch(cache) -> dict[str, torch.Tensor]:
    got = items(TopkDataset(cache.path))
    return collate_topk([got[line] for line in sorted(got)])


@pytest.fixture()
def student(batch) -> torch.Tensor:
    torch.manual_seed(1)
    return (torch.randn(*batch["input_ids"].shape, VOCAB) * 2).requires_grad_()


def positions(cache, batch, logits: torch.Tensor):
    """Per real position: (teacher logprobs at T, student logprobs at T, cached row, index) in float64."""
    q_all = torch.log_softmax(logits.detach().double() / T_CACHE, dim=-1).numpy()
    for b, (line, n) in enumerate(zip(batch["line"].tolist(), batch["lengths"].tolist())):
        for i in range(n):
            yield cache.full[line][i].astype(np.float64), q_all[b, i], cache.rows[line], i


def dense_tail_kl(cache, batch, logits) -> float:
    vals = []
    for p, q, row, i in positions(cache, batch, logits):
        ids = row.topk_ids[i].astype(np.int64)
        p_top, q_top = p[ids], q[ids]
        p_tail = true_tail(p[None], ids[None])[0]
        rest = np.ones(VOCAB, bool)
        rest[ids] = False
        q_tail = np.log(np.exp(q[rest]).sum())
        vals.append((np.exp(p_top) * (p_top - q_top)).sum() + np.exp(p_tail) * (p_tail - q_tail))
    return T_CACHE**2 * float(np.mean(vals))


def dense_renorm_kl(cache, batch, logits) -> float:
    vals = []
    for p, q, row, i in positions(cache, batch, logits):
        ids = row.topk_ids[i].astype(np.int64)
        ph = np.exp(p[ids]) / np.exp(p[ids]).sum()
        qh = np.exp(q[ids]) / np.exp(q[ids]).sum()
        vals.append((ph * (np.log(ph) - np.log(qh))).sum())
    return T_CACHE**2 * float(np.mean(vals))


def dense_sampled(cache, batch, logits, entropy: bool) -> float:
    vals = []
    for p, q, row, i in positions(cache, batch, logits):
        cut = np.concatenate([[0], np.cumsum(row.sample_lengths)])
        ids = row.sample_ids[cut[i] : cut[i + 1]].astype(np.int64)
        w = row.sample_counts[cut[i] : cut[i + 1]] / row.sample_counts[cut[i] : cut[i + 1]].sum()
        vals.append((w * ((p[ids] if entropy else 0.0) - q[ids])).sum())
    return T_CACHE**2 * float(np.mean(vals))


# ------------------------------------------------------------------------------------ each formula


def test_tail_kl_equals_the_dense_bucket_kl(cache, batch, student):
    loss = TopkTailKLLoss()(student, batch)
    assert loss.item() == pytest.approx(dense_tail_kl(cache, batch, student), rel=1e-4)
    assert kd_loss(student, batch).item() == pytest.approx(loss.item(), rel=1e-6)


def test_renormalised_kl_equals_the_dense_reference(cache, batch, student):
    loss = TopkRenormKLLoss()(student, batch)
    assert loss.item() == pytest.approx(dense_renorm_kl(cache, batch, student), rel=1e-4)
    assert kd_loss(student, batch, tail=False).item() == pytest.approx(loss.item(), rel=1e-6)
    # The two top-k losses are different formulas, not one with a switch that does nothing.
    assert abs(loss.item() - TopkTailKLLoss()(student, batch).item()) > 0.01


@pytest.mark.parametrize("entropy", [False, True])
def test_sampled_loss_equals_the_dense_reference(cache, batch, student, entropy):
    loss = SampledKDLoss(entropy=entropy)(student, batch)
    assert loss.item() == pytest.approx(dense_sampled(cache, batch, student, entropy), rel=1e-4)
    assert sampled_kd_loss(student, batch, entropy=entropy).item() == pytest.approx(loss.item(), rel=1e-6)


def test_entropy_term_changes_the_value_not_the_gradient(batch, student):
    SampledKDLoss()(student, batch).backward()
    plain = student.grad.clone()
    student.grad = None
    SampledKDLoss(entropy=True)(student, batch).backward()
    torch.testing.assert_close(student.grad, plain)
    assert SampledKDLoss()(student, batch).item() - SampledKDLoss(entropy=True)(student, batch).item() > 0.5


def teacher_as_student(cache, batch) -> torch.Tensor:
    """Logits whose softmax at T_CACHE is the teacher's cached distribution (padding: zeros)."""
    B, T = batch["input_ids"].shape
    out = torch.zeros(B, T, VOCAB)
    for b, (line, n) in enumerate(zip(batch["line"].tolist(), batch["lengths"].tolist())):
        out[b, :n] = torch.from_numpy(cache.full[line]) * T_CACHE + 1.5
    return out


@pytest.mark.parametrize(
    "loss", [TopkTailKLLoss(), TopkRenormKLLoss(), SampledKDLoss(entropy=True)], ids=type
)
def test_every_kl_is_zero_for_the_teacher_itself_and_ignores_padding(cache, batch, loss):
    logits = teacher_as_student(cache, batch)
    pad = batch["attention_mask"] == 0
    logits[pad] = torch.randn(int(pad.sum()), VOCAB) * 50
    assert abs(loss(logits, batch).item()) < 1e-5
    logits.requires_grad_()
    loss(logits, batch).backward()
    assert (logits.grad[pad] == 0).all() and torch.isfinite(logits.grad).all()


def test_tail_loss_reads_renormalised_rows_the_same(cache, batch, student):
    got = items(TopkDataset(cache.path, renormalize=True))
    renorm = collate_topk([got[line] for line in sorted(got)])
    assert TopkTailKLLoss()(student, renorm).item() == pytest.approx(
        TopkTailKLLoss()(student, batch).item(), rel=1e-5
    )
    assert TopkRenormKLLoss()(student, renorm).item() == pytest.approx(
        TopkRenormKLLoss()(student, batch).item(), rel=1e-5
    )


# ------------------------------------------------------------------------------------ temperature


@pytest.mark.parametrize("cls", [TopkTailKLLoss, TopkRenormKLLoss, SampledKDLoss])
def test_a_temperature_other_than_the_caches_is_an_error(batch, student, cls):
    assert batch["temperature"].tolist() == [T_CACHE] * len(batch["lengths"])
    assert cls(temperature=T_CACHE)(student, batch).item() == cls()(student, batch).item()
    with pytest.raises(ValueError, match="cached at temperature 2 and the loss asks for 1"):
        cls(temperature=1.0)(student, batch)


def test_a_hand_built_batch_without_temperature_is_at_the_asked_one(batch, student):
    bare = {k: v for k, v in batch.items() if k != "temperature"}
    assert (
        TopkTailKLLoss(temperature=T_CACHE)(student, bare).item() == TopkTailKLLoss()(student, batch).item()
    )
    assert TopkTailKLLoss()(student, bare).item() != TopkTailKLLoss()(student, batch).item()  # 1 by default


def test_a_loss_names_what_the_cache_lacks(tmp_path, student):
    topk = write_cache(tmp_path / "t", SHARDS)
    got = items(TopkDataset(topk.path))
    b = collate_topk([got[line] for line in sorted(got)])
    with pytest.raises(ValueError, match="sample_ids.*--targets sampled"):
        SampledKDLoss()(student, b)


# ------------------------------------------------------------------------------------ chunked


@pytest.mark.parametrize(
    "loss", [TopkTailKLLoss(), TopkRenormKLLoss(), SampledKDLoss(entropy=True)], ids=type
)
def test_chunked_gives_the_same_value_and_gradient(batch, student, loss):
    whole = loss(student, batch)
    whole.backward()
    grad = student.grad.clone()
    student.grad = None
    chunked = ChunkedKDLoss(loss, num_output_chunks=4)(student, batch)
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(student.grad, grad)
    # A list of logit chunks along T (a chunked output projection) is taken as it is.
    listed = ChunkedKDLoss(loss)(list(student.detach().split([2, 3, 4], dim=1)), batch)
    assert listed.item() == pytest.approx(whole.item(), rel=1e-6)


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd saves for the backward pass while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunked_keeps_only_the_logits_for_backward(batch):
    B, T = batch["input_ids"].shape
    logits = torch.randn(B, T, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    loss = TopkTailKLLoss()
    whole = saved_bytes(lambda: loss(logits, batch))
    chunked = saved_bytes(lambda: ChunkedKDLoss(loss, num_output_chunks=T)(logits, batch))
    # Unchunked, several float32 (B, T, V) buffers wait for the backward pass; chunked, nothing
    # larger than the bf16 logits themselves (the float32 work is recomputed one chunk at a time).
    assert whole > 3 * logits.numel() * 4
    assert chunked <= logits.numel() * 2 + 64 * B * T


# ------------------------------------------------------------------------------------ unbiased


def test_sampled_estimator_is_unbiased_for_the_full_cross_entropy():
    """Over many independent draws of N tokens the mean loss is the student's full cross-entropy
    against the teacher (within 4 standard errors); renormalised top-k is not."""
    gen = torch.Generator().manual_seed(0)
    V, P, N, R = 40, 3, 8, 4000
    teacher = torch.log_softmax(torch.randn(P, V, generator=gen, dtype=torch.float64) * 2.0, dim=-1)
    student_logits = torch.randn(P, V, generator=gen, dtype=torch.float64)
    q = torch.log_softmax(student_logits, dim=-1)
    full_ce = -(teacher.exp() * q).sum(-1)  # (P,)
    # R independent batches of draws, one "sequence" per draw set: (R, P, N) ids -> counts per id.
    drawn = torch.multinomial(teacher.exp().repeat(R, 1), N, replacement=True, generator=gen).view(R, P, N)
    counts = torch.zeros(R, P, V, dtype=torch.int16).scatter_add_(
        -1, drawn, torch.ones_like(drawn, dtype=torch.int16)
    )
    batch = {
        "attention_mask": torch.ones(R, P, dtype=torch.long),
        "sample_ids": torch.arange(V).expand(R, P, V).contiguous(),  # every id a slot, most with count 0
        "sample_counts": counts,
        "temperature": torch.ones(R),
    }
    logits = student_logits.float().expand(R, P, V)
    per_draw = torch.stack(
        [
            SampledKDLoss()(
                logits[:, p : p + 1], {k: (v[:, p : p + 1] if v.dim() > 1 else v) for k, v in batch.items()}
            )
            for p in range(P)
        ]
    )  # (P,) each the mean over R draws
    w = counts.double() / N
    per_sample = -(w * q).sum(-1)  # (R, P) the estimator draw by draw, for its standard error
    se = per_sample.std(0) / R**0.5
    assert (per_draw.double() - full_ce).abs().max() < 4 * se.max()
    assert se.max() < 0.05  # the test has the power to see a bias
    # Top-k (k=4) renormalised is a biased stand-in for the full distribution here.
    top_lp, top_ids = teacher.topk(4, dim=-1)
    topk_ce = -(torch.softmax(top_lp, -1) * q.gather(-1, top_ids)).sum(-1)
    assert (topk_ce - full_ce).abs().max() > 10 * se.max()
