"""Stages the engine's run loop calls around the per-layer methods: OWL sparsity allocation (before
pruning) and block reconstruction (after each block is pruned)."""
