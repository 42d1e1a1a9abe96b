"""Shared by the tests: Gaussian queries/keys, their dense float64 softmax attention, and a script run
under Triton's interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


def run_interpreted(script: str, timeout: int = 300) -> str:
    """The stdout of ``script`` run in a fresh Python with ``TRITON_INTERPRET=1`` and the repository first
    on the path: Triton reads the variable when a kernel is decorated, i.e. when attnstats' Triton modules
    are first imported, so the check cannot run in the test's own process. Fails with the script's
    output if it exits non-zero."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def printed_numbers(stdout: str) -> dict:
    """``{name: float}`` of the lines ``NAME value`` a script printed."""
    return {name: float(value) for name, value in (line.split() for line in stdout.splitlines() if line.strip())}
