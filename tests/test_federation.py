"""Client sampling (pure) used by the ServerApp each round."""

from __future__ import annotations

import numpy as np
import pytest

from server_app.federation import sample_nodes

NODE_IDS = [695185596394689024, 3994824251854479872, 10858828663124191232, 11025986906106849280, 12977294888257028096]


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize(("fraction", "count"), [(1.0, 5), (0.5, 2), (0.6, 3), (0.01, 1)])
def test_sampling_takes_distinct_real_node_ids(fraction, count, seeded):
    picked = sample_nodes(NODE_IDS, fraction, np.random.default_rng(0) if seeded else None)
    assert len(picked) == count == len(set(picked)) and set(picked) <= set(NODE_IDS)
    assert all(type(n) is int for n in picked)  # uint64 ids survive exactly


def test_sampling_is_seeded_and_varies_between_rounds():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    rounds_a = [sample_nodes(NODE_IDS, 0.4, rng_a) for _ in range(10)]
    rounds_b = [sample_nodes(NODE_IDS, 0.4, rng_b) for _ in range(10)]
    assert rounds_a == rounds_b and len({tuple(r) for r in rounds_a}) > 1


def test_without_a_generator_the_sample_is_drawn_afresh_from_the_os():
    """dp.secret_sampling: nothing to seed or replay; 20 rounds of 2 of 5 coincide by chance with probability 10^-20."""
    first, second = ([sample_nodes(NODE_IDS, 0.4, None) for _ in range(20)] for _ in range(2))
    assert first != second and len({tuple(r) for r in first}) > 1
