"""Tiny generation fixtures for tests, benchmarks and demos: a random HF Llama with a chat template,
synthetic multi-paragraph documents, and a real OpenAI-compatible HTTP server on 127.0.0.1 that
serves an hf backend. Nothing is downloaded."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from megatron_longpo.testing.convert import build_tiny_hf
from megatron_longpo.generation.answers import Sampling
from megatron_longpo.generation.backends import CHATML_TEMPLATE, ChatFormatter, GenRequest, HFBackend

_WORDS = ("archive ledger harbor council river granite lantern orchard meadow beacon quarry vessel "
          "summit canal tower market bridge garden library station museum forest valley island").split()


def build_tiny_chat_model(out: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama (megatron_longpo.testing.convert) whose tokenizer has a ChatML template."""
    out = build_tiny_hf(out, "llama", seed=seed)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def synthetic_document(rng: random.Random, paragraphs: int, words: tuple[int, int] = (12, 30)) -> str:
    paras = []
    for p in range(paragraphs):
        n = rng.randint(*words)
        body = " ".join(rng.choice(_WORDS) for _ in range(n))
        paras.append(f"Section {p + 1}. The {rng.choice(_WORDS)} code is {rng.randint(1000, 9999)}. {body}.")
    return "\n\n".join(paras)


def write_documents_jsonl(path: str | Path, n: int, paragraphs: tuple[int, int] = (6, 12),
                          words: tuple[int, int] = (12, 30), seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc-{i}", "text": synthetic_document(rng, rng.randint(*paragraphs), words)}) + "\n")
    return path


class CompletionServer:
    """/v1/completions (token-id prompts) and /v1/chat/completions served by an HFBackend.

    ``faults`` is consumed one per request: "drop" closes the connection without an answer,
    "503" answers Service Unavailable, None serves normally. ``long``: the server runs the model
    at the backend's ``--long-rope-theta`` (as ``vllm serve --hf-overrides`` would), a second
    endpoint for the long-context phase.
    """

    _torch_rng = threading.Lock()

    def __init__(self, backend: HFBackend, formatter: ChatFormatter, faults=(), long: bool = False):
        self.backend, self.fmt, self.faults, self.long = backend, formatter, list(faults), long
        self.lock = CompletionServer._torch_rng  # servers in one process share torch's global RNG
        self.calls: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                    fault = server.faults.pop(0) if server.faults else None
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)  # the client sees the connection reset / closed
                        return
                    if fault == "503":
                        self.send_error(503, "overloaded")
                        return
                    if self.path.endswith("/chat/completions"):
                        ids = server.fmt.prompt_ids(body["messages"])
                    else:
                        ids = body["prompt"]
                    req = GenRequest([], ids, Sampling(body["temperature"], body["top_p"], body["max_tokens"]), body["seed"],
                                     long=server.long)
                    res = server.backend.generate([req])[0]
                reason = "stop" if res.finished else "length"
                choice = ({"message": {"role": "assistant", "content": res.text}} if self.path.endswith("/chat/completions")
                          else {"text": res.text})
                out = json.dumps({"choices": [{**choice, "index": 0, "finish_reason": reason}],
                                  "usage": {"completion_tokens": res.num_tokens}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
