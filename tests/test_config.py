import pytest
import torch

from sapo.config import TrainConfig, field_docs
from sapo.errors import ConfigError


def test_every_field_has_a_docstring():
    docs = field_docs()
    missing = [f for f in TrainConfig.__dataclass_fields__ if not docs.get(f)]
    assert not missing


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: grpo\nlearning_rate: 1e-5\nreward_funcs: [exact_match]\nepsilon_high: 0.28\n")
    config = TrainConfig.from_sources(path, ["learning_rate=2e-5", "num_generations=4", "report_to=tensorboard",
                                             "epsilon=null", "mask_truncated_completions=true"])
    assert config.loss_type == "grpo" and config.learning_rate == 2e-5 and config.num_generations == 4
    assert config.reward_funcs == ["exact_match"] and config.report_to == ["tensorboard"]
    assert config.epsilon is None and config.epsilon_high == 0.28 and config.mask_truncated_completions is True
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("overrides,message", [
    (["learning_rat=1e-5"], r"unknown config field\(s\): 'learning_rat' \(did you mean learning_rate\?\)"),
    (["num_generation=4"], r"did you mean num_generations"),
    (["num_generations=four"], r"num_generations must be int, got 'four'"),
    (["learning_rate=fast"], r"learning_rate must be a number"),
    (["max_steps=true"], r"max_steps must be int"),
    (["loss_type"], r"is not key=value"),
    (["reward_funcs=[arithmetic"], r"override 'reward_funcs=\[arithmetic': the value is not valid YAML"),
])
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_sources(None, overrides)


def valid(tmp_path, **kw):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    return TrainConfig(**{"model": str(tmp_path / "m"), "dataset": "d.jsonl", "reward_funcs": ["exact_match"], **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(num_generations=1), r"num_generations=1 must be at least 2"),
    (dict(prompts_per_step=3, num_generations=2, num_minibatches=4),
     r"num_minibatches=4 must divide the rollout batch"),
    (dict(loss_type="ppo"), r"loss_type='ppo' is not one of"),
    (dict(aggregation="token_mean"), r"Did you mean 'token-mean'"),
    (dict(scale_rewards="std"), r"scale_rewards='std'"),
    (dict(tau_neg=0.0), r"tau_neg must be a positive"),
    (dict(reward_weights=[1.0, 2.0]), r"reward_weights=.* needs one weight per reward function \(1\)"),
    (dict(top_p=0.0), r"top_p=0.0 must be in"),
    (dict(learning_rate=float("inf")), r"learning_rate=inf must be a finite number"),
    (dict(seed=-1), r"seed=-1 must be in \[0, 2\*\*32\)"),
    (dict(loss_type="grpo", epsilon=2.0), r"epsilon must be below 1"),
    (dict(report_to=["mlflow"]), r"report_to='mlflow'"),
    (dict(model="/nonexistent/model"), r"model='/nonexistent/model': no such local path"),
    (dict(model="/"), r"model='/' is not a model directory \(no config.json in it\)"),
    (dict(output_dir=__file__), r"output_dir=.* is a file, not a directory"),
    (dict(prompt_template="Q: {q}"), r"prompt_template='Q: {q}' is not a valid template \(KeyError: 'q'\)"),
    (dict(prompt_template="{question} {"), r"prompt_template=.* is not a valid template \(ValueError"),
    (dict(param_dtype="bfloat16"), r"param_dtype='bfloat16' needs fsdp=true; without sharding, dtype=bfloat16"),
    (dict(param_dtype="float16", fsdp=True), r"param_dtype='float16' is not one of \['float32', 'bfloat16'\]"),
    (dict(cpu_offload=True), r"cpu_offload=True needs fsdp=true"),
    (dict(fsdp=True, dtype="bfloat16"), r"dtype='bfloat16' \(autocast\) is replaced by param_dtype with fsdp=true"),
    (dict(max_tokens_per_micro_batch=100, max_prompt_length=64, max_completion_length=64),
     r"max_tokens_per_micro_batch=100 must hold the longest sample, max_prompt_length \+ max_completion_length = 128"),
    (dict(max_tokens_per_micro_batch=-1), r"max_tokens_per_micro_batch=-1 must be >= 0"),
    (dict(vllm_mode="remote"), r"vllm_mode='remote' is not one of"),
    (dict(rollout_engine="vllm", rollout_dtype="bfloat16"), r"rollout_dtype='bfloat16' applies to rollout_engine=hf"),
    (dict(vllm_server_base_url="localhost:8000"), r"vllm_server_base_url='localhost:8000' must be an http://"),
    (dict(vllm_server_timeout=0), r"vllm_server_timeout=0.0 must be a positive number"),
    (dict(vllm_gpu_memory_utilization=1.5), r"vllm_gpu_memory_utilization=1.5 must be in \(0, 1\]"),
    (dict(vllm_tensor_parallel_size=0), r"vllm_tensor_parallel_size=0 must be >= 1"),
    (dict(rollout_engine="vllm", vllm_mode="colocate", vllm_tensor_parallel_size=2),
     r"vllm_tensor_parallel_size=2 above 1 with vllm_mode=colocate is not built yet"),
    (dict(rollout_engine="vllm", vllm_mode="colocate", fsdp=True), r"vllm_mode='colocate' with fsdp=true is not built"),
    (dict(rollout_engine="sglang"), r"rollout_engine='sglang' is not one of \['hf', 'vllm'\]"),
    (dict(rollout_dtype="float16"), r"rollout_dtype='float16' is not one of \['float32', 'bfloat16'\]"),
    (dict(vllm_importance_sampling_mode="tis"), r"vllm_importance_sampling_mode='tis' is not one of"),
    (dict(vllm_importance_sampling_clip_max=0.0), r"vllm_importance_sampling_clip_max=0.0 must be a positive number"),
    (dict(vllm_importance_sampling_clip_max=None), r"vllm_importance_sampling_clip_max=None must be a positive number"),
    (dict(vllm_importance_sampling_clip_min=4.0), r"vllm_importance_sampling_clip_min=4.0 must be below .*=3.0"),
    (dict(rollout_dtype="bfloat16", fsdp=True), r"rollout_dtype='bfloat16' is not supported with fsdp=true yet"),
])
def test_validate_names_the_field_and_fix(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        valid(tmp_path, **kw).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="offloading is allowed with a GPU")
def test_cpu_offload_needs_a_gpu(tmp_path):
    with pytest.raises(ConfigError, match=r"cpu_offload=True needs a CUDA GPU"):
        valid(tmp_path, fsdp=True, cpu_offload=True).validate()


def test_missing_required_fields_are_listed():
    with pytest.raises(ConfigError, match=r"missing required field\(s\): model .*; dataset .*; reward_funcs"):
        TrainConfig().validate()


@pytest.mark.parametrize("reporter", ["tensorboard", "wandb"])
def test_optional_reporters_say_which_extra_to_install(tmp_path, reporter):
    import importlib.util

    config = valid(tmp_path, report_to=["jsonl", reporter])
    if importlib.util.find_spec(reporter) is None:
        with pytest.raises(ConfigError, match=rf"pip install 'sapo-rl\[{reporter}\]'"):
            config.validate()
    else:
        config.validate()


def test_float16_needs_a_gpu(tmp_path):
    import torch

    config = valid(tmp_path, dtype="float16")
    if torch.cuda.is_available():
        config.validate()
    else:
        with pytest.raises(ConfigError, match=r"dtype='float16' needs a CUDA GPU"):
            config.validate()


def test_values_written_as_trl_takes_them(tmp_path):
    config = valid(tmp_path, scale_rewards=False, resume_from_checkpoint=True, report_to="none", learning_rate="1e-5",
                   reward_funcs="rewards.py:correct")
    assert (config.scale_rewards, config.resume_from_checkpoint, config.report_to) == ("none", "latest", ["jsonl"])
    assert config.learning_rate == 1e-5 and config.reward_funcs == ["rewards.py:correct"]
    assert TrainConfig.from_dict({"scale_rewards": True}).scale_rewards == "group"
    with pytest.raises(ConfigError, match=r"learning_rate must be a number, got 'fast'"):
        valid(tmp_path, learning_rate="fast")


def test_reward_functions_given_as_python_functions_are_kept_and_saved_by_name(tmp_path):
    from sapo.rewards import REWARDS, load_reward_function

    def shortness_for_config_test(prompts, completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    config = valid(tmp_path, reward_funcs=[shortness_for_config_test, "exact_match"])
    assert config.reward_funcs == [shortness_for_config_test, "exact_match"]
    assert config.to_dict()["reward_funcs"] == ["shortness_for_config_test", "exact_match"]
    assert "shortness_for_config_test" in config.to_yaml()
    assert "shortness_for_config_test" not in REWARDS  # a config changes no global registry
    assert load_reward_function(shortness_for_config_test).fn is shortness_for_config_test  # the trainer's lookup
    assert valid(tmp_path, reward_funcs=shortness_for_config_test).reward_funcs == [shortness_for_config_test]
    with pytest.raises(ConfigError, match=r"has no name to save in config.yaml"):
        valid(tmp_path, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)])

    def exact_match(prompts, completions, **kwargs):  # the name of a built-in
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"the name 'exact_match' .* is taken by another reward function"):
        load_reward_function(exact_match)


def test_trl_names_point_to_ours():
    with pytest.raises(ConfigError, match=r"'steps_per_generation' \(TRL's; here: num_minibatches = "):
        TrainConfig.from_dict({"steps_per_generation": 4})
    with pytest.raises(ConfigError, match=r"'sapo_temperature_neg' \(TRL's; here: tau_neg\)"):
        TrainConfig.from_dict({"sapo_temperature_neg": 1.05})
    with pytest.raises(ConfigError, match=r"'use_vllm' \(TRL's; here: rollout_engine=vllm"):
        TrainConfig.from_dict({"use_vllm": True})


def test_trl_loss_types_that_are_aggregations_here(tmp_path):
    with pytest.raises(ConfigError, match=r"loss_type='dr_grpo' is TRL's name for an aggregation; here it is "
                                          r"loss_type=grpo aggregation=seq-mean-token-sum-norm scale_rewards=none"):
        valid(tmp_path, loss_type="dr_grpo").validate()


@pytest.mark.parametrize("text,key,lines", [
    ("max_steps: 1\nloss_type: grpo\nmax_steps: 2\n", "max_steps", "1 and 3"),
    ("task_kwargs:\n  digits: 2\n  digits: 3\n", "digits", "2 and 3"),
])
def test_a_key_given_twice_in_yaml_is_named(tmp_path, text, key, lines):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"run.yaml': key '{key}' is given twice \(lines {lines}\); keep one"):
        TrainConfig.from_sources(path)


def test_yaml_merge_keys_and_unhashable_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task_kwargs:\n  <<: {digits: 2, operands: 3}\n  digits: 4\n")  # overriding a merged key is fine
    assert TrainConfig.from_sources(path).task_kwargs == {"digits": 4, "operands": 3}
    path.write_text("? [1]\n: 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML: .*found unhashable key"):
        TrainConfig.from_sources(path)


def test_a_merge_key_given_twice_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task_kwargs:\n  <<: {digits: 1}\n  <<: {digits: 2}\n")
    with pytest.raises(ConfigError, match=r"'<<' is given twice \(lines 2 and 3\); merge several mappings"):
        TrainConfig.from_sources(path)


def test_shipped_model_names_resolve_to_the_package_assets(tmp_path, monkeypatch):
    from sapo.cli import _load_config
    from sapo.demo import shipped_model_path

    for name in ("arithmetic-tiny", "moe-tiny"):
        config = TrainConfig.from_sources(None, [f"model={name}", "dataset=arithmetic", "reward_funcs=arithmetic"])
        assert config.model == str(shipped_model_path(name)) and (shipped_model_path(name) / "config.json").is_file()
        config.validate()
        assert TrainConfig.from_dict(config.to_dict()) == config  # as config.yaml saves it
    # On the command line a shipped model keeps the demo setting; another model does not.
    demo = _load_config(["model=moe-tiny", "max_steps=3"])
    assert demo.model == str(shipped_model_path("moe-tiny")) and demo.dataset == "arithmetic" and demo.max_steps == 3
    assert _load_config([f"model={tmp_path}"]).dataset == ""
    # A local directory of that name comes first.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "moe-tiny").mkdir()
    assert TrainConfig(model="moe-tiny").model == "moe-tiny"
    with pytest.raises(ConfigError, match="or name a shipped model: arithmetic-tiny, moe-tiny"):
        TrainConfig(model="no-such-model", dataset="arithmetic", reward_funcs=["arithmetic"]).validate()
