"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity.

- `inputs`: images (folder, zip, `.npz`, array) and statistics files (EDM, ADM and our layouts);
- `extractors`: Inception-v3 (`inception-v3-compat`) and the offline stand-in `diffit-randconv-v1`;
- `metrics`: `compute_metrics` (features → statistics → one function per metric) and `save_reference`.
- `adm`: ADM's evaluator conventions for IS and precision/recall, and the release's published table.
"""
