"""Experiments: `sapo compare` and `sapo sweep` (runs.py) train arms of configs over seeds, then
a report (report.py) and the gating figure (plots.py)."""
