"""attnstats: measure what attention does.

Capture attention from any PyTorch model, compute the statistics of *Linear Log-Normal Attention
with Unbiased Concentration* (log-normal fit, entry moments, row entropy, spectral gap, temperature),
and run linearised kernels such as LLN attention alongside on the same queries and keys.
"""
from . import kernels, plot, reproduce, theory
from .budget import DenseTooLargeError, get_memory_budget, memory_budget, set_memory_budget
from .capture import AttentionRecord, NothingCapturedWarning, Recorder, record
from .eigen import SpectralGap, linear_spectral_gap, spectral_gap_from_qk
from .kernels import (
    BlockDiagonalAttention,
    LinearAttention,
    LLNAttention,
    LLNPlusDiagAttention,
    SoftmaxAttention,
    fit_moment_matching,
    get_kernel,
    use_kernel,
)
from .lognormal import LogNormalFit, lognormal_fit
from .spectral import UncertifiedGapWarning, spectral_gap
from .stats import EntryMoments, entry_moments, row_entropy
from .streaming import StreamingStats, sample_log_probs, streaming_lognormal_fit, streaming_stats

__version__ = "0.1.0"

__all__ = [
    # statistics of a dense attention matrix
    "row_entropy", "entry_moments", "EntryMoments", "spectral_gap", "lognormal_fit", "LogNormalFit",
    # the same without the N×N matrix
    "streaming_stats", "StreamingStats", "streaming_lognormal_fit", "sample_log_probs",
    "spectral_gap_from_qk", "SpectralGap", "linear_spectral_gap", "UncertifiedGapWarning",
    # capture
    "record", "Recorder", "AttentionRecord", "NothingCapturedWarning",
    # kernels
    "kernels", "get_kernel", "SoftmaxAttention", "LLNAttention", "BlockDiagonalAttention", "LLNPlusDiagAttention",
    "LinearAttention", "fit_moment_matching", "use_kernel",
    # predictions, figures, memory budget
    "theory", "plot", "reproduce",
    "DenseTooLargeError", "get_memory_budget", "set_memory_budget", "memory_budget",
]
