"""The `vllm` engine in server mode: the trainer talks HTTP to a `vllm serve` process and never
imports vllm. Only the routes and payloads below are used, written from vLLM's source:

- `GET /health`, `GET /v1/models` (the served model's id and `max_model_len`), `POST
  /detokenize` (vllm/entrypoints/serve/tokenize), `GET /server_info` (dev mode): start-up checks.
- `POST /v1/completions` (vllm/entrypoints/openai/protocol.py, CompletionRequest): one request
  per group, the prompt as token ids, `n` = G samples under the group's `seed`, `logprobs: 0`
  (the log-probability of each drawn token; the server must run with `--logprobs-mode
  processed_logprobs` so they are those of the temperature-scaled distribution it samples from),
  `return_token_ids` for the drawn ids; `finish_reason` "stop" or "length" per choice.
- Weight sync through vLLM's weight-transfer interface with its `disk` backend
  (vllm/distributed/weight_transfer/disk_engine.py; the server runs with `VLLM_SERVER_DEV_MODE=1
  --weight-transfer-config '{"backend": "disk"}'`): `POST /init_weight_transfer_engine
  {"init_info": {}}` once, then per sync `/pause`, `/start_weight_update`, `/update_weights
  {"update_info": {"path": DIR}}`, `/finish_weight_update`, `/resume` (the routes of
  vllm/entrypoints/serve/rlhf/api_router.py and the HTTP client in
  vllm/distributed/weight_transfer/clients.py). DIR is a safetensors checkpoint the trainer
  writes where the server can read it: the data plane is a shared disk, so nothing of vLLM's
  (NCCL communicators, CUDA IPC handles) is needed on the trainer's side.

docs/engines.md says what of this was run against a real vLLM (nothing yet) and what instead.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import ConfigError, EngineError
from .base import Generation, SamplingSettings, VLLMSettings, generation_from_lists

API_KEY_ENV = "VLLM_API_KEY"
"""The environment variable vLLM's server reads its --api-key from; the client sends it as a
bearer token when it is set (kept out of config.yaml)."""
REPLY_TIMEOUT = 3600.0
"""Seconds one reply may take (a whole group's generation at long lengths on a busy server)."""
MAX_REQUESTS_IN_FLIGHT = 64
"""Groups requested at once; the server batches them (its own --max-num-seqs bounds the batch)."""
PROBE_TEXT = "Probe 12 + 34 = 46; x^2 - 1 = (x - 1)(x + 1). Grüße, 数学!\n\tend"
"""Text whose tokens both sides must agree on, and whose log-probabilities both sides compute."""
WEIGHTS_TOLERANCE = 0.1
"""Largest mean |log p_server - log p_trainer| (nats) over the probe's tokens that still counts
as the same weights: bfloat16 serving of float32 weights moves them by far less, another
checkpoint by far more."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: the trainer talks to the server it was given and no other."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# Direct connections (no proxy from the environment) and no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def full_state_dict(model) -> dict:
    """The whole model's weights on the main process (an all-gather of a sharded model, which
    every process takes part in; the others get an empty dict)."""
    from ..model.sharding import is_sharded

    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class VLLMServerEngine:
    """Samples from a running `vllm serve`. `connect` checks the server (flags, model, tokenizer,
    weights) and opens the weight transfer; `sync` writes the policy's weights to a fresh
    private directory under `sync_root` (output_dir) and has the server load them, whenever
    they changed; `close` puts the served model's own weights back. With several training
    processes `on_main(action)` runs the server-side actions on the main process and raises
    their failure on every process; each process requests its own share of the groups."""

    def __init__(self, settings: VLLMSettings, *, tokenizer, sync_root: Path, device: torch.device,
                 on_main=lambda action: action()) -> None:
        self.settings = settings
        self.base_url = settings.server_base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.sync_root = Path(sync_root)
        self.device = device
        self.on_main = on_main
        self.model_name: str | None = None
        self.vocab_size = len(tokenizer)
        self._synced_version: int | None = None
        self._synced_dir: Path | None = None
        self._root: Path | None = None
        self._syncs = 0

    # ------------------------------------------------------------------ HTTP
    def _call(self, route: str, payload: dict | None = None, *, method: str = "POST",
              timeout: float = REPLY_TIMEOUT, retries: int = 0) -> dict:
        """`retries`: further tries after a dropped connection, for requests that are safe to repeat."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        request = urllib.request.Request(f"{self.base_url}{route}", data=data, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=timeout) as reply:
                body = reply.read()
        except (ConnectionResetError, http.client.RemoteDisconnected) as err:
            if not retries:
                self._unreachable(method, route, err)
            time.sleep(1.0)
            return self._call(route, payload, method=method, timeout=timeout, retries=retries - 1)
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            raise EngineError(f"the vLLM server at {self.base_url} answered {method} {route} with HTTP {err.code}: "
                              f"{detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            self._unreachable(method, route, err)
        try:
            return json.loads(body) if body else {}
        except json.JSONDecodeError:
            raise EngineError(f"the vLLM server at {self.base_url} answered {route} with something other than "
                              f"JSON: {body[:200]!r}") from None

    def _unreachable(self, method: str, route: str, err: Exception):
        reason = getattr(err, "reason", err)
        raise EngineError(f"the vLLM server at {self.base_url} stopped answering ({method} {route}: {reason}). "
                          "Restart it (`sapo vllm-serve MODEL` prints the command) and resume the run from its "
                          "last checkpoint (resume_from_checkpoint=latest)") from None

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.settings.server_timeout
        while True:
            try:
                self._call("/health", method="GET", timeout=10)
                return
            except EngineError as err:
                if time.monotonic() >= deadline:
                    raise EngineError(f"no vLLM server answered at {self.base_url} within vllm_server_timeout="
                                      f"{self.settings.server_timeout:g} s ({err}). Start one with the command "
                                      f"`sapo vllm-serve {self.settings.model}` prints, or set vllm_server_base_url")
                time.sleep(1.0)

    # ------------------------------------------------------------------ start-up
    def connect(self, model, *, fresh: bool) -> None:
        """Check the server serves this run's model, then open the weight transfer. `fresh`: a
        run from the start, whose policy must equal the served weights (a resumed run's policy
        is the checkpoint's, so only the tokenizer and lengths are checked). Every process
        takes part (the weights check is a forward pass, collective for a sharded model)."""
        if self.model_name is not None:
            return
        self._wait_until_up()
        self._check_flags()
        models = self._call("/v1/models", method="GET").get("data") or []
        if not models or "id" not in models[0]:
            raise EngineError(f"the vLLM server at {self.base_url} lists no model at /v1/models")
        self.model_name = models[0]["id"]
        served_len = models[0].get("max_model_len")
        if served_len is not None and served_len < self.settings.max_model_len:
            raise ConfigError(f"max_prompt_length + max_completion_length = {self.settings.max_model_len} is longer "
                              f"than the vLLM server's max_model_len={served_len}: restart it with --max-model-len "
                              f"{self.settings.max_model_len} (sapo vllm-serve sets it)")
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None) or self.vocab_size
        self._check_tokenizer()
        if fresh:
            self._check_weights(model)
        self.on_main(self._open_transfer)

    def _open_transfer(self) -> None:
        # Weights directories a run killed before its clean-up left behind (ours by name; the
        # output_dir lock is held, so no live run owns them).
        for stale in self.sync_root.glob("vllm-weights-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        self._call("/resume", None)  # a run that failed mid-sync may have left it paused
        self._call("/init_weight_transfer_engine", {"init_info": {}})

    def _check_flags(self) -> None:
        """The dev-mode routes, and processed log-probabilities where the server reports its config."""
        try:
            info = self._call("/server_info?config_format=json", method="GET", timeout=30)
        except EngineError as err:
            if "HTTP 404" in str(err):
                raise ConfigError(f"the vLLM server at {self.base_url} has no dev-mode routes (/server_info, the "
                                  "weight updates): start it with VLLM_SERVER_DEV_MODE=1 and the flags `sapo "
                                  f"vllm-serve {self.settings.model}` prints") from None
            raise
        mode = _find_key(info, "logprobs_mode")
        if mode is not None and mode != "processed_logprobs":
            raise ConfigError(f"the vLLM server at {self.base_url} runs with --logprobs-mode {mode}: the importance "
                              "sampling correction needs the log-probabilities of the distribution it samples from. "
                              "Restart it with --logprobs-mode processed_logprobs (sapo vllm-serve sets it)")

    def _check_tokenizer(self) -> None:
        """Token ids must mean the same tokens on both sides (prompts and completions travel as
        ids, so how either side would split text does not matter)."""
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        served = self._call("/detokenize", {"model": self.model_name, "tokens": ids}).get("prompt")
        if served != self.tokenizer.decode(ids):
            raise ConfigError(f"the vLLM server at {self.base_url} (model {self.model_name!r}) decodes token ids "
                              f"differently from model={self.settings.model!r}: it serves another tokenizer. Start it "
                              f"on this run's model: `sapo vllm-serve {self.settings.model}`")

    def _check_weights(self, model) -> None:
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        reply = self._call("/v1/completions", {"model": self.model_name, "prompt": ids, "max_tokens": 1,
                                               "temperature": 1.0, "prompt_logprobs": 0, "seed": 0})
        try:
            per_position = reply["choices"][0]["prompt_logprobs"]
            served = [per_position[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"the vLLM server at {self.base_url} returned no prompt_logprobs for the weights "
                              "check") from None
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=self.device)).logits[0, :-1].float()
            ours = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=self.device)[:, None])[:, 0]
        gap = (torch.tensor(served, dtype=torch.float32) - ours.cpu()).abs().mean().item()
        if not math.isfinite(gap) or gap > WEIGHTS_TOLERANCE:
            raise ConfigError(f"the vLLM server at {self.base_url} serves other weights than model="
                              f"{self.settings.model!r} (log-probabilities differ by {gap:.3g} nats per token on "
                              f"average; the same weights stay under {WEIGHTS_TOLERANCE}). Start it on this run's "
                              f"model (`sapo vllm-serve {self.settings.model}`), or restart it if a run that crashed "
                              "left its weights there; the trainer does not overwrite another model's server")

    # ------------------------------------------------------------------ engine interface
    def sync(self, model, version: int | None = None) -> None:
        if version is not None and version == self._synced_version:
            return
        state = full_state_dict(model)  # every process takes part in a sharded model's gather
        self.on_main(lambda: self._push(model, state))
        self._synced_version = version

    def _push(self, model, state: dict) -> None:
        if self._root is None:  # fresh and private (0700): never a directory someone else prepared
            self.sync_root.mkdir(parents=True, exist_ok=True)
            self._root = Path(tempfile.mkdtemp(prefix="vllm-weights-", dir=self.sync_root))
        self._syncs += 1
        directory = self._root / f"step-{self._syncs}"
        directory.mkdir(mode=0o700)
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        self._load(directory)
        if self._synced_dir is not None:
            shutil.rmtree(self._synced_dir, ignore_errors=True)  # ours, written by the sync before
        self._synced_dir = directory

    def _load(self, directory: Path) -> None:
        """The server loads the safetensors in `directory`; generation resumes whatever happens."""
        self._call("/pause", None)
        try:
            self._call("/start_weight_update", None)
            self._call("/update_weights", {"update_info": {"path": str(Path(directory).resolve())}})
            self._call("/finish_weight_update", None)
        finally:
            try:
                self._call("/resume", None)
            except EngineError:
                pass  # the failure above is the one to report

    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: SamplingSettings,
                 seeds: list[int]) -> Generation:
        greedy = sampling.temperature == 0
        payloads = [{"model": self.model_name, "prompt": list(ids), "n": group_size, "seed": seed,
                     "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "logprobs": 0, "return_token_ids": True,
                     "return_tokens_as_token_ids": True, "skip_special_tokens": False}
                    for ids, seed in zip(prompt_ids, seeds, strict=True)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(payloads), MAX_REQUESTS_IN_FLIGHT))) as pool:
            replies = list(pool.map(lambda p: self._call("/v1/completions", p, retries=2), payloads))
        token_ids, logprobs, finish = [], [], []
        for reply in replies:
            for ids, logps, reason in self._parse(reply, group_size, sampling.max_new_tokens):
                token_ids.append(ids)
                logprobs.append(logps)
                finish.append(reason)
        return generation_from_lists(token_ids, None if greedy else logprobs, finish,
                                     pad_token_id=self.tokenizer.pad_token_id, device=self.device)

    def _parse(self, reply: dict, group_size: int, max_tokens: int):
        """(token ids, log-probabilities, finish reason) of each of a reply's choices, checked."""
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        vocab = self.vocab_size
        if len(choices) != group_size:
            raise EngineError(f"the vLLM server at {self.base_url} returned {len(choices)} completions of a prompt, "
                              f"not n={group_size}")
        for choice in choices:
            try:
                lp = choice["logprobs"]
                ids = choice.get("token_ids")
                if ids is None:  # servers without return_token_ids: "token_id:N" strings
                    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
                logps = [float(x) for x in lp["token_logprobs"]]
                reason = choice["finish_reason"]
            except (KeyError, TypeError, ValueError) as err:
                raise EngineError(f"the vLLM server at {self.base_url} returned a malformed completion ({err!r}): "
                                  "it needs return_token_ids or return_tokens_as_token_ids, and logprobs") from None
            if (reason not in ("stop", "length") or not 0 < len(ids) <= max_tokens or len(logps) != len(ids)
                    or any(not 0 <= i < vocab for i in ids) or any(math.isnan(x) or x > 1e-4 for x in logps)):
                raise EngineError(f"the vLLM server at {self.base_url} returned a completion that is not well formed "
                                  f"(finish_reason={reason!r}, {len(ids)} tokens of at most {max_tokens}, "
                                  f"{len(logps)} log-probabilities, token ids within a vocabulary of {vocab})")
            yield ids, logps, reason

    def close(self) -> None:
        """Put the served model's own weights back (so the server can serve the next run from the
        start) and remove the weights directory this engine made."""
        self.on_main(self._restore)

    def _restore(self) -> None:
        if self._syncs:
            try:
                self._load(Path(self.settings.model))
                self._syncs = 0
            except EngineError as err:
                print(f"note: could not put {self.settings.model}'s weights back on the vLLM server ({err}); "
                      "restart it before the next run", flush=True)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = self._synced_dir = None


def _find_key(tree, key: str):
    """The first value of `key` anywhere in a JSON tree (vLLM's /server_info nests its config)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None
