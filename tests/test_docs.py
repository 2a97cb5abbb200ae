"""The Python examples in README.md and docs/ run as written (blocks fenced as
```python no-run need files that the reader has, and are only shown)."""

import re
from pathlib import Path

import pytest
import torch

from sapo.algorithms import registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_run(path):
    blocks = python_blocks(path)
    saved = dict(registry.POLICY_LOSSES._entries)
    B, T = 4, 5
    namespace = {
        "torch": torch,
        "logprobs": torch.randn(B, T, requires_grad=True),
        "old_logprobs": torch.randn(B, T),
        "advantages": torch.randn(B),
        "mask": torch.ones(B, T),
        "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0] * 2),
    }
    try:
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)
    finally:
        registry.POLICY_LOSSES._entries.clear()
        registry.POLICY_LOSSES._entries.update(saved)


def test_training_docs_hold_the_current_config_reference():
    from sapo.cli import config_reference

    assert config_reference(markdown=True) in (ROOT / "docs" / "training.md").read_text()
