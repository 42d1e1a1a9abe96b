"""Statistics of attention: from the matrix P (``dense``, ``lognormal``, ``spectral``) and from q, k
alone (``qk``, built on the one-pass ``online`` reference and its fused ``online_triton`` twin;
``arnoldi`` is the matrix-free eigen-solver behind the spectral gap of long heads; ``parallel`` shares
numpy's one-core work on many small matrices out over the CPU threads)."""
from .dense import EntryMoments, entry_moments, row_entropy
from .lognormal import LogNormalFit, lognormal_fit
from .qk import StreamingStats, sample_log_probs, streaming_lognormal_fit, streaming_stats
from .spectral import SpectralGap, UncertifiedGapWarning, spectral_gap, spectral_gap_from_qk

__all__ = [
    "row_entropy", "entry_moments", "EntryMoments", "lognormal_fit", "LogNormalFit",
    "spectral_gap", "spectral_gap_from_qk", "SpectralGap", "UncertifiedGapWarning",
    "streaming_stats", "StreamingStats", "sample_log_probs", "streaming_lognormal_fit",
]
