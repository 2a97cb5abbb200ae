"""End-to-end runs of the trainer on tiny models built from configs."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

import sapo
from sapo.model.tiny import save_tiny_model


def run(**kwargs):
    trainer = sapo.Trainer(sapo.TrainConfig(**kwargs))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    history = trainer.train()
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return trainer, before, after, history


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_each_loss_type_trains_every_parameter(base_config, loss_type):
    trainer, before, after, history = run(**{**base_config, "loss_type": loss_type})
    assert len(history) == 2
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    for row in history:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["frac_reward_zero_std"] < 1  # there was signal
    lines = [json.loads(x) for x in (trainer.logger.dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward", "reward_std", "rewards/first_char_parity/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "entropy", "grad_norm", "learning_rate",
                "time/rollout", "time/update", "tokens_per_second", "ratio/mean",
                f"{'sapo/gate_weight_mean' if loss_type == 'sapo' else loss_type + '/'}"):
        assert any(k.startswith(key) for k in lines[0]), key
    checkpoint = trainer.logger.dir / "checkpoint-2"
    reloaded = sapo.model.loading.load_model(checkpoint, torch.float32)
    for name, value in reloaded.named_parameters():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0)
    assert ((trainer.logger.dir / "completions.jsonl").read_text().count('"step": 2')
            == base_config.get("log_completions", 4))


def test_mixture_of_experts_model_trains(base_config, tmp_path):
    save_tiny_model(tmp_path / "moe", "qwen3_moe", hidden_size=32)
    _, before, after, history = run(**{**base_config, "model": str(tmp_path / "moe")})
    assert all(math.isfinite(r["loss"]) for r in history)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("experts" in k or "mlp" in k for k in moved) and any("attn" in k for k in moved)


def update_after_one_step(base_config, **kwargs):
    # SGD: the update is -lr * gradient, so float noise is not amplified as Adam's 1/|g| would.
    fresh = tempfile.mkdtemp(dir=Path(base_config["output_dir"]).parent)  # each run its own output_dir
    _, before, after, _ = run(**{**base_config, "max_steps": 1, "optim": "sgd", "learning_rate": 1.0,
                                 "output_dir": fresh, **kwargs})
    return {k: after[k] - before[k] for k in before}


def assert_same_update(a, b, rel=1e-4):
    """Equal up to float32 summation order: every difference below rel x the largest update."""
    scale = max(v.abs().max().item() for v in b.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert scale > 0 and worst <= rel * scale, (worst, scale)


def test_on_policy_all_objectives_give_the_same_update_and_off_policy_they_differ(base_config):
    on = {lt: update_after_one_step(base_config, loss_type=lt, num_minibatches=1) for lt in ("sapo", "grpo", "gspo")}
    for lt in ("grpo", "gspo"):
        assert_same_update(on[lt], on["sapo"])
    off = {lt: update_after_one_step(base_config, loss_type=lt, num_minibatches=4)
           for lt in ("sapo", "grpo", "gspo")}
    for a, b in (("sapo", "grpo"), ("sapo", "gspo"), ("grpo", "gspo")):
        with pytest.raises(AssertionError):
            assert_same_update(off[a], off[b], rel=1e-2)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_update_does_not_depend_on_micro_batch_size(base_config, aggregation):
    kw = dict(aggregation=aggregation, num_minibatches=2, prompts_per_step=2, num_generations=4)
    small = update_after_one_step(base_config, micro_batch_size=1, **kw)
    whole = update_after_one_step(base_config, micro_batch_size=4, **kw)
    assert_same_update(small, whole)


def test_rollout_logprobs_and_recomputed_ones_give_the_same_update(base_config):
    # Off-policy minibatches make pi_old matter: a misaligned or wrong-temperature sampling
    # log-prob would change every ratio.
    kw = dict(num_minibatches=4, temperature=0.7, logprob_chunk_size=16)
    from_rollout = update_after_one_step(base_config, use_rollout_logprobs=True, **kw)
    recomputed = update_after_one_step(base_config, use_rollout_logprobs=False, **kw)
    assert_same_update(from_rollout, recomputed)
    full_logits = update_after_one_step(base_config, use_rollout_logprobs=False, **{**kw, "logprob_chunk_size": 0})
    assert_same_update(full_logits, recomputed)


def test_padding_free_rows_give_the_same_update(base_config):
    from sapo.model.logprobs import _PACKING_VERIFIED

    # Recomputed pi_old and a reference model: all three log-prob passes take the layout.
    kw = dict(num_minibatches=2, use_rollout_logprobs=False, beta=0.1, max_steps=1, optim="sgd", learning_rate=1.0)
    updates = {}
    for padding_free in (False, True):
        out = tempfile.mkdtemp(dir=Path(base_config["output_dir"]).parent)
        trainer, before, after, _ = run(**{**base_config, **kw, "padding_free": padding_free, "output_dir": out})
        updates[padding_free] = {k: after[k] - before[k] for k in before}
        assert _PACKING_VERIFIED.get(trainer.model) is (True if padding_free else None)
        assert _PACKING_VERIFIED.get(trainer.ref_model) is (True if padding_free else None)
    assert_same_update(updates[True], updates[False])


def test_resume_is_exact(base_config, tmp_path):
    straight = {**base_config, "max_steps": 6, "output_dir": str(tmp_path / "straight")}
    _, _, final_straight, history = run(**straight)
    split = {**base_config, "output_dir": str(tmp_path / "split"), "save_steps": 3}
    run(**{**split, "max_steps": 3})
    _, _, final_split, resumed = run(**{**split, "max_steps": 6, "resume_from_checkpoint": "latest"})
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for k in final_straight:
        assert torch.equal(final_straight[k], final_split[k]), k
    assert resumed[-1]["reward"] == history[-1]["reward"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_conversational_dataset_and_reward_from_file(base_config, workdir):
    trainer, _, _, history = run(**{**base_config, "dataset": str(workdir / "chat.jsonl"),
                                    "reward_funcs": [f"{workdir / 'rewards.py'}:conversational_parity", "exact_match"],
                                    "reward_weights": [1.0, 2.0]})
    assert trainer.train_set.conversational
    first = trainer.tokenizer.decode(trainer.train_set.prompt_ids[0])
    assert first.startswith("<|user|>") and first.endswith("<|assistant|>")
    sample = json.loads((trainer.logger.dir / "completions.jsonl").read_text().splitlines()[0])
    assert sample["completion"][0]["role"] == "assistant"
    assert "rewards/conversational_parity/mean" in history[0] and "rewards/exact_match/mean" in history[0]


def test_kl_to_reference_model(base_config):
    trainer, _, _, history = run(**{**base_config, "beta": 0.1})
    assert trainer.ref_model is not None
    assert all(0 < r["kl"] < 1 for r in history)  # the policy drifts from the reference, a little
    plain, _, _, history = run(**{**base_config, "output_dir": base_config["output_dir"] + "-plain"})
    assert plain.ref_model is None and "kl" not in history[0]


def test_truncated_completions_can_be_left_out_of_the_loss(base_config):
    # A random model almost never says EOS within 2 tokens: every completion is truncated.
    kw = {**base_config, "max_completion_length": 2, "max_steps": 1, "optim": "sgd"}
    _, before, after, history = run(**kw, mask_truncated_completions=True)
    assert history[0]["completions/clipped_ratio"] == 1.0
    assert all(torch.equal(before[k], after[k]) for k in before)
    _, before, after, _ = run(**{**kw, "output_dir": kw["output_dir"] + "-kept"}, mask_truncated_completions=False)
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_evaluation_reports_held_out_reward(base_config, workdir):
    _, _, _, history = run(**{**base_config, "eval_dataset": str(workdir / "data.jsonl"), "eval_steps": 1})
    assert all(0.0 <= r["eval/reward"] <= 1.0 for r in history)


def test_a_registered_task_is_a_dataset_name(base_config):
    from sapo.tasks import TASKS, Task, register_task

    def load(split, seed=0):
        offset = 0 if split == "train" else 100
        return [{"prompt": f"{i + offset}=", "answer": str(i + offset)} for i in range(8)]

    register_task(Task("echo_numbers_test", load, "repeat the number"))
    try:
        trainer, _, _, history = run(**{**base_config, "dataset": "echo_numbers_test",
                                        "eval_dataset": "echo_numbers_test", "reward_funcs": ["exact_match"]})
        assert trainer.train_set.rows[0]["prompt"] != trainer.eval_set.rows[0]["prompt"]
        assert trainer.eval_set.rows[0]["prompt"].startswith("10")
        assert "eval/reward" in history[-1]
    finally:
        TASKS._entries.pop("echo_numbers_test")


def test_dropout_is_off_so_train_mode_matches_the_behaviour_pass(base_config, tmp_path):
    import torch

    from sapo.model.logprobs import completion_logprobs
    from sapo.model.tiny import save_tiny_model

    save_tiny_model(tmp_path / "drop", "qwen2", hidden_size=32, attention_dropout=0.5)
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "model": str(tmp_path / "drop")}))
    assert trainer.model.config.attention_dropout == 0.0
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ones = torch.ones_like(ids)
    trainer.model.train()
    train_mode, _ = completion_logprobs(trainer.model, ids[:, :3], ones[:, :3], ids[:, 3:], ones[:, 3:])
    trainer.model.eval()
    eval_mode, _ = completion_logprobs(trainer.model, ids[:, :3], ones[:, :3], ids[:, 3:], ones[:, 3:])
    assert torch.equal(train_mode, eval_mode)


def test_reward_functions_get_what_trl_passes_them(base_config, workdir, tmp_path):
    """trainer_state, log_metric and log_extra; async functions and numpy results work too."""
    (tmp_path / "trl_rewards.py").write_text('''
import numpy as np

SEEN = []


async def shaped(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
    SEEN.append((trainer_state.global_step, trainer_state.max_steps, len(completions)))
    lengths = [len(c) for c in completions]
    log_metric("mean_chars", sum(lengths) / len(lengths))
    log_extra("chars", lengths)
    return np.array([float(ord(c[0]) % 2) if c else 0.0 for c in completions])
''')
    config = sapo.TrainConfig(**{**base_config, "reward_funcs": [f"{tmp_path / 'trl_rewards.py'}:shaped"],
                                 "eval_dataset": str(workdir / "data.jsonl"), "eval_steps": 1,
                                 "eval_num_generations": 3, "log_completions": 8})  # no eval call of 8
    trainer = sapo.Trainer(config)
    trainer.train()
    seen = trainer.rewards[0].fn.__globals__["SEEN"]
    batch = base_config["prompts_per_step"] * base_config["num_generations"]
    assert [s for s in seen if s[2] == batch] == [(0, 2, batch), (1, 2, batch)]  # training: before each step
    assert {s[0] for s in seen if s[2] != batch} == {0, 1, 2}  # evaluations at the start and after each step
    lines = [json.loads(x) for x in (Path(base_config["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    completions = [json.loads(x)
                   for x in (Path(base_config["output_dir"]) / "completions.jsonl").read_text().splitlines()]
    for step in (1, 2):
        rows = [c for c in completions if c["step"] == step]
        assert len(rows) == 8 and all(c["chars"] == len(c["completion"]) for c in rows)
        logged = next(x for x in lines if x["step"] == step)
        assert logged["rewards/mean_chars"] == pytest.approx(sum(c["chars"] for c in rows) / len(rows))


def test_lengths_beyond_the_models_positions_are_refused_at_start_up(base_config, tmp_path):
    model = save_tiny_model(tmp_path / "short", "qwen2", hidden_size=32, max_position_embeddings=20)
    config = {**base_config, "model": str(model), "output_dir": str(tmp_path / "out")}
    with pytest.raises(sapo.ConfigError, match=r"max_prompt_length=16 \+ max_completion_length=6 = 22 tokens exceed "
                                                r"the model's 20 positions \(max_position_embeddings"):
        sapo.Trainer(sapo.TrainConfig(**config))
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    sapo.Trainer(sapo.TrainConfig(**{**config, "max_completion_length": 4}))  # 16 + 4 fits


def test_rope_scaling_stretches_the_positions_a_model_takes():
    from transformers import AutoConfig

    from sapo.model.loading import check_sequence_lengths

    yarn = AutoConfig.for_model("qwen2", max_position_embeddings=32768,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32768})
    check_sequence_lengths(yarn, 2048, 100_000)  # 131072 positions with YaRN x4
    with pytest.raises(sapo.ConfigError, match="exceed the model's 131072 positions"):
        check_sequence_lengths(yarn, 2048, 130_000)
    with pytest.raises(sapo.ConfigError, match="exceed the model's 32768 positions"):
        check_sequence_lengths(AutoConfig.for_model("qwen2", max_position_embeddings=32768), 2048, 32_000)
    # Llama 3.1 states the stretched length already (8192 x 8), beside the original.
    llama = AutoConfig.for_model("llama", max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    check_sequence_lengths(llama, 4096, 120_000)
    with pytest.raises(sapo.ConfigError, match="exceed the model's 131072 positions"):
        check_sequence_lengths(llama, 4096, 500_000)
