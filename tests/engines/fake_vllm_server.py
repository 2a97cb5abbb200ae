"""A stand-in for `vllm serve` in tests: serves a model with transformers on the CPU, on loopback,
with exactly the routes and payloads sapo's vLLM server client uses (sapo/engines/vllm_server.py
cites the vLLM source of each), including the `disk` weight-transfer backend's session rules:
init once, then start -> one update with a directory of safetensors -> finish.

    python tests/engines/fake_vllm_server.py --model DIR --port-file FILE [--tokenizer DIR]
        [--die-after-updates K]

It writes the port it listens on to FILE. `GET /sapo_test/weights_digest` (not a vLLM route)
returns the digest of the weights it serves, which the tests compare with the trainer's.
`--die-after-updates K`: the process exits at the first request after its K-th weight update, as
a server that crashes mid-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


def weights_digest(model) -> str:
    """sha256 over the parameters and buffers by name, as float32 bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        # The tokenizer.json as it is (transformers' AutoTokenizer would swap in the model family's
        # class for the tiny qwen2 test model; it decodes ids the same, but splits text otherwise).
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer or args.model)
        self.name = args.model
        self.max_model_len = args.max_model_len
        self.logprobs_mode = args.logprobs_mode
        self.die_after_updates = args.die_after_updates
        self.lock = threading.Lock()
        self.initialized = self.session = self.loaded = self.paused = False
        self.updates = 0

    # ------------------------------------------------------------------ routes
    def route(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if self.die_after_updates and self.updates >= self.die_after_updates:
            os._exit(1)
        routes = {
            ("GET", "/health"): lambda b: {},
            ("GET", "/server_info?config_format=json"): lambda b: {"vllm_config": {"model_config": {
                "model": self.name, "logprobs_mode": self.logprobs_mode}}},
            ("GET", "/v1/models"): lambda b: {"object": "list", "data": [
                {"id": self.name, "object": "model", "max_model_len": self.max_model_len}]},
            ("POST", "/detokenize"): lambda b: {"prompt": self.tokenizer.decode(b["tokens"])},
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/pause"): lambda b: self._set_paused(True),
            ("POST", "/resume"): lambda b: self._set_paused(False),
            ("POST", "/init_weight_transfer_engine"): self.init_transfer,
            ("POST", "/start_weight_update"): self.start_update,
            ("POST", "/update_weights"): self.update_weights,
            ("POST", "/finish_weight_update"): self.finish_update,
            ("GET", "/sapo_test/weights_digest"): lambda b: {"digest": weights_digest(self.model),
                                                             "updates": self.updates},
        }
        handler = routes.get((method, path))
        if handler is None:
            return 404, {"detail": "Not Found"}
        try:
            with self.lock:
                return 200, handler(body or {})
        except ValueError as err:
            return 400, {"error": str(err)}

    def _set_paused(self, paused: bool) -> dict:
        self.paused = paused
        return {"status": "paused" if paused else "resumed"}

    def init_transfer(self, body: dict) -> dict:
        if "init_info" not in body:
            raise ValueError("Missing 'init_info' in request body")
        self.initialized = True
        return {"message": "Weight transfer initialized"}

    def start_update(self, body: dict) -> dict:
        if not self.initialized or self.session:
            raise ValueError("weight transfer not initialized, or an update is already active")
        self.session, self.loaded = True, False
        return {"message": "started"}

    def update_weights(self, body: dict) -> dict:
        from safetensors.torch import load_file

        info = body.get("update_info")
        if info is None or not self.session or self.loaded:
            raise ValueError("Missing 'update_info', no update session, or a second checkpoint in one session")
        path = Path(info["path"])
        files = sorted(path.glob("*.safetensors")) if path.is_absolute() and path.is_dir() else []
        if not files:
            raise ValueError(f"`path` must be an absolute local directory holding safetensors: {path}")
        state = {}
        for file in files:
            state.update(load_file(file))
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(f"checkpoint does not fit the model: {result}")
        self.loaded = True
        return {"message": "Weights updated"}

    def finish_update(self, body: dict) -> dict:
        if not self.session or not self.loaded:
            raise ValueError("No checkpoint was loaded during the update session")
        self.session = False
        self.updates += 1
        return {"message": "finished"}

    @torch.no_grad()
    def completions(self, body: dict) -> dict:
        if self.paused:
            raise ValueError("generation is paused")
        prompt = body["prompt"]
        prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        n, temperature = body.get("n", 1), body.get("temperature", 1.0)
        choices = []
        for p, ids in enumerate(prompts):
            if body.get("seed") is not None:
                torch.manual_seed(body["seed"] + p)
            input_ids = torch.tensor([ids] * n)
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                      do_sample=temperature > 0, temperature=temperature or None,
                                      top_p=body.get("top_p", 1.0), max_new_tokens=body["max_tokens"],
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                                      return_dict_in_generate=True)
            new = out.sequences[:, len(ids):]
            logits = torch.stack(out.logits, 1).float() / (temperature or 1.0)
            logp = logits.log_softmax(-1).gather(-1, new[..., None])[..., 0]
            prompt_logprobs = self._prompt_logprobs(ids) if body.get("prompt_logprobs") is not None else None
            for j in range(n):
                row = new[j].tolist()
                stop = row.index(self.tokenizer.eos_token_id) + 1 if self.tokenizer.eos_token_id in row else None
                row = row[:stop]
                choices.append({
                    "index": p * n + j, "text": self.tokenizer.decode(row), "token_ids": row,
                    "finish_reason": "stop" if stop else "length", "prompt_logprobs": prompt_logprobs,
                    "logprobs": {"tokens": [f"token_id:{t}" for t in row],
                                 "token_logprobs": logp[j, :len(row)].tolist()}})
        return {"id": "cmpl-test", "object": "text_completion", "model": self.name, "choices": choices}

    def _prompt_logprobs(self, ids: list[int]) -> list:
        logits = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return [None] + [{str(ids[i]): {"logprob": logits[i - 1, ids[i]].item(), "rank": 1}}
                         for i in range(1, len(ids))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--die-after-updates", type=int, default=0)
    parser.add_argument("--logprobs-mode", default="processed_logprobs")
    args = parser.parse_args()
    server = Server(args)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = server.route(method, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._reply("GET")

        def do_POST(self):  # noqa: N802
            self._reply("POST")

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.request_queue_size = 256  # the client sends up to 64 requests at once
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(httpd.server_address[1]))
    tmp.rename(args.port_file)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
