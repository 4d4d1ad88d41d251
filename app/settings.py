"""The server's settings: one pydantic-settings object, the single source of truth.

Each field's description is also its ``--help`` text and its row in docs/configuration.md.
Precedence: defaults < ``GPTQ_*`` environment variables < command-line flags.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EngineConfig
from engine.lora.spec import LoraConfig, LoraSpec

ENV_PREFIX = "GPTQ_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      validate_default=True)

    # ---- model --------------------------------------------------------------------------
    model: str = Field("TheBloke/Llama-2-13B-GPTQ",
                       description="Hub repo id or local folder of a Llama 2 GPTQ checkpoint.")
    revision: str | None = Field("main", description="Hub branch, tag or commit (the GPTQ "
                                 "variant, e.g. gptq-4bit-32g-actorder_True). Ignored for folders.")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Name(s) clients use in the \"model\" field (comma-separated or repeated). "
                    "Default: the model's last path component. The first is listed by "
                    "/v1/models.")
    download_dir: str | None = Field(None, description="Where downloaded checkpoints are "
                                     "cached (default: huggingface_hub's cache, HF_HOME).")
    offline: bool = Field(False, description="Never use the network: load only files already "
                          "cached or on disk.")
    # ---- engine -------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Activation dtype (auto: float16 on CUDA, float32 on the CPU).")
    linear_backend: Literal["auto", "torch", "triton", "mma", "exllama"] = Field(
        "auto", description="Quantised matmul backend (auto: mma on CUDA, torch on CPU). "
        "mma: 4-bit layers on the w4a16 tensor-core kernel (built with nvcc on first use, "
        "prebuilt in the image; on H100/H200 also its wgmma form, timed per step size at "
        "load; faster than triton at every batch size measured, see docs/benchmarks.md), "
        "8-bit layers, and every layer where the kernel cannot be built, "
        "as triton; triton: Triton GPTQ kernels for 4 and 8 bits, with exllamav2's 4-bit "
        "kernel where it measures faster; exllama: exllamav2's kernel only (4-bit).")
    dense_weights: bool = Field(False, description="Also keep a dense fp16 copy of every "
                                "quantised layer for large steps (faster prefill; 4x the "
                                "memory of 4-bit weights, 2x of 8-bit, taken from the KV "
                                "cache).")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Attention backend (auto: triton on CUDA, torch on CPU).")
    max_model_len: int | None = Field(None, ge=16, description="Longest prompt + completion "
                                      "in tokens (default: the model's context length).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences decoded together.")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Token budget of one engine "
                                        "step (long prompts are prefilled in chunks). New "
                                        "prompts are prefilled in the steps that decode the "
                                        "running streams: lower it for steadier inter-token "
                                        "latency, raise it for a shorter time to first token.")
    block_size: int = Field(16, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache size in blocks "
                                      "(default: sized from memory).")
    gpu_memory_utilization: float = Field(0.90, gt=0, lt=1, description="Fraction of GPU "
                                          "memory for weights, activations and the KV cache.")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="KV-cache size on the CPU, GiB.")
    cuda_graphs: bool = Field(True, description="Capture decode steps in CUDA graphs.")
    cuda_graph_max_tokens: int = Field(512, ge=0, description="With CUDA graphs, steps other "
                                       "than decode steps (prompts, prefill chunks, mixed "
                                       "batches) of up to this many tokens run as CUDA graphs "
                                       "between their attention calls: faster first tokens "
                                       "and mixed steps, for a few seconds of capture at "
                                       "start. 0: they run eagerly.")
    prefix_caching: bool = Field(True, description="Automatic prefix caching: keep full KV "
                                 "blocks after their request ends and reuse them for later "
                                 "prompts that start with the same tokens "
                                 "(--no-prefix-caching turns it off).")
    overlap_steps: bool = Field(True, description="Schedule and build each engine step while "
                                "the previous one runs on the GPU, its sampled tokens staying "
                                "there (--no-overlap-steps: each step waits for the one "
                                "before; on the CPU, where nothing overlaps, that delivers "
                                "each token one step sooner).")
    seed: int = Field(0, description="Seed of the shared sampler for unseeded requests.")
    engine_hang_timeout: float = Field(60.0, gt=0, description="Seconds the engine core "
                                       "process may stay silent (it reports after every step "
                                       "and at least once a second) before it counts as hung: "
                                       "it is killed, requests in flight end with an error "
                                       "and /health answers 503.")
    # ---- LoRA -----------------------------------------------------------------------------
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="PEFT LoRA adapters to serve, each name=path or name=repo_id@revision (a "
                    "local folder or a hub repo); each name becomes a model id of /v1/models. "
                    "Several after one flag, or comma-separated in the environment variable.")
    max_loras: int = Field(4, ge=1, le=64, description="LoRA adapters held on the device at "
                           "once (fixed slots; the rest wait on the host and are swapped in, "
                           "least recently used out). One step runs at most this many.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank accepted; "
                               "sizes every device slot.")
    allow_runtime_lora_updating: bool = Field(
        False, description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                           "(vLLM's API) to load and unload adapters while running. Off: the "
                           "routes do not exist. Either this or --lora-modules turns LoRA on.")
    # ---- HTTP -----------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys accepted as 'Authorization: Bearer KEY' on "
        "/v1 routes (comma-separated in GPTQ_API_KEYS; --api-key repeats). None set: no auth.")
    api_key_file: str | None = Field(None, description="A file of API keys, one per line "
                                     "(e.g. a mounted Kubernetes Secret).")
    metrics_require_auth: bool = Field(False, description="Require an API key on /metrics.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated; off "
        "when empty).")
    chat_template: str = Field("default", description="Chat prompt format: 'default' (alias "
                               "'alpaca-system': ### System/### User/### Response), "
                               "'llama-2-chat' ([INST] <<SYS>>), 'tokenizer' (the checkpoint's "
                               "own chat_template) or a path to a Jinja file.")
    # ---- limits -----------------------------------------------------------------------------
    max_queued_requests: int = Field(256, ge=0, description="Requests waiting for the engine "
                                     "beyond which new ones get 429 with Retry-After.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may "
                                  "ask for.")
    default_max_tokens: int | None = Field(None, ge=1, description="max_tokens when a request "
                                           "gives none (default: the rest of the context, up "
                                           "to max_tokens_limit).")
    max_n: int = Field(8, ge=1, description="Largest n (choices per prompt).")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one completions request.")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; "
                                "larger ones get 413.")
    max_grammar_bytes: int = Field(64 * 1024, ge=256, description="Largest structured-output "
                                   "constraint (a JSON schema, regex, choice list, grammar, or "
                                   "the grammar of forced tool calls), in bytes; larger ones "
                                   "get 400.")
    grammar_compile_timeout: float = Field(10.0, gt=0, description="Seconds a constraint's "
                                           "grammar may take to compile (when it is checked, "
                                           "and again in the engine) before the request is "
                                           "refused with 400.")
    grammar_cache_size: int = Field(256, ge=1, description="Compiled grammars the engine keeps "
                                    "for reuse (keyed by the constraint's kind and text).")
    # Connection limits (app/http_protocol.py; docs/reliability.md says why each is needed).
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Largest request line plus "
                                  "headers; larger ones get 431.")
    header_timeout: float = Field(10.0, gt=0, description="Seconds a client has to send a "
                                  "request's line and headers; then the connection is closed.")
    body_timeout: float = Field(60.0, gt=0, description="Seconds a client has to send a "
                                "request's body after its headers; then the connection is "
                                "closed.")
    send_timeout: float = Field(60.0, gt=0, description="Seconds a response may wait on a "
                                "client that reads nothing (64 KiB unsent) before the "
                                "connection is dropped and its generation aborted.")
    keepalive_interval: float = Field(10.0, gt=0, description="Seconds between SSE keep-alive "
                                      "comments while a stream waits for tokens.")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get to "
                                    "finish after SIGTERM before they are ended.")
    warmup: bool = Field(True, description="Before reporting ready, run every step shape "
                         "and sampler path the engine will meet, then one generation through "
                         "the server's own path, so the first request is as fast as the rest.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (for log "
        "collectors; the request id is a field). json also turns download progress bars off, "
        "as does a console that is not a terminal.")
    vllm_metrics: bool = Field(True, description="Also export the metrics a vLLM dashboard, "
                               "alert or autoscaler reads under vLLM's names (vllm:*, with "
                               "the model_name label), beside the gptq_* ones.")

    @field_validator("served_model_name", "api_keys", "cors_origins", "lora_modules",
                     mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in (8, 16, 32, 64, 128):
            raise ValueError("block_size must be one of 8, 16, 32, 64, 128")
        return value

    @field_validator("lora_modules")
    @classmethod
    def _lora_modules(cls, value: list[str]) -> list[str]:
        LoraConfig(adapters=tuple(LoraSpec.parse(v) for v in value))  # the syntax, duplicates
        return value

    @model_validator(mode="after")
    def _lora_names(self) -> Settings:
        clash = {LoraSpec.parse(v).name for v in self.lora_modules} & {*self.model_names,
                                                                      self.model}
        if clash:
            raise ValueError(f"LoRA adapter name(s) {', '.join(sorted(clash))} are the base "
                             "model's served name")
        return self

    @model_validator(mode="after")
    def _load_key_file(self) -> Settings:
        if self.api_key_file:
            path = Path(self.api_key_file)
            if not path.is_file():
                raise ValueError(f"api_key_file {path} does not exist")
            keys = [k.strip() for k in path.read_text().splitlines() if k.strip()]
            self.api_keys = [*self.api_keys, *[k for k in keys if k not in self.api_keys]]
        return self

    @property
    def model_names(self) -> list[str]:
        return self.served_model_name or [Path(self.model.rstrip("/")).name or self.model]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, revision=self.revision, download_dir=self.download_dir,
            offline=self.offline, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_gb=self.kv_cache_memory_gb, device=self.device,
            linear_backend=self.linear_backend, dense_weights=self.dense_weights,
            attention_backend=self.attention_backend,
            dtype=self.dtype, cuda_graphs=self.cuda_graphs,
            cuda_graph_max_tokens=self.cuda_graph_max_tokens,
            enable_prefix_caching=self.prefix_caching, overlap_steps=self.overlap_steps,
            seed=self.seed,
            grammar_compile_timeout=self.grammar_compile_timeout,
            grammar_cache_size=self.grammar_cache_size, lora=self.lora_config())

    def lora_config(self) -> LoraConfig | None:
        """LoRA is on when adapters are given at start or may be loaded at run time."""
        if not self.lora_modules and not self.allow_runtime_lora_updating:
            return None
        return LoraConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          adapters=tuple(LoraSpec.parse(v) for v in self.lora_modules),
                          allow_runtime_updates=self.allow_runtime_lora_updating)


@dataclass(frozen=True)
class SettingGroup:
    """A heading of ``serve --help`` and of docs/configuration.md, and the settings under it."""

    title: str
    description: str
    fields: tuple[str, ...]


# Every setting belongs to exactly one group (tests/test_settings.py checks it), in the order
# users look for them: what to serve, how to run it, how to reach it, who may, how to watch it.
SETTING_GROUPS: tuple[SettingGroup, ...] = (
    SettingGroup("model", "What to serve: the checkpoint, its branch, the names clients use.",
                 ("model", "revision", "served_model_name", "download_dir", "offline",
                  "chat_template")),
    SettingGroup("engine", "How the model runs: device, kernels, batching, KV cache.",
                 ("device", "dtype", "linear_backend", "dense_weights", "attention_backend",
                  "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                  "num_kv_blocks", "gpu_memory_utilization", "kv_cache_memory_gb",
                  "cuda_graphs", "cuda_graph_max_tokens", "prefix_caching", "overlap_steps",
                  "grammar_cache_size", "seed", "warmup", "engine_hang_timeout")),
    SettingGroup("lora", "LoRA adapters on the base model: which to serve, their device "
                 "slots, loading them at run time (docs/lora.md).",
                 ("lora_modules", "max_loras", "max_lora_rank", "allow_runtime_lora_updating")),
    SettingGroup("server", "The HTTP server: address, request limits, streaming, shutdown.",
                 ("host", "port", "max_queued_requests", "max_tokens_limit",
                  "default_max_tokens", "max_n", "max_prompts", "max_logit_bias",
                  "max_body_bytes", "max_header_bytes", "header_timeout", "body_timeout",
                  "send_timeout", "max_grammar_bytes", "grammar_compile_timeout",
                  "keepalive_interval", "shutdown_timeout")),
    SettingGroup("security", "Who may call: API keys, /metrics access, CORS.",
                 ("api_keys", "api_key_file", "metrics_require_auth", "cors_origins")),
    SettingGroup("observability", "Logs and metrics.",
                 ("log_level", "log_format", "vllm_metrics")),
)
# Where a setting no group names is shown (a test keeps this group empty).
OTHER_GROUP = SettingGroup("other", "Settings not yet given a group.", ())


def grouped_settings() -> list[tuple[SettingGroup, list[tuple[str, FieldInfo]]]]:
    """Each group with its settings' fields, in group order; any setting missing from
    SETTING_GROUPS comes last under OTHER_GROUP rather than vanishing from --help."""
    fields = Settings.model_fields
    listed = {name for group in SETTING_GROUPS for name in group.fields}
    groups = [(group, [(name, fields[name]) for name in group.fields if name in fields])
              for group in SETTING_GROUPS]
    rest = [(name, field) for name, field in fields.items() if name not in listed]
    if rest:
        groups.append((OTHER_GROUP, rest))
    return groups


# Flag spellings that differ from the field name.
_FLAG_NAMES = {"api_keys": "api-key"}
# List flags that take several values at once (vLLM's "--lora-modules a=x b=y").
_SEVERAL_PER_FLAG = {"lora_modules": "NAME=PATH[@REVISION]"}


def flag_name(field: str) -> str:
    return "--" + _FLAG_NAMES.get(field, field.replace("_", "-"))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, under its group's heading; unset flags stay absent so env
    vars and defaults apply."""
    for group, fields in grouped_settings():
        section = parser.add_argument_group(group.title, group.description)
        for name, field in fields:
            _add_flag(section, name, field)


def _add_flag(parser: argparse._ActionsContainer, name: str, field: FieldInfo) -> None:
    help_text = f"{field.description} [env {env_name(name)}]"
    flag = flag_name(name)
    if field.annotation is bool:
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
    elif name in _SEVERAL_PER_FLAG:
        parser.add_argument(flag, dest=name, nargs="+", action="extend",
                            default=argparse.SUPPRESS, help=help_text + " (repeatable)",
                            metavar=_SEVERAL_PER_FLAG[name])
    elif "list" in str(field.annotation):
        parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                            help=help_text + " (repeatable)")
    elif get_origin(field.annotation) is Literal:  # show the choices; pydantic checks them
        choices = ",".join(str(c) for c in get_args(field.annotation))
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text,
                            metavar=f"{{{choices}}}")
    else:
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    for key in ("served_model_name", "api_keys", "cors_origins"):
        if key in values:  # "--api-key a,b --api-key c" means three keys
            values[key] = [p.strip() for v in values[key] for p in v.split(",") if p.strip()]
    return Settings(**values)


def environment_snapshot() -> dict[str, str]:
    """The GPTQ_* variables in force (for logs; key values are masked)."""
    return {k: ("***" if "KEY" in k else v) for k, v in os.environ.items()
            if k.startswith(ENV_PREFIX)}


def settings_table() -> str:
    """Every setting as docs/configuration.md shows it: one Markdown table per group, under the
    headings ``serve --help`` uses (a test keeps the two identical: regenerate with
    ``python -m app.settings``)."""
    lines: list[str] = []
    for group, fields in grouped_settings():
        lines += [f"### {group.title.capitalize()}", "", group.description, "",
                  "| flag | environment variable | default | description |",
                  "|---|---|---|---|"]
        for name, field in fields:
            default = field.default_factory() if field.default_factory else field.default
            shown = "(none)" if default in (None, []) else f"`{default}`"
            lines.append(f"| `{flag_name(name)}` | `{env_name(name)}` | {shown} | "
                         f"{field.description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table(), end="")
