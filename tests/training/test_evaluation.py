"""The Pass@k estimator against brute-force enumeration of k-subsets; a padded evaluation shard
counts each problem once."""

import itertools

import pytest
import torch

from sapo.data import PromptSet
from sapo.engines import Generation, SamplingSettings
from sapo.model.tiny import char_tokenizer
from sapo.rewards import NamedReward, RewardSettings
from sapo.training.evaluation import EvalSettings, evaluate, pass_at_k


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


class EchoEngine:
    """Completes each prompt with its first character; records how many problems each call had."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, group_size, sampling, seeds):
        self.calls.append(len(prompt_ids))
        ids = torch.tensor([[p[0]] for p in prompt_ids for _ in range(group_size)])
        return Generation(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.bool))

    def sync(self, model):
        pass


def test_padding_an_evaluation_shard_runs_more_problems_and_counts_each_once():
    tokenizer = char_tokenizer()
    rows = [{"prompt": c, "answer": c if i in (2, 7) else "x"} for i, c in enumerate("abcdefgh")]
    prompts = PromptSet(rows, [tokenizer(r["prompt"])["input_ids"] for r in rows], conversational=False)

    def right(prompts, completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer)]

    settings = EvalSettings(samples=2, greedy=True, sampling=SamplingSettings(max_new_tokens=1),
                            rewards=RewardSettings(), seed=0, batch_prompts=4)
    results = []
    for pad_to in (0, 6):
        engine = EchoEngine()
        totals = evaluate(engine, tokenizer, prompts, [NamedReward("right", right)], settings, indices=[2, 5, 7],
                          pad_to=pad_to)
        results.append(totals)
        assert engine.calls == ([3, 3] if pad_to == 0 else [4, 4, 2, 2])  # sampled and greedy, per batch
    plain, padded = results
    assert plain.problems == padded.problems == 3 and plain.per_problem == padded.per_problem == [1.0, 0.0, 1.0]
    assert plain.as_tensor().tolist() == padded.as_tensor().tolist()
