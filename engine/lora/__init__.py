"""LoRA adapters on the quantised base: PEFT loading, the adapter registry, synthetic adapters."""
