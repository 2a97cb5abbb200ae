import math

import pytest
import torch

from sapo.errors import ConfigError
from sapo.rewards import RewardError, RewardSettings, check_signature, load_reward_function, score


def test_loading_by_builtin_name_module_and_file(tmp_path):
    assert load_reward_function("exact_match").name == "exact_match"
    assert load_reward_function("math:isclose").fn is math.isclose
    (tmp_path / "r.py").write_text("def mine(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward_function(f"{tmp_path / 'r.py'}:mine").fn([], ["a", "b"]) == [1.0, 1.0]


@pytest.mark.parametrize("spec,message", [
    ("nonsense", r"is not a built-in reward"),
    ("/no/such/file.py:f", r"file '/no/such/file.py' .* does not exist"),
    ("no_such_module_xyz:f", r"could not import 'no_such_module_xyz'"),
    ("math:no_such_fn", r"'math' has no function 'no_such_fn'"),
])
def test_loading_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_function(spec)


def test_signature_must_accept_the_columns(tmp_path):
    (tmp_path / "r.py").write_text("def strict(prompts, completions):\n    return []\n"
                                   "def loose(prompts, completions, answer, **kw):\n    return []\n")
    with pytest.raises(ConfigError, match=r"reward function 'strict' cannot be called as .*answer=.*"
                                          r"f\(prompts, completions, \*\*kwargs\)"):
        check_signature(load_reward_function(f"{tmp_path / 'r.py'}:strict"), ["answer"])
    check_signature(load_reward_function(f"{tmp_path / 'r.py'}:loose"), ["answer", "level"])


def named(fn):
    from sapo.rewards import NamedReward

    return NamedReward(fn.__name__, fn)


def call(funcs, weights=None, completions=("1", "2", "3"), skip=False):
    n = len(completions)
    return score([named(f) for f in funcs], RewardSettings(weights, skip), ["p"] * n, list(completions), [[1]] * n,
                 {"answer": ["1", "7", "3"][:n]})


def test_weights_none_and_combination():
    def a(prompts, completions, **kw):
        return [1.0, None, 0.0]

    def b(prompts, completions, **kw):
        return [0.5, None, None]

    out = call([a, b], [1.0, 2.0])
    assert out.total[0].item() == 2.0 and math.isnan(out.total[1].item()) and out.total[2].item() == 0.0
    assert math.isnan(out.per_func[1, 0].item())


def test_a_raising_function_is_named_with_its_sample():
    def picky(prompts, completions, answer, **kw):
        return [1 / 0 if x == "7" else 1.0 for x in answer]

    with pytest.raises(RewardError, match=r"reward function 'picky' raised ZeroDivisionError: division by zero on "
                                          r"sample 1: prompt='p', completion='2'"):
        call([picky])
    out = call([picky], skip=True)
    assert out.errors == 1 and math.isnan(out.total[1].item()) and out.total[0].item() == 1.0


def test_what_a_raising_call_logged_is_replaced_by_the_per_sample_calls():
    def logs_then_raises(prompts, completions, answer, log_metric, log_extra, **kw):
        log_extra("seen", list(answer))
        log_metric("calls", 1.0)
        return [1 / 0 if x == "7" else 1.0 for x in answer]

    out = call([logs_then_raises], skip=True)
    assert out.errors == 1
    assert out.columns == {"seen": ["1", None, "3"]}  # one value per sample, None where it raised
    assert out.logged == {"calls": [1.0, 1.0]}  # the two calls that returned


def test_a_column_named_like_an_argument_of_every_call_is_refused():
    with pytest.raises(ConfigError, match=r"the dataset column 'trainer_state' has the name of an argument"):
        check_signature(named(lambda prompts, completions, **kw: []), ["answer", "trainer_state"])


@pytest.mark.parametrize("value,message", [
    ([1.0], r"returned 1 values for 3 completions"),
    ("abc", r"returned str; it must return a list"),
    (["x", 1, 2], r"returned 'x'; rewards must be numbers or None"),
    (["1", 1, 2], r"returned '1'; rewards must be numbers or None"),
    ([math.inf, 1, 2], r"returned inf; rewards must be finite"),
    ([1e39, 1, 2], r"returned 1e\+39; rewards must be finite float32"),
])
def test_bad_return_values(value, message):
    def bad(prompts, completions, **kw):
        return value

    with pytest.raises(ConfigError, match=message):
        call([bad])


def test_numbers_of_any_kind_are_rewards():
    import numpy as np

    def kinds(prompts, completions, **kw):
        return [np.float32(0.5), torch.tensor(1.0), np.bool_(True)]  # np.bool_ is not a numbers.Real

    assert call([kinds]).total.tolist() == [0.5, 1.0, 1.0]


@pytest.mark.parametrize("skip", [False, True])
def test_a_reward_function_that_exits_is_an_error_naming_it_and_the_sample(skip):
    import sys

    def quits(prompts, completions, answer, **kw):
        if "7" in answer:
            sys.exit(0)
        return [1.0] * len(answer)

    # Never scored as 'does not apply': exiting is a bug of the function, not of the sample.
    with pytest.raises(RewardError, match=r"reward function 'quits' called sys.exit\(0\) on sample 1: prompt='p', "
                                          r"completion='2'.*skip_reward_errors does not cover this"):
        call([quits], skip=skip)


def test_a_reward_function_that_exits_only_on_the_whole_batch_is_an_error():
    def batch_quits(prompts, completions, **kw):
        if len(completions) > 1:
            raise SystemExit("too many")
        return [1.0]

    with pytest.raises(RewardError, match=r"'batch_quits' called sys.exit\('too many'\) on a batch of 3 samples"):
        call([batch_quits], skip=True)


def test_a_reward_module_that_exits_at_import_is_a_config_error(tmp_path):
    (tmp_path / "script.py").write_text("import sys\nsys.exit(0)\ndef f(prompts, completions, **kw):\n    return []\n")
    with pytest.raises(ConfigError, match=r"reward_funcs: importing '.*script.py' for '.*script.py:f' called "
                                          r"sys.exit\(0\)"):
        load_reward_function(f"{tmp_path / 'script.py'}:f")


@pytest.mark.parametrize("where", ["call", "import"])
def test_sapo_train_does_not_exit_0_silently_when_a_reward_exits(workdir, tmp_path, where):
    import subprocess
    import sys

    body = "def quits(prompts, completions, **kw):\n    raise SystemExit(0)\n"
    (tmp_path / "quitting.py").write_text(("import sys\nsys.exit(0)\n" if where == "import" else "") + body)
    args = [f"model={workdir / 'model'}", f"dataset={workdir / 'data.jsonl'}",
            f"reward_funcs={tmp_path / 'quitting.py'}:quits",
            "max_steps=1", "num_generations=2", "prompts_per_step=2", "max_completion_length=4", "num_minibatches=1",
            f"output_dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "sapo", "train", *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("sapo train: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "called sys.exit(0)" in lines[0]
    assert ("'quits' called sys.exit(0) on sample 0" if where == "call" else "quitting.py") in lines[0]
