"""Forward-pass machinery: loading a policy and its tokenizer (loading.py), the log-probabilities
of sampled completions (logprobs.py) through a chunked output layer (chunked_logprobs.py) on
padding-free rows (packing.py), and tiny models built from configs (tiny.py)."""
