"""Rewrite the config reference table in docs/training.md from TrainConfig's field docstrings."""

import re
from pathlib import Path

from sapo.cli import config_reference

path = Path(__file__).resolve().parents[1] / "docs" / "training.md"
text = path.read_text()
table = re.compile(r"\| field \| default \| meaning \|\n(?:\|.*\|\n)+")
path.write_text(table.sub(lambda _: config_reference(markdown=True) + "\n", text, count=1))
print(f"updated {path}")
