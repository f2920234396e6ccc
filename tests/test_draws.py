"""The draw contract's numpy side: the same uniforms as the worker, and the comparison of two scorings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_farm.schemas.draws import MIN_MOVED, draw_seed, expand, moved_draws, uniforms
from teacher_farm.server import reduce


def test_numpy_uniforms_are_the_workers_bit_for_bit():
    seeds = np.array([0, 1, 7, 0xFFFFFFFF, draw_seed(3, [1, 2, 3])], dtype=np.int64)
    positions = np.array([0, 5, 1023, 70000, 3], dtype=np.int64)
    ours = uniforms(seeds, positions, 300)
    theirs = reduce.uniforms(torch.from_numpy(seeds), torch.from_numpy(positions), 300).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.int32), theirs.view(np.int32))


def test_draw_seed_mixes_the_request_seed_with_the_sequence():
    assert draw_seed(1, [5, 6]) == draw_seed(1, [5, 6])
    assert len({draw_seed(1, [5, 6]), draw_seed(2, [5, 6]), draw_seed(1, [6, 5])}) == 3


def test_expand_turns_counts_back_into_sorted_draws():
    drawn = expand(np.array([2, 1]), np.array([3, 9, 4]), np.array([1, 2, 3]), 3)
    assert drawn.tolist() == [[3, 9, 9], [4, 4, 4]]
    with pytest.raises(ValueError, match="draws"):
        expand(np.array([2]), np.array([3]), np.array([1]), 3)


def test_a_draw_may_move_to_a_neighbour_and_nothing_else():
    a = np.arange(4000).reshape(1000, 4) * 10
    assert moved_draws(a, a.copy()).holds
    neighbour = a.copy()
    neighbour[7, 2] += 1
    cmp = moved_draws(a, neighbour)
    assert cmp.holds and (cmp.moved, cmp.jumped) == (1, 0)
    jumped = a.copy()
    jumped[7, 2] += 2
    assert not moved_draws(a, jumped).holds
    # A boundary is rare: more neighbours moved than a boundary's share is a defect too.
    many = a.copy()
    many[: MIN_MOVED + 5, 0] += 1
    assert not moved_draws(a, many).holds
