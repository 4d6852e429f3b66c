"""`order.next_shard`, which tells a worker which shard to prefetch, against walking every position."""

from __future__ import annotations

import random

from kitdist.data import order


def walk(layout: order.EpochLayout, intervals: order.Intervals, index: int) -> int | None:
    """The brute force: locate every remaining position until the shard changes."""
    positions = [p for start, end in intervals for p in range(start, end)][index:]
    current = layout.locate(positions[0])[0]
    for position in positions[1:]:
        shard = layout.locate(position)[0]
        if shard != current:
            return shard
    return None


def test_next_shard_is_the_first_other_shard_the_positions_reach():
    rng = random.Random(5)
    checked = 0
    for trial in range(60):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 8))]
        layout = order.EpochLayout.build(seed=trial, epoch=trial % 3, shard_sizes=sizes)
        total = sum(sizes)
        cuts = sorted(rng.sample(range(total + 1), k=min(total + 1, 2 * rng.randint(1, 3))))
        intervals = order.merge([[cuts[i], cuts[i + 1]] for i in range(0, len(cuts) - 1, 2)])
        for index in range(order.length(intervals)):
            assert order.next_shard(layout, intervals, index) == walk(layout, intervals, index)
            checked += 1
    assert checked > 100
