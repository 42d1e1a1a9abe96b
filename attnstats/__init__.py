"""attnstats: measure what attention does.

Capture attention from any PyTorch model, compute the statistics of *Linear Log-Normal Attention
with Unbiased Concentration* (log-normal fit, entry moments, row entropy, spectral gap, temperature),
and run linearised kernels such as LLN attention alongside on the same queries and keys.
"""
from . import theory
from .budget import DenseTooLargeError, get_memory_budget, memory_budget, set_memory_budget
from .capture import AttentionRecord, NothingCapturedWarning, Recorder, record
from .lognormal import LogNormalFit, lognormal_fit
from .spectral import spectral_gap
from .stats import EntryMoments, entry_moments, row_entropy
from .streaming import StreamingStats, sample_log_probs, streaming_lognormal_fit, streaming_stats
from .eigen import SpectralGap, linear_spectral_gap, spectral_gap_from_qk
from . import kernels
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

__version__ = "0.1.0"
