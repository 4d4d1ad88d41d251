"""The engine core: sequences, KV block manager, scheduler, runner, step loop and async front.

Ownership runs one way: AsyncEngine -> LLMEngine -> (Scheduler -> BlockManager) and
(ModelRunner -> model, KV cache, sampler). The scheduler and block manager import no torch.
"""
