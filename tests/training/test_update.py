"""Metric averaging over micro-batches and processes, and the minibatch plan."""

import pytest

from sapo.training.update import MetricMean, minibatch_plan


def test_metrics_are_token_weighted_over_micro_batches_and_processes():
    first, second = MetricMean(), MetricMean()
    first.add({"entropy": 1.0, "ratio/max": 1.5, "ratio/min": 0.9}, 3.0)
    first.add({"entropy": 9.0, "ratio/max": 9.0}, 0.0)  # all padding: ignored
    second.add({"entropy": 2.0, "ratio/max": 1.2, "ratio/min": 0.7, "kl/mean": 0.5}, 1.0)
    empty = MetricMean()  # a process whose every token was masked out
    total = MetricMean()
    for part in (first, empty, second):
        total.merge(part)
    assert total.result() == pytest.approx({"entropy": (3 * 1.0 + 2.0) / 4, "ratio/max": 1.5, "ratio/min": 0.7,
                                            "kl/mean": 0.5})


@pytest.mark.parametrize("G,M", [(8, 4), (4, 4), (6, 4)])
def test_minibatch_plan_partitions_the_batch(G, M):
    """The trainer requires M to divide the batch (2 prompts x G), not G itself."""
    plan = minibatch_plan(2, G, M, seed=0, step=1, iteration=0, first_position=0)
    assert sorted(i for minibatch in plan for i in minibatch) == list(range(2 * G))
    if G % M == 0:  # each minibatch holds G / M samples of every prompt
        for minibatch in plan:
            assert sorted(i // G for i in minibatch) == sorted([0, 1] * (G // M))
