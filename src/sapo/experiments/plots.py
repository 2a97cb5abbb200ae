"""`sapo plot gates`: the paper's gating figure, computed by the library's own gate functions."""

from __future__ import annotations

from pathlib import Path

import torch

from ..algorithms import hard_gate, soft_gate
from ..algorithms.objectives import GRPO_EPSILON, GSPO_EPSILON, GSPO_EPSILON_HIGH


def gate_curves(ratio: torch.Tensor, *, tau_pos: float = 1.0, tau_neg: float = 1.05, grpo_eps: float = GRPO_EPSILON,
                gspo_eps: tuple[float, float] = (GSPO_EPSILON, GSPO_EPSILON_HIGH)
                ) -> dict[str, dict[str, torch.Tensor]]:
    """For each gate, its value f(r) and its weight df/dr on the given ratios, the weight taken
    by autograd through `soft_gate` / `hard_gate`: exactly what training back-propagates."""
    curves = {}
    gates = {
        f"SAPO A>0 (tau={tau_pos:g})": lambda r: soft_gate(r, tau_pos),
        f"SAPO A<0 (tau={tau_neg:g})": lambda r: soft_gate(r, tau_neg),
        f"GRPO A>0 (eps={grpo_eps:g})": lambda r: hard_gate(r, torch.ones_like(r, dtype=torch.bool),
                                                            grpo_eps, grpo_eps),
        f"GRPO A<0 (eps={grpo_eps:g})": lambda r: hard_gate(r, torch.zeros_like(r, dtype=torch.bool),
                                                            grpo_eps, grpo_eps),
        f"GSPO A>0 (eps_high={gspo_eps[1]:g})": lambda r: hard_gate(r, torch.ones_like(r, dtype=torch.bool), *gspo_eps),
        f"GSPO A<0 (eps={gspo_eps[0]:g})": lambda r: hard_gate(r, torch.zeros_like(r, dtype=torch.bool), *gspo_eps),
    }
    for name, gate in gates.items():
        r = ratio.detach().double().clone().requires_grad_()
        value = gate(r)
        (weight,) = torch.autograd.grad(value.sum(), r)
        curves[name] = {"ratio": ratio.detach().double(), "value": value.detach(), "weight": weight}
    return curves


def plot_gates(out: str | Path, *, tau_pos: float = 1.0, tau_neg: float = 1.05) -> Path:
    """Left: f(r) per gate; right: the gradient weight df/dr (SAPO's sech^2 kernel against the
    0/1 indicator of hard clipping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Points 1 +- 1e-5 apart resolve GSPO's band of a few 1e-4 around r = 1.
    ratio = torch.cat([torch.linspace(0.0, 3.0, 601, dtype=torch.float64),
                       torch.linspace(0.998, 1.002, 401, dtype=torch.float64)]).sort().values
    curves = gate_curves(ratio, tau_pos=tau_pos, tau_neg=tau_neg)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"SAPO": "-", "GRPO": "--", "GSPO": ":"}
    for name, c in curves.items():
        style = styles[name[:4]]
        color = "tab:blue" if "A>0" in name else "tab:red"
        width = 2.0 if name.startswith("SAPO") else 1.2
        left.plot(c["ratio"], c["value"], style, color=color, lw=width, label=name)
        right.plot(c["ratio"], c["weight"], style, color=color, lw=width, label=name)
    left.set(title="gate f(r): the objective per unit advantage", xlabel="importance ratio r", ylabel="f(r)",
             ylim=(0, 4.2))
    right.set(title="gradient weight df/dr", xlabel="importance ratio r", ylabel="df/dr", ylim=(-0.05, 1.1))
    for ax in (left, right):
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper right")
    fig.suptitle("SAPO's soft gate vs GRPO/GSPO hard clipping (computed by sapo.soft_gate / sapo.hard_gate)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
