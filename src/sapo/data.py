"""Prompts: loading TRL-style rows, rendering them to token ids, and which prompts each step uses."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .rewards.math_answers import last_boxed
from .tasks import available_tasks, get_task

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(spec: str, *, split: str = "train", task_kwargs: dict[str, Any] | None = None,
              field: str = "dataset") -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json / .parquet file, or of a built-in task (whose problems
    depend on its own `seed` option, 0 by default, not on the training seed: runs with
    different seeds are evaluated on the same held-out problems)."""
    path = Path(spec)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise ConfigError(f"{field} file {spec!r} does not exist")
        if path.stat().st_size == 0:
            raise ConfigError(f"{field} file {spec!r} is empty")
        import datasets

        no_rows = ConfigError(f"{field} file {spec!r} has no rows (it parses to zero records); add rows, or "
                              f"point {field} at another file")
        try:
            table = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as err:
            if _holds_no_records(path):  # datasets says only 'Instruction "train" corresponds to no data'
                raise no_rows from None
            raise ConfigError(f"could not read {field} {spec!r}: {type(err).__name__}: {err}") from err
        if len(table) == 0:
            raise no_rows
        return table.to_list()
    if spec in available_tasks():
        task = get_task(spec)
        params = list(inspect.signature(task.load).parameters.values())[1:]  # after `split`
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
        unknown = [] if takes_any else sorted(set(task_kwargs or {}) - set(accepted))
        if unknown:
            raise ConfigError(f"task_kwargs: task {spec!r} has no option {', '.join(map(repr, unknown))} "
                              f"(options: {', '.join(accepted)}; defaults: {task.options})")
        try:
            return task.load(split, **(task_kwargs or {}))
        except ValueError as err:
            raise ConfigError(f"{err} (options: {task.options})") from None
    raise ConfigError(f"{field}={spec!r} is neither a .jsonl/.json/.parquet file nor a built-in task "
                      f"(built-in: {available_tasks()})")


def _holds_no_records(path: Path) -> bool:
    """Whether a data file that datasets could not read is simply empty of rows: blank lines only
    (.jsonl), an empty list or object (.json), or a table of zero rows (.parquet)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet

            return pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0
        if path.stat().st_size > 1 << 20:  # an empty container is never this large
            return False
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return not text.strip()
        return json.loads(text) in ([], {})
    except (OSError, ValueError, ImportError):
        return False


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


@dataclass
class PromptSet:
    """Rows whose prompts have been rendered and tokenised, ready for rollouts."""

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    conversational: bool
    pad_token_id: int = 0
    """What left-pads the prompts in a batch (masked out; the tokenizer's pad token)."""

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int]) -> dict[str, list]:
        """Every column but `prompt`, for the given rows: keyword arguments of the reward functions."""
        names = [k for k in self.rows[0] if k != "prompt"] if self.rows else []
        return {k: [self.rows[i].get(k) for i in indices] for k in names}


def prepare_prompts(rows: list[dict[str, Any]], tokenizer, *, max_prompt_length: int, filter_overlong: bool,
                    name: str = "dataset") -> PromptSet:
    if not rows:
        raise ConfigError(f"{name} has no rows")
    if "prompt" not in rows[0]:
        raise ConfigError(f"{name} has no 'prompt' column (columns: {sorted(rows[0])}); rename the column that "
                          "holds the prompt text or messages to 'prompt'")
    conversational = is_conversational(rows[0]["prompt"])
    texts = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if conversational != is_conversational(prompt) or not (conversational or isinstance(prompt, str)):
            raise ConfigError(f"{name} row {i}: 'prompt' must be a string in every row, or a list of "
                              f"{{'role', 'content'}} messages in every row; got {type(prompt).__name__}")
        if not prompt:
            raise ConfigError(f"{name} row {i}: the prompt is empty")
        if conversational:
            if tokenizer.chat_template is None:
                raise ConfigError(f"{name} is conversational but the tokenizer has no chat template")
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(prompt)
    # Templates already carry their special tokens, so none are added (as TRL does).
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ConfigError(f"{name} row {empty[0]}: the prompt tokenizes to nothing ({len(empty)} such rows)")
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_length]
    if too_long and not filter_overlong:
        examples = ", ".join(f"row {i} ({len(ids[i])} tokens)" for i in too_long[:5])
        raise ConfigError(
            f"{len(too_long)} of {len(rows)} prompts in {name} are longer than max_prompt_length={max_prompt_length} "
            f"tokens: {examples}{', ...' if len(too_long) > 5 else ''}. Raise max_prompt_length or set "
            "filter_overlong_prompts=true to drop them"
        )
    dropped = set(too_long)
    keep = [i for i in range(len(rows)) if i not in dropped]
    if not keep:
        raise ConfigError(f"every prompt in {name} is longer than max_prompt_length={max_prompt_length}")
    return PromptSet([rows[i] for i in keep], [ids[i] for i in keep], conversational, tokenizer.pad_token_id or 0)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: the same parts give the same seed on every process and run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompts_for_step(step: int, prompts_per_step: int, num_rows: int, seed: int) -> list[int]:
    """Row indices of a step: consecutive slices of a fresh shuffle of the rows each epoch. A
    function of the step alone, so a resumed run continues exactly where it stopped."""
    out = []
    for position in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(position, num_rows)
        out.append(_epoch_order(seed, epoch, num_rows)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_rows: int) -> list[int]:
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_rows, generator=generator).tolist()


def gsm8k_rows(path: str,
               template: str = "{question}\nPut your final answer within \\boxed{{}}.") -> list[dict[str, Any]]:
    """A local GSM8K-style file (`question`, `answer` ending in "#### 42") as trainer rows:
    `prompt` from the template, `answer` the number after ####, without thousands separators."""
    rows = []
    for i, row in enumerate(load_rows(path)):
        if "question" not in row or "answer" not in row or "####" not in str(row["answer"]):
            raise ConfigError(f"{path} row {i}: a GSM8K row needs 'question' and an 'answer' ending in '#### <number>'")
        gold = str(row["answer"]).split("####")[-1].strip().replace(",", "")
        rows.append({"prompt": template.format(question=row["question"]), "answer": gold})
    return rows


def math_rows(path: str,
              template: str = "{question}\nPut your final answer within \\boxed{{}}.") -> list[dict[str, Any]]:
    """A local MATH-style file (`problem`, `solution` with a \\boxed{} answer) as trainer rows."""
    rows = []
    for i, row in enumerate(load_rows(path)):
        gold = last_boxed(str(row.get("solution", "")))
        if "problem" not in row or gold is None:
            raise ConfigError(f"{path} row {i}: a MATH row needs 'problem' and a 'solution' with a \\boxed{{}} answer")
        rows.append({"prompt": template.format(question=row["problem"]), "answer": gold,
                     **{k: v for k, v in row.items() if k in ("level", "type")}})
    return rows
