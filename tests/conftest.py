import json

import pytest

from sapo.model.tiny import save_tiny_model

REWARDS_PY = '''
def first_char_parity(prompts, completions, **kwargs):
    """A reward that differs between samples of a random model: signal for every objective."""
    return [float(ord(c[0]) % 2) if c else 0.0 for c in completions]


def conversational_parity(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [float(ord(t[0]) % 2) if t else 0.0 for t in texts]


def raises_on_seven(prompts, completions, answer, **kwargs):
    return [1 / 0 if a == "7" else 0.0 for a in answer]


def wrong_length(prompts, completions, **kwargs):
    return [1.0]
'''


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A tiny Qwen2 model, a small addition dataset (standard and conversational), reward functions."""
    root = tmp_path_factory.mktemp("sapo")
    save_tiny_model(root / "model", "qwen2", hidden_size=32)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    (root / "rewards.py").write_text(REWARDS_PY)
    return root


@pytest.fixture
def base_config(workdir, tmp_path):
    """Keyword arguments of a seconds-long run on the tiny model."""
    return dict(
        model=str(workdir / "model"), dataset=str(workdir / "data.jsonl"),
        reward_funcs=[f"{workdir / 'rewards.py'}:first_char_parity"], num_generations=4, prompts_per_step=2,
        max_completion_length=6, max_prompt_length=16, num_minibatches=2, micro_batch_size=4, learning_rate=1e-2,
        max_steps=2, output_dir=str(tmp_path / "out"), seed=0, max_grad_norm=0.0,
    )
