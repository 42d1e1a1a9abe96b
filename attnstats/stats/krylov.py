"""λ₂ of many heads at once: a thick-restarted block Krylov–Schur solver over batched attention products.

The per-head ARPACK solver (:mod:`attnstats.stats.arnoldi`) multiplies one vector at a time, and one
head at a time. Here every product is one call for all unfinished heads of a layer, on a block of
``b`` vectors per head: the fused Triton product (attention with ``V = x``) costs about the same for 1
or 15 columns, since computing ``P`` tile by tile is the expensive part. On the CPU, ARPACK on one
head at a time needs fewer operations (a tile of ``P`` is cached per head), and
:func:`attnstats.spectral_gap_from_qk` keeps it there.

For each head the solver keeps a block Krylov decomposition ``A V_j = V_j H_j + F_j E_jᵀ`` (``V_j``
orthonormal, ``F_j`` the next ``b`` basis vectors) of ``A = (I − 1 1ᵀ/N) P``, which keeps ``λ_2 … λ_N``
and sends ``λ_1 = 1`` to 0. When the basis is full it is cut to the invariant subspace of ``H_j`` that
belongs to its eigenvalues of largest modulus (Stewart's Krylov–Schur restart: the cut keeps the
decomposition exact, where a restart from a few Ritz vectors starts over). A head is done when its
``nev`` Ritz values of largest modulus have residuals ``‖A x − θ x‖ ≤ tol·|θ|`` (or at the rounding of
a product), and then leaves the launches.

Certification is that of :func:`attnstats.stats.arnoldi.arnoldi_gap`: the same solve on ``Aᵀ`` gives
the left eigenvector ``u``, and the error bound is ``κ(λ_2)·‖r‖ + |θ_left − θ_right|`` with
``κ = ‖u‖‖x‖ / |uᵀx|`` and the residual ``r`` of the right Ritz pair recomputed by one more product.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .arnoldi import first_order_bound
from .parallel import one_blas_thread

__all__ = ["krylov_gaps", "krylov_bytes_per_head", "KrylovResult", "KRYLOV_BLOCK", "KRYLOV_MIN_TOKENS"]

# Columns per head in one product, and the basis of at most _BLOCKS·b vectors per head between
# restarts. A restart keeps half, so each cycle adds _BLOCKS/2 block steps: the degree of the
# polynomial filter, which convergence on a disc-shaped spectrum needs. Larger blocks need fewer
# passes over q, k, but the restart's eigen-decomposition grows as (_BLOCKS·b)³ on the host. Of
# (b, _BLOCKS) = (15, 24), (8, 24), (8, 16), (4, 32) timed on an H100 with 32 heads at N = 16k,
# (8, 24) was fastest or within 10 % of it (benchmarks/RESULTS.md §3, "all heads at once").
KRYLOV_BLOCK = 8
_BLOCKS = 24
KRYLOV_MIN_TOKENS = _BLOCKS + 4  # fewer tokens leave no room for a basis of _BLOCKS blocks of one vector (and its slack)
_EPS23 = np.finfo(np.float64).eps ** (2 / 3)  # ARPACK's floor on the residual tolerance


def krylov_bytes_per_head(n: int, dtype: torch.dtype, block: int = KRYLOV_BLOCK, blocks: int = _BLOCKS) -> int:
    """Memory of one head's solve at ``n`` tokens: its basis (:func:`largest_eigs`), a copy of it while
    orthogonalising, and its Ritz vectors, in the products' ``dtype`` (float64 on the CPU)."""
    itemsize = torch.finfo(dtype).bits // 8
    # two solves per head (A and Aᵀ) in one batch
    return 2 * (2 * n * (blocks * block + 2 * block + 2) * itemsize + 4 * n * 3 * itemsize)


@dataclass
class KrylovResult:
    """Per head (``[M]`` tensors, CPU): what :func:`krylov_gaps` found.

    lambda2: complex λ₂; products: block products spent (both solves, and the residual check);
    residual: ``‖A x − λ₂ x‖ / ‖x‖`` recomputed from the Ritz vector; converged: both solves met the
    tolerance; error_bound: ``κ(λ₂)·residual + |θ_left − θ_right|`` (``inf`` when the left solve found
    nothing next to λ₂); restarts: of the solve on ``A``.
    """

    lambda2: torch.Tensor
    products: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    error_bound: torch.Tensor
    restarts: torch.Tensor


@dataclass
class _Eigs:
    vals: np.ndarray  # [M, nev] complex Ritz values, largest modulus first
    vecs: torch.Tensor  # [M, N, nev] complex Ritz vectors (device)
    converged: np.ndarray  # [M] bool
    products: np.ndarray  # [M] int
    restarts: np.ndarray  # [M] int
    level: np.ndarray  # [M] largest ‖A x‖ over the orthonormal start block: A's size as seen at the start


def _cholesky_qr(w: torch.Tensor):
    """``w [A, N, b] = Q R`` by Cholesky factors of the Gram matrix (in float64), three passes: batched
    products only, where a Householder QR of many tall blocks is a loop of small kernels on a GPU, and
    nothing that makes the host wait. The first pass factors ``wᵀw + s·I`` with the shift ``s`` of
    Fukaya et al.'s shifted CholeskyQR3 (``11(Nb + b(b+1))·eps·trace``), positive definite whatever the
    rank of ``w``; the two plain passes that follow make ``Q`` orthonormal to rounding. The absolute
    1e-30 keeps an all-zero block at zero instead of 0/0."""
    n, b = w.shape[-2:]
    eye = torch.eye(b, dtype=torch.float64, device=w.device)
    eps = torch.finfo(torch.float64).eps
    q, r = w, None
    for i in range(3):
        gram = q.double().mT @ q.double()  # [A, b, b]
        shift = 1e-30
        if i == 0:
            shift = 11 * (n * b + b * (b + 1)) * eps * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[:, None, None] + 1e-30
        rr = torch.linalg.cholesky_ex(gram + shift * eye, upper=True)[0]  # [A, b, b]
        # R⁻¹ of the small factor, then one batched product: the batched triangular solve with the tall
        # block took 0.3 s of host time in a 2.1 s solve (benchmarks/results/profile_gap_run2.txt)
        q = q @ torch.linalg.inv_ex(rr)[0].to(q.dtype)  # [A, N, b] = q R⁻¹
        r = rr if r is None else rr @ r
    return q, r.to(w.dtype)


def _orthonormal(w: torch.Tensor, basis: torch.Tensor | None):
    """``w [A, N, b]`` made orthonormal and orthogonal to ``basis [A, N, j]``: ``(Q, h, R)`` with
    ``w = basis h + Q R``. Two Gram–Schmidt passes, a QR, and one more pass on ``Q``, so that a block
    that ``A`` sent (nearly) into the basis still leaves an orthonormal ``Q`` (the dependent part is in
    ``h``, its leftover rounding times a tiny ``R``)."""
    if basis is None or basis.shape[-1] == 0:
        q, r = _cholesky_qr(w)  # [A, N, b], [A, b, b]
        return q, None, r
    h = basis.mT @ w  # [A, j, b]
    w = w - basis @ h
    h2 = basis.mT @ w
    w = w - basis @ h2
    h = h + h2
    q, r = _cholesky_qr(w)  # [A, N, b], [A, b, b]
    c = basis.mT @ q  # [A, j, b]
    q, r2 = _cholesky_qr(q - basis @ c)
    return q, h + c @ r, r2 @ r


def _keep(mods: np.ndarray, keep: int, most: int) -> int:
    """How many of the sorted moduli to keep, near ``keep`` and at most ``most``, so that the cut falls
    between two distinct moduli: a complex pair (or a tie) is kept or dropped whole."""
    # A problem may reach its restart with fewer columns than the longest one of the batch (it kept
    # a few less at the last cut), so `most` and `keep` can exceed what it has.
    most = min(most, len(mods) - 1)
    if most < 1:
        return len(mods)
    keep = min(max(keep, 1), most)

    def distinct(k):
        return mods[k - 1] - mods[k] > 1e-12 * mods[0]

    for k in range(keep, most + 1):
        if distinct(k):
            return k
    for k in range(keep - 1, 0, -1):
        if distinct(k):
            return k
    return most


def _ritz(h: np.ndarray, bres: np.ndarray, nev: int, keep: int, most: int, tol: float, floor: float):
    """Ritz pairs of one head's ``H_j [j, j]`` and the subspace a restart keeps; ``bres [b, j]`` are the
    decomposition's residual rows.

    Returns ``(T_k, Z_k, vals, y, res, ok)``: an orthonormal basis ``Z_k [j, k]`` of the invariant
    subspace of ``H_j`` that belongs to its ``≈ keep`` eigenvalues of largest modulus (``most`` at most,
    so that a restarted basis has room to grow; a complex pair is kept whole) and ``T_k = Z_kᵀ H_j Z_k``;
    the ``nev`` Ritz values of largest modulus, their unit coefficient vectors ``y [j, nev]`` in the
    basis, their residual norms ``‖bres y‖``, and whether all are within ``tol·|θ|`` or the ``floor``
    that the products' rounding leaves.

    The subspace comes from the eigenvectors (numpy's ``eig`` releases the GIL, so heads run in
    threads; scipy's Schur form does not), orthonormalised by a QR. Where the eigenvectors are too
    ill-conditioned for that to be invariant to 1e-10 of ``‖H_j‖``, the reordered real Schur form
    (Stewart's Krylov–Schur restart) is used instead.
    """
    w, v = np.linalg.eig(h)  # [j], [j, j]
    order = np.argsort(-np.abs(w), kind="stable")
    mods = np.abs(w[order])
    y = v[:, order[:nev]]  # [j, nev]
    y = y / np.linalg.norm(y, axis=0)
    res = np.linalg.norm(bres @ y, axis=0)  # [nev]
    vals = w[order[:nev]]
    ok = bool(np.all(res <= np.maximum(tol * np.abs(vals), floor)))
    k = _keep(mods, keep, most)
    kept = order[:k]
    # one real vector per real eigenvalue, the real and imaginary parts of one of each complex pair
    parts = [v[:, i].real[:, None] if w[i].imag == 0 else np.stack([v[:, i].real, v[:, i].imag], 1)
             for i in kept if w[i].imag >= 0]
    z = np.linalg.qr(np.concatenate(parts, 1))[0]  # [j, k]
    t = z.T @ h @ z  # [k, k]
    if z.shape[1] != k or np.linalg.norm(h @ z - z @ t) > 1e-10 * np.linalg.norm(h):
        t, z = _schur_kept(h, mods, k)
    return t, z, vals, y, res, ok


def _schur_kept(h: np.ndarray, mods: np.ndarray, k: int):
    """``(T_k, Z_k)`` of the real Schur form of ``h`` reordered so that its ``k`` eigenvalues of largest
    modulus (sorted ``mods``) lead."""
    t, z = scipy.linalg.schur(h, output="real")  # [j, j] each
    if k < len(mods):
        select = _select(t, 0.5 * (mods[k - 1] + mods[k]))
        t, z, _, _, k, _, _, info = scipy.linalg.lapack.dtrsen(select, t, z, job="N")
        if info != 0:
            raise np.linalg.LinAlgError(f"reordering the Schur form failed (dtrsen info {info})")
    return t[:k, :k], z[:, :k]


def _select(t: np.ndarray, threshold: float) -> np.ndarray:
    """``select`` for LAPACK's ``trsen``: the diagonal positions of ``t`` whose eigenvalue modulus is above
    ``threshold`` (both rows of a 2×2 block of a complex pair)."""
    j = t.shape[0]
    sel = np.zeros(j, dtype=np.int32)
    i = 0
    while i < j:
        if i + 1 < j and t[i + 1, i] != 0.0:  # a 2×2 block of a complex pair: |λ|² is its determinant
            a, b, c, d = t[i, i], t[i, i + 1], t[i + 1, i], t[i + 1, i + 1]
            sel[i] = sel[i + 1] = math.sqrt(abs(a * d - b * c)) > threshold
            i += 2
        else:
            sel[i] = abs(t[i, i]) > threshold
            i += 1
    return sel


def largest_eigs(apply, x0: torch.Tensor, *, nev: int, blocks: int, tol: float, max_restarts: int,
                 vanish: float = 0.0) -> _Eigs:
    """The ``nev`` eigenvalues of largest modulus of ``M`` operators at once.

    Args:
        apply: ``(x [A, N, b], rows, rows_on_device) → A_row x`` for the listed problems (``rows``: numpy
            int64 ``[A]``, and the same on ``x``'s device).
        x0: ``[M, N, b]`` start blocks (any full-rank block; made orthonormal here).
        nev: eigenvalues wanted per head.
        blocks: basis of ``blocks·b`` vectors per head before a restart.
        tol: relative residual tolerance.
        max_restarts: restarts at most; heads still unconverged then are reported so.
        vanish: a head whose operator sends the start block to at most this norm is taken to be 0
            (all its eigenvalues 0, converged): its Krylov space would be rounding noise.
    """
    m, n, b = x0.shape
    dev, dt = x0.device, x0.dtype
    basis = blocks * b
    keep = max(2 * nev, basis // 2)
    # A product in float32 is off by ~eps32 of ‖x‖ (each output entry a convex combination of x's
    # entries, summed in float32): residuals below a few times that are rounding, not convergence.
    floor = max(_EPS23, 8 * torch.finfo(dt).eps)
    cols = basis + 2 * b + 2  # a head may keep a few more than `keep` (a pair is not split)
    v = torch.zeros(m, n, cols, dtype=dt, device=dev)  # [M, N, C] bases, zero past each head's own
    q, _, _ = _orthonormal(x0, None)
    v[:, :, :b] = q
    # The decompositions' H stay on the device, so that a block step waits for nothing: the host
    # sees them once per restart round.
    h = torch.zeros(m, cols, cols, dtype=torch.float64, device=dev)  # [M, C, C]
    j = np.zeros(m, dtype=np.int64)  # columns whose images are in the decomposition, per head
    jt = torch.zeros(m, dtype=torch.int64, device=dev)  # the same on the device
    products = np.zeros(m, dtype=np.int64)
    restarts = np.zeros(m, dtype=np.int64)
    level = np.zeros(m)
    vals = np.zeros((m, nev), dtype=complex)
    cdt = torch.complex128 if dt == torch.float64 else torch.complex64
    vecs = torch.zeros(m, n, nev, dtype=cdt, device=dev)
    converged = np.zeros(m, dtype=bool)
    active = np.arange(m)
    blk = torch.arange(b, device=dev)
    pool = ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, m)) if m > 1 else None
    try:
        while active.size:
            act = torch.as_tensor(active, device=dev)  # [A]
            while int(j[active].max()) + b <= basis:
                at = jt[act][:, None] + blk  # [A, b] the newest block's columns
                x = v[act[:, None], :, at].transpose(1, 2)  # [A, N, b]
                w = apply(x, active, act).to(dt)  # [A, N, b]
                products[active] += 1
                if products[active[0]] == 1:  # the first product: how large is A at all?
                    level[active] = w.norm(dim=1).amax(-1).double().cpu().numpy()
                    gone = level[active] <= vanish
                    if gone.any():
                        converged[active[gone]] = True
                        vals[active[gone]] = 0.0
                        live = torch.as_tensor(~gone, device=dev)
                        active, act, w, at = active[~gone], act[live], w[live], at[live]
                        if not active.size:
                            break
                top = int(j[active].max()) + b
                qn, hc, r = _orthonormal(w, v[act, :, :top])  # [A, N, b], [A, top, b], [A, b, b]
                v[act[:, None], :, at + b] = qn.transpose(1, 2)
                # column block j..j+b of each head's H: the projections (rows past a head's own basis
                # are zero, as its basis columns there are) and R below them
                rows = torch.arange(top, device=dev)
                h[act[:, None, None], rows[None, :, None], at[:, None, :]] = hc.double()
                h[act[:, None, None], (at + b)[:, :, None], at[:, None, :]] = r.double()
                j[active] += b
                jt[act] += b
            if not active.size:
                break
            hh = h[act].cpu().numpy()  # [A, C, C]

            def one(a):
                ji = j[active[a]]
                return _ritz(hh[a, :ji, :ji], hh[a, ji:ji + b, :ji], nev, keep, basis - b, tol, floor)

            if pool and active.size > 1:
                # one BLAS thread per head: a pool of multi-threaded LAPACK calls oversubscribes the
                # cores (RESULTS §3: 2.4–7.5× slower on a 16-core host)
                with one_blas_thread():
                    found = list(pool.map(one, range(active.size)))
            else:
                found = [one(a) for a in range(active.size)]
            stop = restarts[active] >= max_restarts
            done = np.array([f[5] for f in found]) | stop
            jmax = int(j[active].max())
            if done.any():  # Ritz vectors of the finished heads, in one product
                fin = np.flatnonzero(done)
                y = np.zeros((fin.size, jmax, nev), dtype=complex)
                for c, a in enumerate(fin):
                    tk, zk, w_, y_, _, ok = found[a]
                    y[c, :y_.shape[0]] = y_
                    vals[active[a]], converged[active[a]] = w_, ok
                yt = torch.from_numpy(y).to(dev)  # [F, j, nev] complex128
                basis_f = v[act[torch.as_tensor(fin, device=dev)], :, :jmax].double()  # [F, N, j]
                vecs[active[fin]] = torch.complex(basis_f @ yt.real, basis_f @ yt.imag).to(cdt)  # [F, N, nev]
            more = np.flatnonzero(~done)
            if more.size:
                # Krylov–Schur restart of the others, in one batch: A (V Z_k) = (V Z_k) T_k + F (E_jᵀ Z_k),
                # then grow from F again. Padded with zeros to the largest j and k of the batch.
                ks = np.array([found[a][0].shape[0] for a in more])
                kmax = int(ks.max())
                z = np.zeros((more.size, jmax, kmax))
                t = np.zeros((more.size, kmax, kmax))
                row = np.zeros((more.size, b, kmax))
                for c, a in enumerate(more):
                    tk, zk = found[a][0], found[a][1]
                    ji, k = j[active[a]], tk.shape[0]
                    z[c, :ji, :k], t[c, :k, :k] = zk, tk
                    row[c, :, :k] = hh[a, ji:ji + b, :ji] @ zk
                rest = act[torch.as_tensor(more, device=dev)]  # [R]
                zt = torch.from_numpy(z).to(device=dev, dtype=dt)  # [R, j, k]
                jr = torch.as_tensor(j[active[more]], device=dev)
                kr = torch.as_tensor(ks, device=dev)
                nxt = v[rest[:, None], :, jr[:, None] + blk]  # [R, b, N] the next block F
                vn = torch.zeros(more.size, n, cols, dtype=dt, device=dev)  # [R, N, C]
                vn[:, :, :kmax] = v[rest, :, :jmax] @ zt
                pos = torch.arange(more.size, device=dev)
                vn[pos[:, None], :, kr[:, None] + blk] = nxt
                v[rest] = vn
                hn = torch.zeros(more.size, cols, cols, dtype=torch.float64, device=dev)  # [R, C, C]
                hn[:, :kmax, :kmax] = torch.from_numpy(t).to(dev)
                hn[pos[:, None, None], (kr[:, None] + blk)[:, :, None], torch.arange(kmax, device=dev)[None, None, :]] = \
                    torch.from_numpy(row).to(dev)
                h[rest] = hn
                j[active[more]] = ks
                jt[rest] = kr
                restarts[active[more]] += 1
            active = active[~done]
    finally:
        if pool:
            pool.shutdown()
    return _Eigs(vals, vecs, converged, products, restarts, level)


def krylov_gaps(op, *, tol: float, block: int = KRYLOV_BLOCK, blocks: int = _BLOCKS, nev: int = 3,
                max_restarts: int = 100, seed: int = 0) -> KrylovResult:
    """``λ₂`` of every head of ``op`` (:class:`attnstats.stats.arnoldi.AttentionOperator` of ``M`` heads of
    ``N`` tokens), certified as :func:`attnstats.stats.arnoldi.arnoldi_gap` certifies one head; the solves
    on ``A`` and on ``Aᵀ`` run together, as one batch of ``2M``.

    Args:
        op: the heads' products ``P x`` and ``Pᵀ x``.
        tol: relative residual tolerance of the Ritz values.
        block: vectors per head in one product (``b``).
        blocks: basis of ``blocks·b`` vectors per head before a restart.
        nev: Ritz values that must converge per head (the largest modulus among them is ``|λ₂|``;
            asking for more than one keeps a neighbour of nearly the same modulus from passing for it).
        max_restarts: restarts at most, per solve.
        seed: seed of the start blocks.
    """
    if blocks < 2 or block < 1:
        raise ValueError(f"blocks, block: a basis of at least 2 blocks of at least 1 vector is needed, got blocks={blocks}, block={block}")
    m, n = op.heads, op.n
    b = max(1, min(block, (n - 2) // (blocks + 2)))  # the basis (with its slack) must stay below N
    dt = op.dtype
    dev = op.q.device
    g = torch.Generator(device=dev).manual_seed(seed)
    x0 = torch.randn(m, n, b, generator=g, dtype=dt, device=dev)  # [M, N, b], drawn where it is used
    x0 = x0 - x0.mean(1, keepdim=True)

    def right(x, heads):  # A x = P x − mean(P x)
        y = op.matmat(x, heads)  # [A, N, b]
        return y - y.mean(1, keepdim=True)

    def left(x, heads):  # Aᵀ x = Pᵀ (x − mean x)
        return op.rmatmat(x - x.mean(1, keepdim=True), heads)  # [A, N, b]

    split = {}  # per set of unfinished problems: which rows are A's, which Aᵀ's, on the device

    def both(x, rows: np.ndarray, rows_dev: torch.Tensor):
        # The solves on A and on Aᵀ run as one batch of 2M problems (rows < M: A of head `row`; the
        # others Aᵀ of head `row − M`): one orthogonalisation, one host round of restarts and one
        # pass of the loop per block step for both, where two solves one after the other take two.
        key = rows.tobytes()
        if key not in split:
            on_a = torch.as_tensor(rows < m, device=dev)
            ia, it = on_a.nonzero()[:, 0], (~on_a).nonzero()[:, 0]
            split.clear()  # only the current set is ever asked for again
            split[key] = (ia, it, rows_dev[ia], rows_dev[it] - m, int((rows < m).sum()))
        ia, it, ha, ht, na = split[key]
        if na == len(rows):
            return right(x, ha)
        if na == 0:
            return left(x, ht)
        out = torch.empty_like(x)  # [A, N, b]
        out[ia] = right(x[ia], ha).to(x.dtype)
        out[it] = left(x[it], ht).to(x.dtype)
        return out

    nev = min(nev, n - 2)
    # Rank-one attention (identical queries or keys) makes A vanish up to rounding: a start block that
    # A sends to the rounding level of a product (~sqrt(N)·eps relative) means λ_2 = 0, as in arnoldi_gap.
    vanish = 64 * math.sqrt(n) * torch.finfo(dt).eps
    e = largest_eigs(both, torch.cat([x0, x0]), nev=nev, blocks=blocks, tol=tol, max_restarts=max_restarts,
                     vanish=vanish)
    level = e.level[:m]
    vanishing = level <= vanish
    todo = np.flatnonzero(~vanishing)
    products = e.products[:m] + e.products[m:]
    bound = np.where(vanishing, 100 * math.sqrt(n) * level, np.inf)
    residual = np.where(vanishing, level, np.inf)
    converged = e.converged[:m] | vanishing
    lam = np.where(vanishing, 0j, e.vals[:m, 0])  # [M] largest modulus first
    if todo.size:
        heads = torch.as_tensor(todo, device=dev)
        x = e.vecs[heads, :, 0]  # [T, N] complex right Ritz vectors of λ₂
        parts = torch.stack([x.real, x.imag], -1).to(dt)  # [T, N, 2]
        ax = right(parts, heads).double()  # [T, N, 2]
        ax = torch.complex(ax[..., 0], ax[..., 1])  # [T, N]
        xd = x.to(torch.complex128)
        lt = torch.as_tensor(lam[todo], device=dev)
        res_t = ((ax - lt[:, None] * xd).norm(dim=1) / xd.norm(dim=1)).cpu().numpy()
        products[todo] += 1
        xs = xd.cpu().numpy()  # [T, N]
        for a, i in enumerate(todo):
            jn = int(np.argmin(np.abs(e.vals[m + i] - lam[i])))
            if math.isfinite(res_t[a]):
                u = e.vecs[m + i, :, jn].to(torch.complex128).cpu().numpy()  # [N] eigenvector of Aᵀ next to λ₂
                bound[i] = first_order_bound(u, xs[a], res_t[a], e.vals[m + i, jn], lam[i])
            residual[i] = res_t[a]
            converged[i] = e.converged[i] and e.converged[m + i]
    return KrylovResult(
        lambda2=torch.from_numpy(lam.astype(np.complex128)),
        products=torch.from_numpy(products),
        residual=torch.from_numpy(residual.astype(np.float64)),
        converged=torch.from_numpy(converged),
        error_bound=torch.from_numpy(bound.astype(np.float64)),
        restarts=torch.from_numpy(e.restarts[:m]),
    )
