"""The training loop (trainer.py) and its phases: 1. rollout, 2-3. reward and advantage, 4. policy
update, 5. evaluate, 6. log, 7. checkpoint; run identity, diagnostics and the end-of-run summary.
`sapo.Trainer` and `sapo.train` are trainer.py's."""
