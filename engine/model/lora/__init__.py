"""LoRA deltas beside the quantised linears: adapter slots, the per-row side input, kernels."""
