"""Generation backends behind one small interface: ``generate(requests) -> results``.

- ``hf``: transformers ``generate`` (CPU or one GPU); the default for tests and demos;
  deterministic: every request is sampled alone from its own seed.
- ``vllm``: the offline ``vllm.LLM`` engine with tensor parallelism (optional extra, imported
  lazily); one request batch per stage, prefix caching on (the turns of a document share its
  long prefix).
- ``openai``: any OpenAI-compatible server (vLLM, SGLang, ...), ``/v1/completions`` with the
  prompt token ids (default) or ``/v1/chat/completions``; retries with exponential backoff.

Every backend receives the same prompts: the messages rendered by the project's chat template
(``ChatFormatter``: the ``--chat-template`` choice and rendering code of preprocessing and
evaluation), as token ids, with a per-request seed derived from ``--seed``.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_longpo.config import ConfigError
from megatron_longpo.data.schema import DataError
from megatron_longpo.data.sequences import generation_prompt_ids
from megatron_longpo.data.templates import ChatMessage, generation_prompt, get_template, rendered_text
from megatron_longpo.data.tokenizer import Tokenizer
from megatron_longpo.generation.answers import Messages, Sampling
from megatron_longpo.runtime import capabilities


class GenerationError(RuntimeError):
    """A backend failed in a way retrying does not fix (bad request, server gone after retries)."""


@dataclass(frozen=True)
class GenRequest:
    messages: Messages
    prompt_ids: list[int]
    sampling: Sampling
    seed: int
    long: bool = False  # long-context generation: uses the --long-rope-theta model variant


@dataclass(frozen=True)
class GenResult:
    text: str
    num_tokens: int  # generated tokens (EOS included when generated)
    finished: bool  # stopped by EOS / stop token (False: hit max_new_tokens)


class Backend(Protocol):
    name: str
    model_seconds: float  # wall time spent inside the model / engine / server calls

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------
# Prompts through the tokenizer's chat template
# ------------------------------------------------------------------------------------------------


class ChatFormatter:
    """Renders messages with the project's chat template (``data/templates.py``: the same
    ``--chat-template`` choice and rendering code as preprocessing and evaluation) and tokenizes the
    rendered prompt as a whole, as training tokenizes its sequences: the ids a backend receives
    are the ids a trained sequence has before its response."""

    def __init__(self, tokenizer_dir: str | Path, chat_template: str = "auto"):
        self.tokenizer_dir = str(tokenizer_dir)
        try:
            self.tok = Tokenizer(self.tokenizer_dir)
            self.template = get_template(chat_template, self.tok)
        except DataError as e:
            raise ConfigError(f"--model {tokenizer_dir} / --chat-template {chat_template}: {e}") from e
        self.eos_id = self.tok.eos_id

    def describe(self) -> dict[str, str]:
        """The template's name and fingerprint (recorded in every generated record)."""
        return self.template.describe()

    def _messages(self, messages: Messages) -> list[ChatMessage]:
        return [ChatMessage(m["role"], (m["content"],)) for m in messages]

    def render(self, messages: Messages) -> str:
        return rendered_text(generation_prompt(self.template, self._messages(messages)))

    def prompt_ids(self, messages: Messages) -> list[int]:
        return [int(i) for i in generation_prompt_ids(self.template, self.tok, self._messages(messages))]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.tok.encode(t)) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special=True)


# ChatML as a Jinja chat template, for tokenizers built by tests and examples (their own template:
# --chat-template auto renders it through data/templates.py like any tokenizer template).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def set_rope_theta(config: Any, theta: float) -> None:
    """Set the RoPE base of an HF config (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        config.rope_parameters = {**rp, "rope_theta": float(theta)}
    else:
        config.rope_theta = float(theta)


def rope_theta_of(config: dict) -> Optional[float]:
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(config["rope_theta"]) if "rope_theta" in config else None


# ------------------------------------------------------------------------------------------------
# hf
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_sample(model: torch.nn.Module, prompt_ids: Sequence[int], sampling: Sampling, seed: int,
              eos: Optional[int]) -> list[int]:
    """New token ids of one request: transformers ``generate`` seeded per request, so a result
    does not depend on the batch (also the CPU vLLM stand-in's sampler, megatron_longpo/testing)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    sample = sampling.temperature > 0
    kw: dict[str, Any] = dict(do_sample=sample, max_new_tokens=sampling.max_new_tokens, pad_token_id=eos,
                              eos_token_id=eos)
    if sample:  # top_k=0 disables the generation_config's top-k: pure temperature/top-p sampling
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    torch.manual_seed(seed)
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return gen[0, ids.shape[1]:].tolist()


class HFBackend:
    """transformers ``generate``, one request at a time with its own seed (batch-independent)."""

    name = "hf"

    def __init__(self, model_dir: str | Path, formatter: ChatFormatter, *, long_rope_theta: Optional[float] = None,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        self.model_dir = str(model_dir)
        self.formatter = formatter
        self.long_rope_theta = long_rope_theta
        self.device = torch.device(device) if device else capabilities.device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._models: dict[bool, torch.nn.Module] = {}
        self.model_seconds = 0.0

    def model(self, long: bool) -> torch.nn.Module:
        key = bool(long and self.long_rope_theta is not None)
        if key not in self._models:
            config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
            if key:
                set_rope_theta(config, self.long_rope_theta)
            m = AutoModelForCausalLM.from_pretrained(self.model_dir, config=config, dtype=self.dtype,
                                                     local_files_only=True)
            self._models[key] = m.to(self.device).eval()
        return self._models[key]

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        eos = self.formatter.eos_id
        for r in requests:
            t0 = time.perf_counter()
            new = hf_sample(self.model(r.long), r.prompt_ids, r.sampling, r.seed, eos)
            self.model_seconds += time.perf_counter() - t0
            finished = bool(new) and eos is not None and new[-1] == eos
            out.append(GenResult(self.formatter.decode(new), len(new), finished))
        return out

    def close(self) -> None:
        self._models.clear()


# ------------------------------------------------------------------------------------------------
# vllm
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLLMConfig:
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None  # default: the longest prompt the run can need
    gpu_memory_utilization: float = 0.9
    dtype: str = "bfloat16"
    enforce_eager: bool = False
    seed: int = 0


def vllm_engine_kwargs(model_dir: str, tokenizer_dir: str, cfg: VLLMConfig, hf_config: dict,
                       rope_theta: Optional[float]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one model variant (``rope_theta`` None: as saved)."""
    overrides: dict[str, Any] = {}
    if rope_theta is not None:
        if isinstance(hf_config.get("rope_parameters"), dict):
            overrides["rope_parameters"] = {**hf_config["rope_parameters"], "rope_theta": float(rope_theta)}
        else:
            overrides["rope_theta"] = float(rope_theta)
    if cfg.max_model_len is not None and cfg.max_model_len > int(hf_config.get("max_position_embeddings", 0) or 0):
        # vLLM refuses a max_model_len above the config's limit; LongPO generates past the short
        # window on purpose (with the enlarged RoPE base), as the authors do.
        overrides["max_position_embeddings"] = int(cfg.max_model_len)
    kw: dict[str, Any] = dict(
        model=model_dir, tokenizer=tokenizer_dir, tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed,
        enable_prefix_caching=True, enforce_eager=cfg.enforce_eager, trust_remote_code=False,
    )
    if cfg.max_model_len is not None:
        kw["max_model_len"] = int(cfg.max_model_len)
    if overrides:
        kw["hf_overrides"] = overrides
    return kw


def vllm_sampling_kwargs(r: GenRequest) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request."""
    kw: dict[str, Any] = dict(max_tokens=r.sampling.max_new_tokens, seed=r.seed, skip_special_tokens=True)
    if r.sampling.temperature > 0:
        kw.update(temperature=r.sampling.temperature, top_p=r.sampling.top_p)
    else:
        kw.update(temperature=0.0)
    return kw


class VLLMBackend:
    """The offline vLLM engine, ONE per process: vLLM does not reliably free GPU memory when an
    engine is dropped, so a run with ``--long-rope-theta`` is phased (generation/cli.py): one process
    generates every question and chosen answer with the model's own RoPE base (``long=False``),
    then another every rejected answer with the enlarged base (``long=True``). ``long=None``: one
    engine at the model's own base serves both (no --long-rope-theta)."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer_dir: str, cfg: VLLMConfig, long_rope_theta: Optional[float],
                 long: Optional[bool] = None):
        try:
            import vllm  # optional: vllm is the 'vllm' extra
        except ImportError as e:
            raise ConfigError(
                f"--backend vllm needs the vllm package ({e}); install it with pip install 'megatron_longpo[vllm]' "
                "on the GPU nodes, or use --backend openai against a running server"
            ) from e
        if long is None and long_rope_theta is not None:
            raise ConfigError("internal: a vllm engine serves one RoPE base; with --long-rope-theta run it phased")
        self._vllm = vllm
        self.long = long
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        kw = vllm_engine_kwargs(model_dir, tokenizer_dir, cfg, hf_config, long_rope_theta if long else None)
        self._engine: Any = vllm.LLM(**kw)
        self.model_seconds = 0.0

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        wrong = [r for r in requests if self.long is not None and r.long != self.long]
        if wrong:
            raise GenerationError(f"internal: a {'long' if wrong[0].long else 'short'}-context request reached the "
                                  f"{'long' if self.long else 'short'}-RoPE vllm engine")
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        params = [self._vllm.SamplingParams(**vllm_sampling_kwargs(r)) for r in requests]
        t0 = time.perf_counter()
        outs = self._engine.generate(prompts, params, use_tqdm=False)
        self.model_seconds += time.perf_counter() - t0
        return [GenResult(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop")
                for o in outs]

    def close(self) -> None:
        self._engine = None  # the process ends after its phase: that frees the GPU memory


# ------------------------------------------------------------------------------------------------
# openai
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: Optional[str] = None
    api: str = "completions"  # completions (prompt token ids) | chat (messages; server's template)
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry delay; doubles each time, capped at 60 s
    concurrency: int = 8


_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def openai_body(cfg: OpenAIConfig, r: GenRequest) -> dict[str, Any]:
    body: dict[str, Any] = dict(model=cfg.model, max_tokens=r.sampling.max_new_tokens, seed=r.seed,
                                temperature=r.sampling.temperature, top_p=r.sampling.top_p)
    if cfg.api == "chat":
        body["messages"] = r.messages
    else:
        body["prompt"] = r.prompt_ids
    return body


class OpenAIBackend:
    """A server runs one model at one RoPE base: long-context requests go to ``long_base_url`` (a
    second server started with the enlarged base) when given, else to the same server."""

    name = "openai"

    def __init__(self, cfg: OpenAIConfig, sleep=time.sleep, long_base_url: Optional[str] = None):
        if cfg.api not in ("completions", "chat"):
            raise ConfigError(f"--openai-api {cfg.api!r}: choose completions or chat")
        for option, url in (("--openai-base-url", cfg.base_url), ("--long-base-url", long_base_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{option} {url!r}: must start with http:// or https://")
        self.cfg = cfg
        path = "/chat/completions" if cfg.api == "chat" else "/completions"
        self.url = cfg.base_url.rstrip("/") + path
        self.long_url = (long_base_url or cfg.base_url).rstrip("/") + path
        self._sleep = sleep
        self.model_seconds = 0.0
        self.retries = 0  # retried requests (dropped connections, 429/5xx)

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        last: Optional[BaseException] = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.retries += 1
                self._sleep(min(60.0, self.cfg.backoff_s * 2 ** (attempt - 1)))
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                if e.code not in _RETRY_STATUS:
                    raise GenerationError(f"{url}: HTTP {e.code}: {detail}") from e
                last = e
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    json.JSONDecodeError) as e:
                last = e
            print(f"openai backend: {url}: {last!r}; retry {attempt + 1}/{self.cfg.max_retries}",
                  file=sys.stderr)
        raise GenerationError(f"{url}: failed after {self.cfg.max_retries} retries: {last!r}")

    def _one(self, r: GenRequest) -> GenResult:
        url = self.long_url if r.long else self.url
        resp = self._post(url, openai_body(self.cfg, r))
        try:
            choice = resp["choices"][0]
            text = choice["message"]["content"] if self.cfg.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"{url}: unexpected response {str(resp)[:300]}") from e
        usage = resp.get("usage") or {}
        return GenResult(text or "", int(usage.get("completion_tokens", 0)), choice.get("finish_reason") == "stop")

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        t0 = time.perf_counter()
        if self.cfg.concurrency <= 1 or len(requests) <= 1:
            out = [self._one(r) for r in requests]
        else:
            with ThreadPoolExecutor(self.cfg.concurrency) as ex:
                out = list(ex.map(self._one, requests))  # keeps request order
        self.model_seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        pass
