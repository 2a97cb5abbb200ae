"""The Pass@k estimator against brute-force enumeration of k-subsets."""

import itertools

import pytest

from sapo.training.evaluation import pass_at_k


def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n,c,k", [(2, 0, 3), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_outside_its_domain_is_an_error(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)
