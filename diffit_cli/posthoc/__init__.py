"""EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3.1 and App. C.3) from the files a run leaves: the maths is
`core/posthoc_ema.py`, and here

- `store`: the snapshots training writes under `RUN_DIR/posthoc-ema/` and reading them back;
- `reconstruct`: `reconstruct`, any σ_rel as a least-squares combination of the snapshots, written as an ordinary
  checkpoint (`diffit ema`);
- `sweep`: `sweep`, each reconstruction scored with `fid.score.score_checkpoint`, a table and a plot of FID
  against σ_rel (`diffit ema --sweep`).

The package's `__init__` imports nothing: training imports `store` alone.
"""
