"""exllamav2's own stack on the same checkpoint folder: its model for logits, and its
ExLlamaV2DynamicGenerator for single-stream speed.

Without the flash-attn package the dynamic generator runs unpaged, one sequence at a time, so
only its single-stream figures (time to first token, decode tok/s) are measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Exl2Results:
    ttft_ms: float
    decode_tokens_per_s: float
    new_tokens: int
    # Last-position logits [V] float32 of its ExLlamaV2 model on the probe prompt, if asked.
    probe_logits: torch.Tensor | None


def load_exl2(folder: Path, max_seq_len: int, exact_attention: bool = False
              ) -> tuple[Any, Any, Any, Any]:
    """-> (config, model, cache, tokenizer), the model loaded on GPU 0 with a batch-1 cache.

    ``exact_attention``: without flash-attn and xformers, exllamav2 0.3.2 attends through
    PyTorch SDPA, and that path passes no causal mask for a multi-token prompt (attn.py: the
    block-diagonal branch is always taken and returns None outside its vision tower), so every
    prompt position also sees later tokens. Its matmul path builds the causal mask; logit
    comparisons use it. Speed runs keep SDPA, exllamav2's fastest path here: the decode steps
    they time are single-token, which need no mask.
    """
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer

    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = max_seq_len
    config.no_flash_attn = True  # not installable on our image; made explicit, not probed
    config.no_sdpa = exact_attention
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=max_seq_len, lazy=True)
    model.load_autosplit(cache, progress=False)
    return config, model, cache, ExLlamaV2Tokenizer(config)


def exl2_logits(folder: Path, prompt: list[int]) -> torch.Tensor:
    """Last-position logits [V] float32 of exllamav2's ExLlamaV2 model on ``prompt``."""
    _, model, cache, _ = load_exl2(folder, max_seq_len=max(256, -(-len(prompt) // 256) * 256),
                                   exact_attention=True)
    try:
        return _last_logits(model, cache, prompt)
    finally:
        model.unload()


def _last_logits(model: Any, cache: Any, prompt: list[int]) -> torch.Tensor:
    cache.current_seq_len = 0
    logits = model.forward(torch.tensor([prompt], dtype=torch.long), cache)  # [1, L, V]
    cache.current_seq_len = 0
    return logits[0, -1].float().cpu()


def bench_exl2_generator(folder: Path, prompt: list[int], new_tokens: int,
                         probe: list[int] | None = None, reps: int = 3) -> Exl2Results:
    """Greedy, no stop tokens: the job runs exactly ``new_tokens`` tokens. Wall-clock times
    around the generator's own loop (enqueue to first token; first to last token), medians over
    reps after one warm-up job."""
    from exllamav2.generator import (
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )

    max_seq_len = -(-(len(prompt) + new_tokens + 1) // 256) * 256
    config, model, cache, tokenizer = load_exl2(folder, max_seq_len)
    try:
        probe_logits = None
        if probe is not None:
            config.no_sdpa = True  # read at forward time: the probe gets causal attention
            probe_logits = _last_logits(model, cache, probe)
            config.no_sdpa = False
        generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer,
                                              paged=False, max_batch_size=1)
        ttfts, rates, count = [], [], 0
        for rep in range(reps + 1):
            # A rotation per repetition: the generator reuses cached prefixes of earlier jobs,
            # which would turn later prefills into one-token lookups.
            ids = torch.tensor([prompt[rep:] + prompt[:rep]], dtype=torch.long)
            job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=new_tokens,
                                      gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                                      stop_conditions=None, identifier=rep)
            start = time.perf_counter()
            generator.enqueue(job)
            first = last = None
            count = 0
            while generator.num_remaining_jobs():
                for result in generator.iterate():
                    got = result.get("token_ids")
                    if result.get("stage") != "streaming" or got is None or not got.numel():
                        continue
                    last = time.perf_counter()
                    first = first or last
                    count += got.numel()
            if first is None or last is None or count < 2:
                raise RuntimeError("the exllamav2 job produced no tokens")
            if rep == 0:
                continue  # warm-up
            ttfts.append((first - start) * 1e3)
            rates.append((count - 1) / (last - first))
        return Exl2Results(sorted(ttfts)[reps // 2], sorted(rates)[reps // 2], count,
                           probe_logits)
    finally:
        model.unload()
