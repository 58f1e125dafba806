"""Client sampling (pure) used by the ServerApp each round."""

from __future__ import annotations

import numpy as np
import pytest

from server_app.federation import sample_nodes

NODE_IDS = [695185596394689024, 3994824251854479872, 10858828663124191232, 11025986906106849280, 12977294888257028096]


@pytest.mark.parametrize(("fraction", "count"), [(1.0, 5), (0.5, 2), (0.6, 3), (0.01, 1)])
def test_sampling_takes_distinct_real_node_ids(fraction, count):
    picked = sample_nodes(NODE_IDS, fraction, np.random.default_rng(0))
    assert len(picked) == count == len(set(picked)) and set(picked) <= set(NODE_IDS)
    assert all(type(n) is int for n in picked)  # uint64 ids survive exactly


def test_sampling_is_seeded_and_varies_between_rounds():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    rounds_a = [sample_nodes(NODE_IDS, 0.4, rng_a) for _ in range(10)]
    rounds_b = [sample_nodes(NODE_IDS, 0.4, rng_b) for _ in range(10)]
    assert rounds_a == rounds_b and len({tuple(r) for r in rounds_a}) > 1
