"""Seeded generation and its outputs: `generate` (seeds → per-seed noise → `core.samplers` → uint8 batches, the
training preview grid), `sinks` (PNG folder, NPZ parts, grids), `run` (`run_sample`: `diffit sample` as a function,
the recipe JSON, resume). The solvers themselves live in `core.samplers`; scoring samples in `fid.score`."""
