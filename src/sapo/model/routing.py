"""Mixture-of-Experts routing: record the experts each token went to, replay them (routing
replay, R2 / R3), measure how often routing changed, and the router's load-balancing loss.

Why replay: a token's importance ratio pi_theta / pi_old compares two forward passes. In a MoE
model a small change of the weights (or of the numerics: another engine, another batch) can
move a token's top-k experts, and then the two passes run different sub-networks: the ratio
moves far more than the update that caused it (the paper's abstract: token-level ratios have
high variance, "exacerbated in Mixture-of-Experts models"; hence its GRPO baseline is GRPO-R2,
GRPO with routing replay; docs/moe.md). Replay forces the recorded experts in every update
forward of the batch, so the ratio measures the change of the weights only; the gate weights
are recomputed from the current router's logits over the recorded experts, so the router
still learns (as verl/slime and prime-rl do).

A token is addressed by (sample, position): its sample's index in the rollout batch and its
position in that sample's unpadded sequence (prompt, then completion; the model's position
id). The address does not depend on the layout, so routing recorded on padded rows replays
on padding-free rows, in other micro-batches, or from the sampler's KV-cache decoding. A
`RoutingTable` holds, for each router, the k experts of every address (-1: not recorded).

Routers are found by type: the top-k router modules of the MoE families transformers ships
(`ROUTERS`), whose forward returns (router_logits, gate_weights, expert_indices). A hook on
each router does the work while a `RoutingCall` is active and bound to the addresses of the
forward's tokens; outside one, the routers run as they are.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def _softmax_gate(router: nn.Module, logits_NE: Tensor, experts_Nk: Tensor) -> Tensor:
    """Softmax over all experts, the chosen ones' probabilities, renormalised over the k where the
    router does so: the computation of Qwen2/Qwen3-MoE's, OLMoE's and Mixtral's routers with the
    experts given instead of their top-k (identical values when they are the top-k)."""
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    weights_Nk = probs_NE.gather(1, experts_Nk)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises and has no such flag
        weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
    return weights_Nk


def _sigmoid_gate(router: nn.Module, logits_NE: Tensor, experts_Nk: Tensor) -> Tensor:
    """DeepSeek-V3's: sigmoid scores of the chosen experts (the correction bias only chooses),
    renormalised if norm_topk_prob, times routed_scaling_factor."""
    weights_Nk = logits_NE.float().sigmoid().gather(1, experts_Nk)
    if router.norm_topk_prob:
        weights_Nk = weights_Nk / (weights_Nk.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_Nk * router.routed_scaling_factor


# Router class name -> its gate weights for given experts. Each returns (logits, weights, indices).
ROUTERS = {
    "Qwen3MoeTopKRouter": _softmax_gate,
    "Qwen2MoeTopKRouter": _softmax_gate,
    "OlmoeTopKRouter": _softmax_gate,
    "MixtralTopKRouter": _softmax_gate,
    "DeepseekV3TopkRouter": _sigmoid_gate,
}


def find_routers(model) -> list[nn.Module]:
    """The model's top-k routers, in module order (one per MoE layer)."""
    return [m for m in model.modules() if type(m).__name__ in ROUTERS]


def is_moe(model) -> bool:
    """Whether the model's config describes a mixture of experts."""
    config = getattr(model, "config", None)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    return any((getattr(config, name, None) or 0) > 1 for name in names)


def check_routing_support(model, routing_replay: str, router_aux_loss_coef: float) -> None:
    """Refuse, before training, a replay or aux loss the model cannot have."""
    if routing_replay == "none" and not router_aux_loss_coef:
        return
    name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    field_name = f"routing_replay={routing_replay}" if routing_replay != "none" else "router_aux_loss_coef > 0"
    if not is_moe(model):
        raise ConfigError(f"{field_name}: {name} is not a mixture-of-experts model; set routing_replay=none and "
                          "router_aux_loss_coef=0")
    if not find_routers(model):
        raise ConfigError(f"{field_name}: routers of MoE model type {name!r} are not supported (supported: "
                          f"{', '.join(sorted(ROUTERS))}); set routing_replay=none and router_aux_loss_coef=0")
    if router_aux_loss_coef and _balancing_loss(model) is None:
        raise ConfigError(f"router_aux_loss_coef > 0: {name} has no load-balancing loss in transformers (it balances "
                          "its experts otherwise); set router_aux_loss_coef=0")


def _balancing_loss(model):
    """transformers' load_balancing_loss_func of the model's own module, if it has one."""
    return getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)


@dataclass
class TokenAddresses:
    """Where the tokens of one forward pass come from. The router sees the (R, L) inputs
    flattened to R * L rows; token `flat_M[m]` is (sample_M[m], position_M[m]) for every m. A
    token may stand for several samples (a prompt shared by a padding-free row, or by the G
    samples of a sampler's prefill): it is recorded for each of them and replayed from the first."""

    flat_M: Tensor
    sample_M: Tensor
    position_M: Tensor
    rows: int
    length: int

    def first(self) -> tuple[Tensor, Tensor, Tensor]:
        """Each token once (the first of its entries): flat, sample, position."""
        flat, order = self.flat_M.unique(sorted=True, return_inverse=True)
        first = torch.full((len(flat),), len(self.flat_M), dtype=torch.long, device=self.flat_M.device)
        first.scatter_reduce_(0, order, torch.arange(len(self.flat_M), device=self.flat_M.device), "amin")
        return flat, self.sample_M[first], self.position_M[first]

    @classmethod
    def padded(cls, attention_mask_RL: Tensor, position_ids_RL: Tensor) -> TokenAddresses:
        """Rows that are samples (row r is sample r), padding left out."""
        R, L = attention_mask_RL.shape
        valid = attention_mask_RL.bool().reshape(-1)
        flat = valid.nonzero().squeeze(1)
        return cls(flat, flat // L, position_ids_RL.reshape(-1)[flat], R, L)

    @classmethod
    def prefill(cls, mask_QP: Tensor, positions_QP: Tensor, group_size: int) -> TokenAddresses:
        """A sampler's prefill: prompt q's tokens stand for its G samples q*G .. q*G+G-1."""
        one = cls.padded(mask_QP, positions_QP)
        G = group_size
        offsets = torch.arange(G, device=one.flat_M.device).repeat(len(one.flat_M))
        return cls(one.flat_M.repeat_interleave(G), one.sample_M.repeat_interleave(G) * G + offsets,
                   one.position_M.repeat_interleave(G), one.rows, one.length)

    @classmethod
    def step(cls, position_B: Tensor) -> TokenAddresses:
        """A decoding step: row b's one token is sample b's, at its next position."""
        rows = torch.arange(len(position_B), device=position_B.device)
        return cls(rows, rows, position_B, len(position_B), 1)

    @classmethod
    def packed(cls, segments_RL: Tensor, position_ids_RL: Tensor, row_samples: list[list[int]]) -> TokenAddresses:
        """Padding-free rows (packing.py): a completion token is its segment's sample; a prompt
        token stands for every sample of its row."""
        from .packing import PROMPT

        R, L = segments_RL.shape
        seg = segments_RL.reshape(-1)
        completion = (seg >= 0).nonzero().squeeze(1)
        prompt_rc = (segments_RL == PROMPT).nonzero()
        per_row = torch.tensor([len(row_samples[r]) for r in range(R)], device=seg.device)
        repeats = per_row[prompt_rc[:, 0]]
        prompt_flat = (prompt_rc[:, 0] * L + prompt_rc[:, 1]).repeat_interleave(repeats)
        # the k-th repeat of a row's prompt token is the row's k-th sample
        starts = torch.cumsum(repeats, 0) - repeats
        k = torch.arange(int(repeats.sum()), device=seg.device) - starts.repeat_interleave(repeats)
        members = [torch.tensor(row_samples[r], device=seg.device) for r in range(R)]
        padded = torch.nn.utils.rnn.pad_sequence(members, batch_first=True, padding_value=-1)
        prompt_sample = padded[prompt_rc[:, 0].repeat_interleave(repeats), k]
        flat = torch.cat([completion, prompt_flat])
        sample = torch.cat([seg[completion], prompt_sample])
        return cls(flat, sample, position_ids_RL.reshape(-1)[flat], R, L)

    def valid_mask(self) -> Tensor:
        """(R, L) 1 where a token of some sample sits, 0 at padding (for the balancing loss)."""
        mask = torch.zeros(self.rows * self.length, dtype=torch.float32, device=self.flat_M.device)
        mask[self.flat_M] = 1.0
        return mask.view(self.rows, self.length)


@dataclass
class RoutingTable:
    """experts_XBSk[x, b, s]: the k experts router x chose for sample b's token at position s
    (-1: none recorded)."""

    experts_XBSk: Tensor

    @classmethod
    def empty(cls, routers: list[nn.Module], samples: int, positions: int, device) -> RoutingTable:
        k = max(int(getattr(r, "top_k", 1)) for r in routers)
        return cls(torch.full((len(routers), samples, positions, k), -1, dtype=torch.int32, device=device))

    @classmethod
    def from_engine(cls, routed_BSXk: Tensor) -> RoutingTable:
        """From the engine interface's `Generation.routed_experts` (B, S, layers, k)."""
        return cls(routed_BSXk.permute(2, 0, 1, 3).to(torch.int32).contiguous())

    def to_engine(self) -> Tensor:
        return self.experts_XBSk.permute(1, 2, 0, 3)

    def select(self, idx: list[int]) -> RoutingTable:
        return RoutingTable(self.experts_XBSk[:, idx])


@dataclass
class RoutingStats:
    """Counts over the update's forwards, summed over routers: tokens compared with the table,
    those whose top-k set differs from it, and each router's expert loads."""

    compared: Tensor | float = 0.0
    changed: Tensor | float = 0.0
    loads: dict[int, Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {}
        if float(self.compared):
            out["moe/routing_changed_frac"] = float(self.changed) / float(self.compared)
        entropies = []
        for load_E in self.loads.values():
            p = load_E / load_E.sum().clamp(min=1)
            entropies.append(float(-(p * p.clamp(min=1e-30).log()).sum() / math.log(len(p))))
        if entropies:
            out["moe/load_entropy"] = sum(entropies) / len(entropies)
        return out


def minibatch_metrics(per_minibatch: list[RoutingStats]) -> dict[str, float]:
    """The update's routing metrics over all its minibatches, and the changed fraction of each
    (`moe/routing_changed_frac/minibatch_k`): the first is on-policy, the later ones show how
    far routing drifts as the policy moves."""
    total = RoutingStats()
    out = {}
    for k, stats in enumerate(per_minibatch, start=1):
        total.compared, total.changed = total.compared + stats.compared, total.changed + stats.changed
        for x, load in stats.loads.items():
            total.loads[x] = total.loads.get(x, 0) + load
        if float(stats.compared):
            out[f"moe/routing_changed_frac/minibatch_{k}"] = float(stats.changed) / float(stats.compared)
    return {**total.metrics(), **out}


class RoutingCall:
    """One forward pass (and its backward) under a router hook: `mode` is "record" (write the
    chosen experts into `table`), "compare" (count changes against it) or "replay" (force it).
    `samples` maps the forward's local sample index to the table's. Inactive until `bind`."""

    def __init__(self, mode: str, table: RoutingTable, samples: Tensor, *, stats: RoutingStats | None = None,
                 collect_logits: bool = False) -> None:
        self.mode, self.table, self.samples, self.stats = mode, table, samples, stats
        self.collect_logits = collect_logits
        self.addresses: TokenAddresses | None = None
        self.logits: dict[int, Tensor] = {}
        self._first = None
        self._seen: set[int] = set()

    def bind(self, addresses: TokenAddresses) -> None:
        self.addresses, self._first = addresses, None
        self._seen.clear()

    def first(self):
        if self._first is None:
            self._first = self.addresses.first()
        return self._first


class MoERouting:
    """Hooks on a model's routers, doing what the active `RoutingCall` asks."""

    def __init__(self, model) -> None:
        self.model = model
        self.routers = find_routers(model)
        self.index = {id(r): i for i, r in enumerate(self.routers)}
        self.call: RoutingCall | None = None
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def active(self, call: RoutingCall | None):
        """The call is in force for the forward passes (and backward recomputations) in the block."""
        previous, self.call = self.call, call
        try:
            yield call
        finally:
            self.call = previous

    def new_table(self, samples: int, positions: int, device) -> RoutingTable:
        return RoutingTable.empty(self.routers, samples, positions, device)

    def aux_loss(self, call: RoutingCall) -> Tensor | None:
        """transformers' load-balancing loss over the routers' logits of the call's forward, on its
        tokens (padding left out)."""
        if not call.logits or call.addresses is None:
            return None
        router = self.routers[0]
        logits = tuple(call.logits[i] for i in sorted(call.logits))
        return _balancing_loss(self.model)(logits, router.num_experts, router.top_k, call.addresses.valid_mask())

    def _hook(self, module: nn.Module, args, output):
        call = self.call
        if call is None or call.addresses is None:
            return None
        logits_NE, weights_Nk, own_Nk = output
        x = self.index[id(module)]
        again = x in call._seen  # a recomputation in backward (gradient checkpointing): force, count nothing
        call._seen.add(x)
        if call.collect_logits and not again:
            call.logits[x] = logits_NE
        if call.mode == "record":
            a = call.addresses
            call.table.experts_XBSk[x, call.samples[a.sample_M], a.position_M] = own_Nk[a.flat_M].to(torch.int32)
            return None
        flat_U, sample_U, position_U = call.first()
        forced_Nk = own_Nk
        if call.table is not None:
            recorded_Uk = call.table.experts_XBSk[x, call.samples[sample_U], position_U].to(own_Nk.dtype)
            known_U = (recorded_Uk >= 0).all(-1)  # unknown: a token the recording pass did not see
            if call.mode == "replay" and bool(known_U.any()):
                forced_Nk = own_Nk.clone()
                forced_Nk[flat_U[known_U]] = recorded_Uk[known_U]
            if call.stats is not None and not again:
                changed = (own_Nk[flat_U].sort(-1).values != recorded_Uk.sort(-1).values).any(-1) & known_U
                call.stats.compared = call.stats.compared + known_U.sum()  # tensors: no host sync per layer
                call.stats.changed = call.stats.changed + changed.sum()
        if call.stats is not None and not again:
            load = torch.bincount(forced_Nk[flat_U].reshape(-1), minlength=logits_NE.shape[-1]).float()
            call.stats.loads[x] = call.stats.loads.get(x, 0) + load
        if forced_Nk is own_Nk:
            return None
        weights = ROUTERS[type(module).__name__](module, logits_NE, forced_Nk).to(weights_Nk.dtype)
        return logits_NE, weights, forced_Nk
