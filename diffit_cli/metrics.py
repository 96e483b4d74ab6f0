"""The metrics' public names (`diffit_cli.fid` holds the code): compute_metrics, save_reference, read_stats."""

from diffit_cli.fid.extractors import (
    INCEPTION,
    TEST_EXTRACTOR,
    RandConvFeatureExtractor,
    inception_weights_cache_path,
    register_test_extractor,
)
from diffit_cli.fid.inputs import read_stats
from diffit_cli.fid.metrics import FID_PROTOCOL_SAMPLES, METRICS, compute_metrics, save_reference

__all__ = [
    "INCEPTION",
    "TEST_EXTRACTOR",
    "METRICS",
    "FID_PROTOCOL_SAMPLES",
    "RandConvFeatureExtractor",
    "compute_metrics",
    "save_reference",
    "read_stats",
    "register_test_extractor",
    "inception_weights_cache_path",
]
