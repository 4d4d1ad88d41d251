"""GPTQ checkpoint folder (or hub repo) -> LoadedCheckpoint.

Every tensor is checked against the shape the configs imply before the model sees it, so a
checkpoint that does not match (wrong branch config, truncated file, a non-GPTQ export) fails
here with the tensor's name and the expected and actual shape or dtype, not later inside a
matmul. ``load_from_tensors`` takes any name -> tensor mapping, so tests can hand it in-memory
dicts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.checkpoint.arch import read_arch_config, read_quant_config
from engine.checkpoint.hub import resolve_checkpoint
from engine.checkpoint.marker import has_random_weights
from engine.checkpoint.types import (
    CheckpointError,
    GPTQLinearWeights,
    LlamaArchConfig,
    LlamaLayerWeights,
    LlamaWeights,
    LoadedCheckpoint,
    QuantConfig,
)
from engine.progress import StageProgress, size

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
INDEX_SUFFIX = ".safetensors.index.json"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def load_checkpoint(model: str, revision: str | None, *, download_dir: str | None = None,
                    offline: bool = False) -> LoadedCheckpoint:
    """Resolve ``model`` (a folder, or a hub repo id at ``revision``) and load it on the CPU."""
    folder = resolve_checkpoint(model, revision, download_dir=download_dir, offline=offline)
    return load_folder(folder)


def load_folder(folder: Path) -> LoadedCheckpoint:
    arch = read_arch_config(folder)
    quant = read_quant_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)})")
    files = weight_files(folder)
    source = str(files[0]) if len(files) == 1 else f"{folder} (*.safetensors)"
    log.info("checkpoint %s: %d weight file%s, %s; %d layers, hidden %d; %d-bit, group %s, "
             "act-order %s", folder, len(files), "" if len(files) == 1 else "s",
             size(sum(f.stat().st_size for f in files)), arch.num_layers, arch.hidden_size,
             quant.bits, quant.group_size or "none", "on" if quant.desc_act else "off")
    with SafetensorsFiles(files) as tensors:
        weights = load_from_tensors(arch, quant, tensors, source)
    return LoadedCheckpoint(path=str(folder), arch=arch, quant=quant, weights=weights,
                            random_weights=has_random_weights(folder))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: those an index names, else every
    ``*.safetensors`` (TheBloke's is model.safetensors; older uploads gptq_model-4bit-128g)."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several safetensors indexes "
                              f"({', '.join(p.name for p in indexes)}); expected one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{indexes[0]}: expected a JSON object with a 'weight_map' "
                                  f"of tensor name -> file ({e})") from e
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]}: names {', '.join(missing)}, not found")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = " (PyTorch .bin weights are not supported)" if any(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights file{other}")
    return files


class SafetensorsFiles(Mapping[str, torch.Tensor]):
    """The tensors of several safetensors files as one read-only mapping; each tensor is read
    from disk when it is looked up, so only what the loader keeps stays in memory."""

    def __init__(self, files: list[Path]) -> None:
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._file_of: dict[str, Path] = {}
        try:
            for path in files:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    if name in self._where:
                        raise CheckpointError(f"{path}: tensor {name} is also in "
                                              f"{self._file_of[name]}")
                    self._where[name] = handle
                    self._file_of[name] = path
        except (OSError, SafetensorError) as e:
            self._stack.close()
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        except BaseException:
            self._stack.close()
            raise

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reader:
    """Typed, shape-checked lookups; remembers what was read so leftovers can be reported."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()
        self.num_bytes = 0  # of the tensors read so far (progress lines)

    def get(self, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...],
            hint: str = "") -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.source}: missing tensor {name} "
                                  f"(expected shape {shape})")
        return self._check(name, self.tensors[name], dtypes, shape, hint)

    def optional(self, name: str, dtypes: tuple[torch.dtype, ...],
                 shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, dtypes, shape) if name in self.tensors else None

    def _check(self, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...],
               shape: tuple[int, ...], hint: str) -> torch.Tensor:
        self.used.add(name)
        self.num_bytes += t.numel() * t.element_size()
        if t.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(f"{self.source}: tensor {name} has dtype "
                                  f"{str(t.dtype).removeprefix('torch.')}, expected {want}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{self.source}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {shape}{hint}")
        return t


def _check_layout(arch: LlamaArchConfig, quant: QuantConfig, source: str) -> None:
    for what, features in (("hidden_size", arch.hidden_size),
                           ("intermediate_size", arch.intermediate_size)):
        if quant.group_size is not None and features % quant.group_size:
            raise CheckpointError(f"{source}: group_size {quant.group_size} does not divide "
                                  f"{what} {features} (the in_features of a quantised layer)")
        if features * quant.bits % 32:
            raise CheckpointError(f"{source}: {what} {features} cannot be packed "
                                  f"{32 // quant.bits} values per int32")


def _linear(r: _Reader, quant: QuantConfig, name: str, in_features: int,
            out_features: int) -> GPTQLinearWeights:
    bits, groups = quant.bits, quant.num_groups(in_features)
    hint = f" for {bits}-bit, group size {quant.group_size or 'none'} (check quantize_config.json)"
    qweight = r.get(f"{name}.qweight", (torch.int32,), (in_features * bits // 32, out_features),
                    hint)
    qzeros = r.get(f"{name}.qzeros", (torch.int32,), (groups, out_features * bits // 32), hint)
    scales = r.get(f"{name}.scales", (torch.float16,), (groups, out_features), hint)
    g_idx = r.optional(f"{name}.g_idx", (torch.int32,), (in_features,))
    if g_idx is None and quant.desc_act:
        raise CheckpointError(f"{r.source}: missing tensor {name}.g_idx, which act-order "
                              "(desc_act) checkpoints need")
    if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0
                                                or int(g_idx.max()) >= groups):
        raise CheckpointError(f"{r.source}: tensor {name}.g_idx has groups "
                              f"{int(g_idx.min())}..{int(g_idx.max())}, expected 0..{groups - 1}")
    bias = r.optional(f"{name}.bias", FLOAT_DTYPES, (out_features,))
    return GPTQLinearWeights(name=name, qweight=qweight, qzeros=qzeros, scales=scales,
                             g_idx=g_idx, bits=bits, group_size=quant.group_size,
                             in_features=in_features, out_features=out_features, bias=bias)


def load_from_tensors(arch: LlamaArchConfig, quant: QuantConfig,
                      tensors: Mapping[str, torch.Tensor], path: str | Path) -> LlamaWeights:
    """Build the weight containers from ``tensors`` (names as in TheBloke's files, e.g.
    ``model.layers.0.self_attn.q_proj.qweight``). ``path`` names the source in errors."""
    source = str(path)
    _check_layout(arch, quant, source)
    r = _Reader(tensors, source)
    h, v, inter = arch.hidden_size, arch.vocab_size, arch.intermediate_size
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    progress = StageProgress(log, "reading weights", arch.num_layers, "layers")
    embed = r.get("model.embed_tokens.weight", FLOAT_DTYPES, (v, h))
    layers = []
    for n in range(arch.num_layers):
        p = f"model.layers.{n}"
        layers.append(LlamaLayerWeights(
            input_layernorm=r.get(f"{p}.input_layernorm.weight", FLOAT_DTYPES, (h,)),
            q_proj=_linear(r, quant, f"{p}.self_attn.q_proj", h, q_out),
            k_proj=_linear(r, quant, f"{p}.self_attn.k_proj", h, kv_out),
            v_proj=_linear(r, quant, f"{p}.self_attn.v_proj", h, kv_out),
            o_proj=_linear(r, quant, f"{p}.self_attn.o_proj", q_out, h),
            post_attention_layernorm=r.get(f"{p}.post_attention_layernorm.weight",
                                           FLOAT_DTYPES, (h,)),
            gate_proj=_linear(r, quant, f"{p}.mlp.gate_proj", h, inter),
            up_proj=_linear(r, quant, f"{p}.mlp.up_proj", h, inter),
            down_proj=_linear(r, quant, f"{p}.mlp.down_proj", inter, h)))
        progress.advance(r.num_bytes)
    norm = r.get("model.norm.weight", FLOAT_DTYPES, (h,))
    if arch.tie_word_embeddings and "lm_head.weight" not in tensors:
        lm_head = embed
    else:
        lm_head = r.get("lm_head.weight", FLOAT_DTYPES, (v, h))
    progress.finish(r.num_bytes)
    unused = [name for name in tensors if name not in r.used]
    if unused:
        # e.g. rotary inv_freq buffers some exporters save; harmless, but worth a trace.
        log.debug("%s: ignoring %d tensors not used by Llama, e.g. %s", source, len(unused),
                  unused[0])
    return LlamaWeights(embed_tokens=embed, layers=layers, norm=norm, lm_head=lm_head)
