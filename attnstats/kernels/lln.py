"""Linear Log-Normal (LLN) attention (docs/theory.md §4).

Feature maps ``φ_Q(q) = exp(α q)``, ``φ_K(k) = exp(β k)`` element-wise (``r = d``). Moment matching
picks the feature scale ``s = ασ_q = βσ_k`` at which LLN's ``Var[ln P]`` equals softmax attention's on
the same q, k (``σ_q, σ_k``: standard deviations of the whole q and k tensors, no gradient), by one of
the rules of :mod:`attnstats.kernels.moment_matching`: ``"curve"`` (the measured LLN curve of the head
dim, inverted; the default) or ``"paper"`` (the paper's straight line ``a·σ_t² + b``).
"""
from __future__ import annotations

import math

import torch

from .. import theory
from ..validation import check_finite, compute_dtype
from .base import _register, check_count, check_real
from . import lln_triton
from .linear import LogFeatureAttention, _key_spread, causal_underflow_limit
from .moment_matching import MATCHING_RULES, curve_feature_scale

__all__ = ["LLNAttention"]


def _std(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation of all entries of ``x`` (divisor ``M − 1``) as a 0-dim float64 tensor on its
    device, computed in attnstats' compute dtype (float64 on the CPU; float32 on a GPU unless the
    input is float64: a float64 copy of a large bf16 tensor would cost eight bytes per entry, and
    torch's reduction keeps float32 to about 1e-6). NaN for fewer than two entries."""
    x = x.detach()
    if x.numel() < 2:
        return torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    return x.to(compute_dtype(x)).std().to(torch.float64)


class LLNAttention(LogFeatureAttention):
    """Linear Log-Normal attention ``P_ij ∝ Σ_l exp(α q_il + β k_jl)``.

    Args:
        moment_matching: if True, ``α, β`` from the moment-matching rule (see :meth:`alpha_beta`);
            if False, ``α = β = 1`` ("before moment matching").
        matching: the rule, ``"curve"`` (default: LLN's measured log-variance curve for the head dim,
            inverted at softmax's ``σ² + σ⁴/(2d)``; within 5 % of softmax's ``Var[ln P]`` for ``σ_qσ_k``
            from 0.25 to 2) or ``"paper"`` (the paper's line ``σ_q²σ_k² = a·σ_t² + b``).
        a, b: constants of the paper's line, ``matching="paper"`` only (defaults: the paper's values
            for d = 64; refit for another head dim with :func:`attnstats.fit_moment_matching`); given
            with the curve rule they raise ``ValueError``.
        eps: guard against zero denominators, at most a relative change of ``eps`` (default 1e-8: far
            below float32 resolution; see :mod:`attnstats.kernels.linear`).
        scale: the softmax scale whose score variance is matched; None = ``1/sqrt(d)``. With another
            scale ``c`` the matched score variance is ``c²·d·σ_q²σ_k²``.
        chunk: tokens per chunk of the causal algorithm of the PyTorch path (default 64 for the product
            form, a memory-bounded size for the log-space algorithm); the fused kernels use their own
            tiles (64 tokens, 32 for head dims above 64).

    On a GPU, q, k, v of one dtype with no mask run as fused Triton kernels
    (:mod:`attnstats.kernels.lln_triton`: features formed in the kernels, float32 arithmetic, a few
    launches); other calls take the PyTorch path of :mod:`attnstats.kernels.linear`, float32 for half
    and float32 inputs (float64 for float64), except causal bfloat16 with fla installed
    (:func:`attnstats.kernels.linear.linear_attention_causal`). Non-causal in ``O(N·d·d_v)``; causal in
    chunks by matrix products, ``O(N)`` time and memory; key-padding masks supported (padded keys get
    no attention, padded queries give 0). On the fused non-causal path with the curve rule (or none),
    σ_q, σ_k and the rule are computed on the device and read back once, after the kernels are queued,
    for the finiteness check (skipped inside CUDA-graph capture, which can read nothing: the call can
    then be captured); elsewhere σ_q and σ_k are read from the device once per call (one small
    transfer, with the finiteness checks), and the rule is evaluated on the host.
    """

    def __init__(self, moment_matching: bool = True, a: float | None = None, b: float | None = None,
                 eps: float = 1e-8, scale: float | None = None, chunk: int | None = None, *, matching: str = "curve"):
        super().__init__()
        a = check_real(a, "a", low=0, strict=True, none_ok=True)
        b = check_real(b, "b", none_ok=True)
        eps = check_real(eps, "eps", low=0)
        scale = check_real(scale, "scale", low=0, strict=True, none_ok=True)
        chunk = check_count(chunk, "chunk")
        if matching not in MATCHING_RULES:
            raise ValueError(f"matching: unknown rule {matching!r}, expected one of {', '.join(MATCHING_RULES)}")
        if matching == "curve" and (a is not None or b is not None):
            raise ValueError(f"{'a' if a is not None else 'b'}: the constants of the paper's line apply to "
                             "matching='paper' only; the default rule, matching='curve', has none")
        a = theory.LLN_A if a is None else a
        b = theory.LLN_B if b is None else b
        self.moment_matching = bool(moment_matching)
        self.matching = matching
        self.name = "lln_no_mm" if not self.moment_matching else ("lln" if matching == "curve" else "lln_paper")
        self.a, self.b = float(a), float(b)
        self.eps = float(eps)
        self.scale = scale
        self.chunk = chunk

    def extra_repr(self) -> str:
        rule = f"matching={self.matching!r}" + (f", a={self.a}, b={self.b}" if self.matching == "paper" else "")
        return f"moment_matching={self.moment_matching}, {rule}, eps={self.eps}"

    @torch.no_grad()
    def alpha_beta(self, q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
        """The temperatures ``(α, β)`` used for these q, k (Python floats).

        ``σ_q, σ_k`` are the standard deviations of all entries of ``q`` and ``k`` (``torch.std``,
        divisor ``M − 1``), as in the paper's reference implementation, read from the device in one
        transfer. Without moment matching, ``(1.0, 1.0)``. A constant tensor (σ = 0, or a single
        entry) gives features that do not depend on it, so its σ is replaced by 1.
        """
        if not self.moment_matching:
            return 1.0, 1.0
        sq, sk = torch.stack([_std(q), _std(k)]).tolist()
        return self._rule(sq, sk, q.shape[-1])

    def _rule(self, sq: float, sk: float, d: int) -> tuple[float, float]:
        """``(α, β)`` from ``σ_q, σ_k`` (floats; NaN or ≤ 0 read as 1) for head dim ``d``; ``(1, 1)`` without
        moment matching."""
        if not self.moment_matching:
            return 1.0, 1.0
        sq, sk = (v if v > 0 else 1.0 for v in (sq, sk))  # NaN > 0 is False
        c = self._scale_factor(d)
        if self.matching == "curve":
            s = curve_feature_scale((c * sq * sk) ** 2, d)  # the feature scale ασ_q = βσ_k
            return s / sq, s / sk
        alpha, beta = theory.lln_alpha_beta(sq * c**0.5, sk * c**0.5, self.a, self.b)
        return float(alpha) * c**0.5, float(beta) * c**0.5

    def log_features(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype):
        """``(α q, β k)`` in ``dtype``: the logarithms of the LLN features."""
        qd, kd = q.to(dtype), k.to(dtype)  # [B, H, N, d], [B, H, M, d]
        # σ of the converted tensors: the same numbers (half to float32 is exact), one conversion each
        alpha, beta = self.alpha_beta(qd, kd)  # Python floats: α, β carry no gradient
        return self._scaled(q, qd, alpha), self._scaled(k, kd, beta)

    @staticmethod
    def _scaled(x, xd, factor):
        # a fresh conversion is scaled in place (one pass less); the caller's own tensor never is
        return xd.mul_(factor) if xd is not x else xd * factor

    def _output(self, q, k, v, causal: bool, mask, checked: bool = False) -> torch.Tensor:
        """The output by the fused Triton kernels where they apply (:func:`lln_triton.applies`: CUDA
        tensors of one dtype, no mask), else by the PyTorch path of the base class."""
        if lln_triton.applies(q, k, v, mask):
            out = self._fused_output(q, k, v, causal, checked)
            if out is not None:
                return out
            checked = True  # keys too spread out for the fused causal path: the log-space path, below
        return super()._output(q, k, v, causal, mask, checked)

    def _fused_output(self, q, k, v, causal: bool, checked: bool = False, diag=None):
        """The output ``[B, H, N, d_v]`` by the fused kernels, or None when causal keys are spread too far
        for them (then q, k, v have been checked). ``diag``: LLN+Diag's ``(scale, w_L, w_D)`` to fold its
        block softmax in (:func:`lln_triton.fuses_diag`), or None."""
        if not causal and (self.matching == "curve" or not self.moment_matching):
            return self._device_rule_output(q, k, v, checked, diag)
        st = lln_triton.moments(q, k, v, spread=causal)  # the one host sync
        if not checked:
            _check_read(q, k, v, st.sigma_q, st.sigma_k, st.v_finite)
        alpha, beta = self._rule(st.sigma_q, st.sigma_k, q.shape[-1])
        if not causal:
            return lln_triton.lln_noncausal(q, k, v, alpha, beta, self.eps, st, diag)  # [B, H, N, d_v]
        if st.spread * beta <= causal_underflow_limit(torch.float32):
            return lln_triton.lln_causal(q, k, v, alpha, beta, self.eps, st, diag)  # [B, H, N, d_v]
        return None

    def _scale_factor(self, d: int) -> float:
        """``c`` of the softmax scale ``c/sqrt(d)`` whose scores are matched (variance ``c²·σ_q²σ_k²``)."""
        return 1.0 if self.scale is None else float(self.scale) * d**0.5

    def _device_rule_output(self, q, k, v, checked: bool, diag):
        """Non-causal with the curve rule (or none): σ and the rule on the device
        (:func:`lln_triton.device_rule`), so no launch waits for the host. The finiteness check then reads
        σ and v's count of non-finite entries after every kernel is queued (one transfer), and not at all
        while a CUDA graph is being captured, where nothing can be read (NaN in, NaN out) or when the
        caller has checked q, k, v."""
        st, ab = lln_triton.device_rule(q, k, v, self._scale_factor(q.shape[-1]), curve=self.moment_matching)
        out = lln_triton.lln_noncausal(q, k, v, ab, None, self.eps, st, diag)  # [B, H, N, d_v]
        if not checked and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            sq, sk, v_bad = ab[2:5].tolist()  # the one host transfer
            _check_read(q, k, v, sq, sk, v_bad == 0)
        return out

    def _checked_features(self, q, k, v, dtype, causal: bool, key_valid, checked: bool):
        """:meth:`LogFeatureAttention._checked_features` with one device transfer for everything: σ_q and
        σ_k (NaN or inf exactly when q or k holds a NaN or an inf, so they double as its finiteness check),
        v's finiteness flag, and for a causal call the keys' spread, which for ``βk`` is β times k's."""
        qd, kd = q.to(dtype), k.to(dtype)  # [B, H, N, d], [B, H, M, d]
        with torch.no_grad():
            parts = [_std(qd), _std(kd), torch.isfinite(v).all().to(torch.float64)]
            if causal:
                parts.append(_key_spread(kd, key_valid, finite=True)[0].to(torch.float64))
            sq, sk, v_ok, *spread_k = torch.stack(parts).tolist()  # the one host sync
        if not checked:
            _check_read(q, k, v, sq, sk, v_ok == 1.0)
        alpha, beta = self._rule(sq, sk, q.shape[-1])
        spread = spread_k[0] * beta if causal else None  # β > 0: the spread of βk
        return self._scaled(q, qd, alpha), self._scaled(k, kd, beta), spread


def _check_read(q, k, v, sq: float, sk: float, v_finite: bool) -> None:
    """Raise, naming the first bad entry, when the σ read from the device say q or k holds a NaN or an
    inf, or v is not finite. (A finite q whose variance overflows passes on: its σ reads as 1, as a
    constant tensor's.)"""
    if not (math.isfinite(sq) and math.isfinite(sk)):
        check_finite(q, "q")
        check_finite(k, "k")
    if not v_finite:
        check_finite(v, "v")


_register("lln", LLNAttention, moment_matching=True, matching="curve")
_register("lln_paper", LLNAttention, moment_matching=True, matching="paper")
_register("lln_no_mm", LLNAttention, moment_matching=False)
