"""The sampler's core: the stage (one model evaluation and one fused-kernel call), its tables, argument checks,
model calls, buffers, the plan of a call and the executor that runs it (docs/design.md §2)."""
