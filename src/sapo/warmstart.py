"""`sapo warmstart`: the shipped tiny models, regenerated from scratch.

A small decoder with a character-level tokenizer is trained by supervised fine-tuning on a
built-in task's train split (prompt -> reference completion + EOS) for a fixed, small number of
steps: enough to learn the format and part of the skill, not enough to master it, so that RL has
room to improve it. `arch="llama"` (dense) made `assets/arithmetic-tiny`; `arch="qwen3_moe"` (a
Qwen3-MoE, top-2 of 4 experts in every layer, trained with the router's load-balancing loss)
made `assets/moe-tiny`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model.tiny import char_tokenizer, tiny_causal_lm
from .tasks import get_task

ARCHS = ("llama", "qwen3_moe")
# Per architecture: SFT steps and learning rate, chosen so that the model stops while it is still
# learning the skill (held-out Pass@1 about 0.2; docs/demo.md), and the model's settings besides
# hidden_size and num_layers. The MoE (trained with the load-balancing loss of _balance_loss,
# which keeps each layer's 4 experts at 17-35% of the top-2 slots) learns the carry sooner:
# held-out Pass@1 0.06 at 200 steps, 0.19 at 250, 0.35 at 300.
ARCH_DEFAULTS = {
    "llama": dict(steps=1300, learning_rate=3e-3, model={}),
    "qwen3_moe": dict(steps=250, learning_rate=3e-3, model=dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
        router_aux_loss_coef=0.01)),
}


def warmstart(out_dir: str | Path, *, task: str = "arithmetic", task_kwargs: dict | None = None,
              steps: int | None = None, batch_size: int = 64, learning_rate: float | None = None,
              hidden_size: int = 128, num_layers: int = 4, seed: int = 0, log_every: int = 50, progress=print,
              arch: str = "llama", **model_overrides) -> Path:
    """Train and save the model; returns out_dir. Deterministic for a given seed and torch build.

    `arch`: "llama" (dense) or "qwen3_moe"; `steps` and `learning_rate` default to the arch's
    (ARCH_DEFAULTS), and `model_overrides` (e.g. num_experts=8) go to the model's config. A MoE
    is trained with its router's load-balancing loss, weighted by its config's
    `router_aux_loss_coef`, so that every expert gets tokens."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {list(ARCHS)}")
    defaults = ARCH_DEFAULTS[arch]
    steps = defaults["steps"] if steps is None else steps
    learning_rate = defaults["learning_rate"] if learning_rate is None else learning_rate
    moe = arch == "qwen3_moe"
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ValueError(f"{out_dir} exists and does not hold a model: choose a new or empty directory")
    spec = get_task(task)
    if spec.target is None:
        raise ValueError(f"task {task!r} has no reference completions to warm-start from")
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, arch, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                           **{**defaults["model"], **model_overrides})
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
        attention_mask = (labels != -100) | (input_ids != tokenizer.pad_token_id)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    **({"output_router_logits": True} if moe else {}))
        logits = out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        if moe:
            aux = _balance_loss(out.router_logits, model.config, attention_mask)
            loss = loss + model.config.router_aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress and (step + 1) % log_every == 0:
            balance = f"  balance {aux.item():.3f}" if moe else ""
            progress(f"step {step + 1}/{steps}  loss {loss.item():.4f}{balance}  {time.perf_counter() - start:.0f}s")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _balance_loss(router_logits: tuple[torch.Tensor, ...], config, attention_mask: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer load-balancing loss of each layer over the real tokens, averaged
    over layers: transformers' load_balancing_loss_func pools the layers' loads first, which lets
    an expert of one layer starve while another layer's copy is busy. num_experts_per_tok (2.0
    here) when every expert gets an equal share."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((layer,), config.num_experts, config.num_experts_per_tok,
                                                 attention_mask) for layer in router_logits]).mean()


def _pack(prompts: list[list[int]], targets: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+target ids, and labels that are -100 except on the target tokens."""
    length = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        input_ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    return input_ids, labels
