"""The engine core: sequences, KV block manager, scheduler, runner, the step and its process.

Ownership runs one way: core_loop -> LLMEngine -> (Scheduler -> BlockManager) and
(ModelRunner -> model, KV cache, sampler). The scheduler and block manager import no torch;
``process`` (the core process's entry point) imports the rest only once it runs.
"""
