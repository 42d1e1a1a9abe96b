"""attnstats: measure what attention does.

Capture attention from any PyTorch model, compute the statistics of *Linear Log-Normal Attention
with Unbiased Concentration* (log-normal fit, entry moments, row entropy, spectral gap, temperature),
and run linearised kernels such as LLN attention alongside on the same queries and keys.

The flow, one package each: ``capture`` (a model → records of q, k) → ``stats`` (statistics of P or of
q, k) → ``metrics`` (a record → its metric table) → ``frame`` (tidy DataFrames); ``kernels`` run
alongside. The command line, the paper's figures and plots live in ``attnstats.app``, which this
package never imports.
"""
from . import kernels, theory
from .budget import DenseTooLargeError, get_memory_budget, memory_budget, set_memory_budget
from .capture import AttentionRecord, NothingCapturedWarning, Recorder, record
from .kernels import fit_moment_matching, get_kernel, use_kernel
from .kernels.linear import linear_spectral_gap
from .stats import (
    EntryMoments,
    LogNormalFit,
    SpectralGap,
    StreamingStats,
    UncertifiedGapWarning,
    entry_moments,
    lognormal_fit,
    row_entropy,
    sample_log_probs,
    spectral_gap,
    spectral_gap_from_qk,
    streaming_lognormal_fit,
    streaming_stats,
)

__version__ = "0.1.0"

__all__ = [
    # capture
    "record", "Recorder", "AttentionRecord", "NothingCapturedWarning",
    # statistics of a dense attention matrix
    "row_entropy", "entry_moments", "EntryMoments", "spectral_gap", "lognormal_fit", "LogNormalFit",
    # the same from q and k, without the N×N matrix
    "streaming_stats", "StreamingStats", "streaming_lognormal_fit", "sample_log_probs",
    "spectral_gap_from_qk", "SpectralGap", "linear_spectral_gap", "UncertifiedGapWarning",
    # kernels alongside
    "kernels", "get_kernel", "use_kernel", "fit_moment_matching",
    # predictions and the memory budget
    "theory", "DenseTooLargeError", "get_memory_budget", "set_memory_budget", "memory_budget",
]
