"""How far off-policy the update is: token log-ratios l = log pi_theta - log pi_old on the
minibatches after the first (the paper's Figures 2-3: ratios concentrated near 1, and the
within-sequence variance of l mostly below 0.02)."""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_RANGE = 0.5  # histogram of l over [-0.5, 0.5] in bins of 0.01; outliers go to the end bins
LOG_RATIO_BINS = 100
LOG10_VAR_RANGE = (-8.0, 0.0)  # histogram of log10 var(l) per sequence, 4 bins per decade
LOG10_VAR_BINS = 32
VAR_THRESHOLD = 0.02


class OffPolicyStats:
    """Histograms and counts, summed over the off-policy micro-batches of a step."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.log_ratio_hist = torch.zeros(LOG_RATIO_BINS, dtype=torch.float64, device=device)
        self.seq_var_hist = torch.zeros(LOG10_VAR_BINS, dtype=torch.float64, device=device)
        # tokens, tokens with |r - 1| <= 0.1, sum l, sum l^2, sequences, sequences with var(l) < 0.02
        self.counts = torch.zeros(6, dtype=torch.float64, device=device)

    def add(self, log_ratio_BT: Tensor, mask_BT: Tensor) -> None:
        mask = mask_BT > 0
        l = log_ratio_BT.detach().double()[mask]
        if l.numel() == 0:
            return
        edge = LOG_RATIO_RANGE * (1 - 1e-9)
        self.log_ratio_hist += torch.histc(l.clamp(-edge, edge), LOG_RATIO_BINS, -LOG_RATIO_RANGE, LOG_RATIO_RANGE)
        m = mask.double()
        n_B = m.sum(-1)
        full = torch.where(mask, log_ratio_BT.detach().double(), 0.0)
        mean_B = full.sum(-1) / n_B.clamp(min=1)
        var_B = (((full - mean_B.unsqueeze(-1)) ** 2) * m).sum(-1) / n_B.clamp(min=1)
        var_B = var_B[n_B >= 2]  # a one-token sequence has no within-sequence spread
        lo, hi = LOG10_VAR_RANGE
        log_var = torch.log10(var_B.clamp(min=10**lo)).clamp(max=hi - 1e-9)
        self.seq_var_hist += torch.histc(log_var, LOG10_VAR_BINS, lo, hi)
        self.counts += torch.stack([
            torch.tensor(float(l.numel()), dtype=torch.float64, device=l.device),
            ((l.exp() - 1).abs() <= 0.1).sum().double(), l.sum(), (l * l).sum(),
            torch.tensor(float(var_B.numel()), dtype=torch.float64, device=l.device),
            (var_B < VAR_THRESHOLD).sum().double(),
        ])

    def reduce(self, accelerator) -> "OffPolicyStats":
        """Sum over processes."""
        if accelerator.num_processes > 1:
            for name in ("log_ratio_hist", "seq_var_hist", "counts"):
                setattr(self, name, accelerator.reduce(getattr(self, name), "sum"))
        return self

    def metrics(self) -> dict[str, float]:
        tokens, near, s1, s2, seqs, low_var = self.counts.tolist()
        if tokens == 0:
            return {}
        mean = s1 / tokens
        out = {"offpolicy/frac_ratio_within_0.1": near / tokens,
               "offpolicy/log_ratio_std": max(s2 / tokens - mean * mean, 0.0) ** 0.5}
        if seqs:
            out["offpolicy/frac_seq_var_below_0.02"] = low_var / seqs
        return out

    def histograms(self) -> dict[str, list[int]]:
        return {"log_ratio_hist": [int(x) for x in self.log_ratio_hist.tolist()],
                "seq_var_hist": [int(x) for x in self.seq_var_hist.tolist()]}
