"""The public API stays where the README and the docs say it is."""

import subprocess
import sys

import sapo

PUBLIC = ["policy_loss", "group_advantages", "register_policy_loss", "token_logprobs", "TrainConfig", "ConfigError",
          "Trainer", "train", "PolicyLossInputs", "PolicyLossSettings", "TokenLoss", "available_policy_losses"]


def test_the_documented_names_are_reachable_from_import_sapo():
    for name in PUBLIC:
        assert hasattr(sapo, name), name
    assert set(sapo.__all__) >= set(PUBLIC)
    for _ in range(2):  # sapo.train stays the function, however often and in whatever order it is asked for
        assert callable(sapo.Trainer) and sapo.train.__name__ == "train" and callable(sapo.train)
    assert sapo.rewards.register_reward and sapo.rewards.math_accuracy and sapo.rewards.code_tests


def test_star_import_gives_the_functions():
    code = "from sapo import *\nassert callable(train) and train.__name__ == 'train' and Trainer.__name__ == 'Trainer'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
