"""Inputs shared by the tests: Gaussian queries/keys and their dense float64 softmax attention."""
import torch


def gaussian_qk(batch, n, d, sigma_q=1.0, sigma_k=1.0, seed=0, dtype=torch.float64):
    """``q, k: [*batch, n, d]`` with i.i.d. N(0, σ²) entries, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n, d, generator=g, dtype=dtype) * sigma_q
    k = torch.randn(*batch, n, d, generator=g, dtype=dtype) * sigma_k
    return q, k


def softmax_attention(q, k, mask=None, scale=None):
    """Dense float64 softmax attention ``[..., Nq, Nk]``; masked entries are exactly 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1)
