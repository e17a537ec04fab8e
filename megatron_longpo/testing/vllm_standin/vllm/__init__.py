"""A CPU stand-in for the ``vllm`` package that enforces the API megatron_longpo uses.

Put ``megatron_longpo/testing/vllm_standin`` first on ``PYTHONPATH`` (processes spawned by the
generation CLI inherit it) and ``import vllm`` gets this module. The API is the one of vLLM at
commit 10fdb8f0d75a3ad1122b87020f1359d3fc51f2ca of vllm-project/vllm (``vllm/entrypoints/llm.py``,
``vllm/sampling_params.py``, ``vllm/outputs.py``; the V1-engine API of the 0.11+ releases), read
from its source:

- ``LLM(model, *, <keyword-only parameters below>, **kwargs)``; ``kwargs`` go to ``EngineArgs``,
  whose unknown fields raise ``TypeError``. ``hf_overrides`` (a dict) updates the HF config
  (``config.update``); ``max_model_len`` above the (overridden) ``max_position_embeddings`` is refused
  as vLLM refuses it (without VLLM_ALLOW_LONG_MAX_MODEL_LEN).
- ``SamplingParams(**fields)``: only its declared fields, with vLLM's range checks.
- ``LLM.generate(prompts, sampling_params=None, *, use_tqdm, lora_request, priority,
  tokenization_kwargs) -> list[RequestOutput]``; a prompt is a ``TokensPrompt`` dict
  (``{"prompt_token_ids": [...]}``) or a string; one SamplingParams or one per prompt.
- ``RequestOutput.outputs[i]`` is a ``CompletionOutput`` with ``text``, ``token_ids``,
  ``finish_reason`` ("stop" | "length").

Sampling runs the HF model with transformers, seeded per request like the hf backend
(``generation.backends.hf_sample``), so vllm-backend records equal hf-backend records. Every engine
built and every ``generate`` call is appended to the JSONL file ``$VLLM_STANDIN_LOG`` (pid, RoPE
override, prompt count), so tests can see which process ran which engine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_longpo.generation.answers import Sampling
from megatron_longpo.generation.backends import hf_sample

__version__ = "0.0.0+standin-10fdb8f0"

# LLM.__init__ keyword-only parameters (after the positional ``model``).
LLM_PARAMETERS = frozenset({
    "runner", "convert", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "allowed_local_media_path", "allowed_media_domains", "tensor_parallel_size", "dtype", "quantization", "revision",
    "tokenizer_revision", "seed", "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
    "enable_return_routed_experts", "disable_custom_all_reduce", "hf_token", "hf_overrides", "mm_processor_kwargs",
    "pooler_config", "structured_outputs_config", "profiler_config", "attention_config", "kv_cache_memory_bytes",
    "compilation_config", "logits_processors",
})
# EngineArgs fields accepted through **kwargs (the subset a generation job sets; all exist in EngineArgs).
ENGINE_ARGS = frozenset({
    "max_model_len", "enable_prefix_caching", "disable_log_stats", "max_num_seqs", "max_num_batched_tokens",
    "enable_chunked_prefill", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",
    "enable_sleep_mode", "kv_cache_dtype", "block_size", "max_logprobs", "load_format", "download_dir",
})
SAMPLING_FIELDS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
})


def _log(event: dict[str, Any]) -> None:
    path = os.environ.get("VLLM_STANDIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


class SamplingParams:
    def __init__(self, **kw: Any):
        unknown = sorted(set(kw) - SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected field(s) {unknown}")
        self.temperature = float(kw.get("temperature", 1.0))
        self.top_p = float(kw.get("top_p", 1.0))
        self.top_k = int(kw.get("top_k", 0))
        self.max_tokens = kw.get("max_tokens", 16)
        self.seed = kw.get("seed")
        self.skip_special_tokens = bool(kw.get("skip_special_tokens", True))
        self.n = int(kw.get("n", 1))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.n != 1:
            raise ValueError("the stand-in samples one output per prompt (n=1)")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[Any]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: Optional[list[int]]
    prompt_logprobs: Optional[Any]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        unknown = sorted(k for k in kwargs if k not in LLM_PARAMETERS and k not in ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        overrides = kwargs.get("hf_overrides") or {}
        if not isinstance(overrides, dict):
            raise TypeError("hf_overrides must be a dict (or a callable) of HF config fields")
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        config.update(dict(overrides))
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        max_len = kwargs.get("max_model_len")
        if max_len is not None and limit and int(max_len) > limit:
            raise ValueError(f"User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
                             f"(max_position_embeddings={limit} in model's config.json). To allow overriding this "
                             "maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")
        self.model = AutoModelForCausalLM.from_pretrained(model, config=config, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model, local_files_only=True)
        self.eos = self.tokenizer.eos_token_id
        self._counter = 0
        _log({"event": "init", "hf_overrides": overrides, "max_model_len": max_len})

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: Any = True,
                 lora_request: Any = None, priority: Optional[list[int]] = None,
                 tokenization_kwargs: Optional[dict[str, Any]] = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        out = []
        for p, sp in zip(prompts, params):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            if isinstance(p, dict):
                if set(p) - {"prompt_token_ids", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}:
                    raise ValueError(f"not a TokensPrompt: keys {sorted(p)}")
                ids = [int(x) for x in p["prompt_token_ids"]]
            else:
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            new = hf_sample(self.model, ids, Sampling(sp.temperature, sp.top_p, sp.max_tokens), sp.seed or 0, self.eos)
            stop = bool(new) and new[-1] == self.eos
            text = self.tokenizer.decode(new, skip_special_tokens=sp.skip_special_tokens)
            out.append(RequestOutput(str(self._counter), None, ids, None,
                                     [CompletionOutput(0, text, new, None, None, "stop" if stop else "length")]))
            self._counter += 1
        _log({"event": "generate", "prompts": len(prompts)})
        return out
