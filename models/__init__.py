"""FILIP model math: towers, per-token projections, late interaction and loss. Pure torch, no I/O."""
