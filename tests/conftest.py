"""Test-wide settings: nothing downloads (HF_HUB_OFFLINE, a private TORCH_HOME)."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="diffit-torch-home-"))
os.environ.pop("DIFFIT_DEBUG", None)
