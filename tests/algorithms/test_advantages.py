import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sapo


def reference(rewards, G, scale, eps):
    """Group advantages from Python's statistics module, group by group."""
    out = []
    valid_all = [r for r in rewards if r is not None and not math.isnan(r)]
    batch_std = statistics.stdev(valid_all) if len(valid_all) > 1 else 0.0
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        valid = [r for r in group if r is not None and not math.isnan(r)]
        if not valid or max(valid) == min(valid):
            out += [0.0] * len(group)
            continue
        mean = statistics.fmean(valid)
        std = {"group": statistics.stdev(valid) if len(valid) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
        for r in group:
            if r is None or math.isnan(r):
                out.append(0.0)
            else:
                out.append(r - mean if std is None else (r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_statistics_module(scale):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0]
    adv = sapo.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale=scale)
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(reference(rewards, 4, scale, 1e-4), rel=1e-12, abs=1e-15)


def test_constant_groups_are_exactly_zero_never_nan():
    adv = sapo.group_advantages([0.1, 0.1, 0.1, 7.0, 7.0, 7.0], 3)
    assert adv.dtype == torch.float32
    assert adv.tolist() == [0.0] * 6
    assert sapo.group_advantages([0.1, 0.1, 0.1], 3, eps=0.0).tolist() == [0.0] * 3
    assert sapo.group_advantages([0.1, 0.1, 0.1], 3, scale="none").tolist() == [0.0] * 3
    assert sapo.group_advantages([0.3] * 4, 2, scale="batch", eps=0.0).tolist() == [0.0] * 4


def test_nan_or_none_rewards_are_left_out_and_get_zero():
    with_nan = sapo.group_advantages([1.0, float("nan"), 0.0, 2.0, None, None, None, None], 4)
    without = sapo.group_advantages([1.0, 0.0, 2.0], 3)
    assert with_nan[1].item() == 0.0 and with_nan[4:].tolist() == [0.0] * 4
    torch.testing.assert_close(with_nan[[0, 2, 3]], without)
    # A group with a single valid reward has no spread: 0.
    assert sapo.group_advantages([None, 5.0, None], 3).tolist() == [0.0] * 3


def test_group_size_one_and_empty_input():
    assert sapo.group_advantages([1.0, 2.0, 3.0], 1).tolist() == [0.0] * 3
    assert sapo.group_advantages([], 4).shape == (0,)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rewards=[1.0, 2.0, 3.0], group_size=2), r"3 rewards do not split into groups of group_size=2"),
    (dict(rewards=[1.0, 2.0], group_size=0), r"group_size must be a positive integer"),
    (dict(rewards=[1.0, 2.0], group_size=2.0), r"group_size must be a positive integer"),
    (dict(rewards=[1.0, 2.0], group_size=2, scale="std"), r"scale='std' is not known"),
    (dict(rewards=[1.0, 2.0], group_size=2, eps=-1.0), r"eps must be a non-negative"),
    (dict(rewards=[1.0, float("inf")], group_size=2), r"rewards must be finite.*positions \[1\]"),
    (dict(rewards=torch.ones(2, 2), group_size=2), r"rewards must be one-dimensional"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sapo.group_advantages(**kwargs)


reward = st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(-10, 10, allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(G=st.integers(1, 8), groups=st.integers(0, 5), data=st.data(), scale=st.sampled_from(["group", "batch", "none"]))
def test_properties_for_any_group_size(G, groups, data, scale):
    rewards = data.draw(st.lists(reward, min_size=G * groups, max_size=G * groups))
    adv = sapo.group_advantages(rewards, G, scale=scale)
    assert adv.shape == (G * groups,)
    assert torch.isfinite(adv).all()
    assert adv.tolist() == pytest.approx(reference(rewards, G, scale, 1e-4), rel=1e-5, abs=1e-5)
    for g in range(groups):
        block, vals = adv[g * G:(g + 1) * G], rewards[g * G:(g + 1) * G]
        assert abs(block.double().sum().item()) <= 1e-4 * (1 + block.abs().sum().item())  # centred
        for a, r in zip(block.tolist(), vals):
            if r is None:
                assert a == 0.0
