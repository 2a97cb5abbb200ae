"""`sapo warmstart`: the shipped tiny model, regenerated from scratch.

A small Llama-architecture decoder with a character-level tokenizer is trained by supervised
fine-tuning on a built-in task's train split (prompt -> reference completion + EOS) for a
fixed, small number of steps: enough to learn the format and part of the skill, not enough to
master it, so that RL has room to improve it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model.tiny import char_tokenizer, tiny_causal_lm
from .tasks import get_task


def warmstart(out_dir: str | Path, *, task: str = "arithmetic", task_kwargs: dict | None = None, steps: int = 1300,
              batch_size: int = 64, learning_rate: float = 3e-3, hidden_size: int = 128, num_layers: int = 4,
              seed: int = 0, log_every: int = 50, progress=print) -> Path:
    """Train and save the model; returns out_dir. Deterministic for a given seed and torch build."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ValueError(f"{out_dir} exists and does not hold a model: choose a new or empty directory")
    spec = get_task(task)
    if spec.target is None:
        raise ValueError(f"task {task!r} has no reference completions to warm-start from")
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, "llama", hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    rows = spec.load("train", **(task_kwargs or {}))
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    targets = [tokenizer(str(r[spec.target]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        input_ids, labels = _pack([prompts[i] for i in batch], [targets[i] for i in batch], tokenizer.pad_token_id)
        logits = model(input_ids=input_ids,
                       attention_mask=(labels != -100) | (input_ids != tokenizer.pad_token_id)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress and (step + 1) % log_every == 0:
            progress(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _pack(prompts: list[list[int]], targets: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+target ids, and labels that are -100 except on the target tokens."""
    length = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        input_ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    return input_ids, labels
