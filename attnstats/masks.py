"""The one mask vocabulary of attnstats.

Every public function takes ``mask``: bool, True = attend, broadcastable to the attention shape
``[..., Nq, Nk]``, together with ``causal: bool`` (query ``i`` attends keys ``j ≤ i``, top-left
aligned). Key padding is ``[..., 1, Nk]``: one row shared by every query, read in ``O(Nk)``. Every
conversion between that form and the others the code needs lives here:

- the entries: :func:`broadcast_mask`, :func:`combine` (``mask`` and ``causal`` as one mask),
  :func:`full_mask` (the same expanded to the attention shape), :func:`causal_mask`;
- key padding: :func:`is_key_padding`, :func:`from_padding` (``[..., N]`` → ``[..., 1, N]``);
- tokens: :func:`valid_parts` (queries with a valid key, keys some query attends),
  :func:`valid_tokens` (tokens valid as query and key: the square block a spectral gap is taken on),
  :func:`block_tokens` (the same, for statistics that accept only key padding plus ``causal``);
- padding parts ``mask_ij = query_valid_i & key_valid_j`` of linearised attention:
  :func:`padding_parts`, :func:`from_parts`, :func:`tokens_of_parts`;
- the errors a mask that leaves nothing raises: :func:`no_valid_entry` (from :mod:`attnstats.validation`,
  whose checks raise it too), :func:`no_token`.

Shapes: ``shape`` arguments are the attention shape ``(*batch, Nq, Nk)``; token masks are
``[*batch, N]``. Functions never modify their inputs; results may be broadcast views.
"""
from __future__ import annotations

import torch

from .validation import first_index, no_valid_entry

__all__ = [
    "check_mask",
    "broadcast_mask",
    "is_key_padding",
    "from_padding",
    "causal_mask",
    "combine",
    "full_mask",
    "valid_parts",
    "valid_tokens",
    "block_tokens",
    "padding_parts",
    "from_parts",
    "tokens_of_parts",
    "check_parts",
    "no_valid_entry",
    "no_token",
]


def check_mask(mask, name: str = "mask") -> torch.Tensor | None:
    """``mask`` itself if it is None or a bool tensor (True = attend); TypeError naming ``name`` otherwise."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool (True = attend), got {mask.dtype}")
    return mask


def is_key_padding(mask: torch.Tensor) -> bool:
    """True when the bool ``mask`` is the same for every query: ``[..., 1, Nk]``, ``[Nk]``, or such a
    mask expanded along the query axis (stride 0). Read from the shape and strides only, never the values."""
    return mask.dim() < 2 or mask.shape[-2] == 1 or mask.stride(-2) == 0


def broadcast_mask(mask, shape, name: str = "mask", *, keep_key_padding: bool = False, device=None):
    """``mask`` as a bool view expanded to the attention ``shape`` ``(*batch, Nq, Nk)``, or None.

    Args:
        mask: bool, broadcastable to ``shape``, True = attend, or None.
        shape: the attention shape.
        name: the argument named in errors.
        keep_key_padding: a key-padding mask (:func:`is_key_padding`) comes back as
            ``(*batch, 1, Nk)`` instead, so that it stays ``O(Nk)`` per matrix.
        device: move the mask there first (before expanding: only the mask's own entries move).

    Raises TypeError for a mask that is not a bool tensor and ValueError for one that does not
    broadcast to ``shape``.
    """
    m = check_mask(mask, name)
    if m is None:
        return None
    shape = tuple(shape)
    if device is not None:
        m = m.to(device)
    try:
        full = m.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name}: shape {tuple(m.shape)} does not broadcast to the attention shape {shape}") from None
    if keep_key_padding and is_key_padding(m):
        return full[..., :1, :]
    return full


def from_padding(padding, name: str = "padding_mask") -> torch.Tensor:
    """Token padding ``[..., N]`` (True = real token) as the key-padding mask ``[..., 1, N]`` (a view)."""
    p = check_mask(padding, name)
    if p is None or p.dim() < 1:
        raise TypeError(f"{name}: expected a bool torch.Tensor [..., N], True = real token, got {p!r}")
    return p[..., None, :]


def causal_mask(nq: int, nk: int, device=None, *, row0: int = 0) -> torch.Tensor:
    """Bool ``[nq, nk]``: True where key ``j ≤ row0 + i`` (row ``i`` of the block starting at query ``row0``)."""
    rows = torch.arange(row0, row0 + nq, device=device)[:, None]
    return torch.arange(nk, device=device)[None, :] <= rows


def combine(mask, causal: bool, nq: int, nk: int, device=None) -> torch.Tensor | None:
    """``mask`` and the causal rule as one bool mask broadcastable to ``[..., Nq, Nk]``, or None if neither.

    ``mask`` (bool, broadcastable to ``[..., Nq, Nk]``, or None) keeps its broadcast dims: the
    result is only as large as ``mask`` and ``[Nq, Nk]`` together. ``device``: where the causal
    pattern is built when there is no mask (default: the mask's device, else the CPU).
    """
    if not causal:
        return mask
    tril = causal_mask(nq, nk, mask.device if mask is not None else device)
    return tril if mask is None else mask & tril


def full_mask(mask, shape, causal: bool = False, device=None, name: str = "mask") -> torch.Tensor | None:
    """``mask`` and the causal rule as one bool mask expanded to ``shape`` ``(*batch, Nq, Nk)``, or None.

    The result is a broadcast view of :func:`combine`: no larger in memory than ``mask`` and
    ``[Nq, Nk]`` together. Raises as :func:`broadcast_mask` for a bad mask.
    """
    shape = tuple(shape)
    broadcast_mask(mask, shape, name)  # raises for a mask of another type or shape
    m = combine(mask, causal, shape[-2], shape[-1], device)
    return None if m is None else m.expand(shape)


def valid_parts(mask, causal: bool, shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query_valid [*batch, Nq], key_valid [*batch, Nk])``: queries with at least one valid key, and
    keys that some query attends, under ``mask`` and ``causal`` (bool views).

    ``shape`` is ``(*batch, Nq, Nk)``. A key-padding mask costs ``O(Nk)`` per matrix; another mask
    is read in full. ``device``: where the result lives when ``mask`` is None.
    """
    shape = tuple(shape)
    *batch, nq, nk = shape
    m = check_mask(mask)
    if m is None:
        qv = torch.ones((*batch, nq), dtype=torch.bool, device=device)
        kv = torch.ones((*batch, nk), dtype=torch.bool, device=device)
        if causal:  # key j is attended by query j (top-left causal): only keys j < Nq are
            kv = kv & (torch.arange(nk, device=device) < nq)
        return qv, kv
    if is_key_padding(m):
        kp = broadcast_mask(m, shape, keep_key_padding=True)[..., 0, :]  # [*batch, Nk]
        if causal:
            # row i has a valid key iff one of keys 0..min(i, Nk − 1) is valid
            seen = kp.cumsum(-1) > 0
            qv = seen[..., torch.arange(nq, device=m.device).clamp(max=nk - 1)]
            return qv, kp & (torch.arange(nk, device=m.device) < nq)
        return kp.any(-1, keepdim=True).expand(*batch, nq), kp
    eff = full_mask(m, shape, causal)
    return eff.any(-1), eff.any(-2)


def valid_tokens(mask, causal: bool, shape, device=None) -> torch.Tensor:
    """Bool ``[*batch, N]``: the tokens valid both as a query (a row with a valid key) and as a key
    (attended by some query); the square block a spectral gap is taken on. ``shape`` is ``(*batch, N, N)``.

    For key padding these are the key-valid tokens; for a dense mask ``m``, ``m.any(-1) & m.any(-2)``.
    """
    qv, kv = valid_parts(mask, causal, shape, device)
    return qv & kv


def block_tokens(mask, causal: bool, shape, name: str = "mask", user: str = "this statistic") -> torch.Tensor | None:
    """Valid tokens ``[*batch, N]`` of a mask that must be key padding plus ``causal``, or None for no mask.

    For statistics computed from ``q, k`` on the square block of the valid tokens ``T``
    (:func:`valid_tokens`): each query of ``T`` must attend exactly the keys of ``T`` (``j ≤ i`` when
    ``causal``), as with key padding ``[..., 1, N]``. Key padding is accepted in ``O(N)``; another
    mask is read in full and accepted when it meets that rule on the rows of ``T`` (e.g. key padding
    whose padded query rows were cleared).

    Raises:
        ValueError: naming ``name``, for a matrix with no valid entry or no valid token
            (:func:`no_valid_entry`, :func:`no_token`; index into ``shape[:-2]``), or for a mask that
            breaks the rule (naming the first entry, as ``(*batch, i, j)``, and ``user``).
    """
    shape = tuple(shape)
    m = check_mask(mask, name)
    if m is None:
        return None
    if is_key_padding(m):
        tokens = broadcast_mask(m, shape, name, keep_key_padding=True)[..., 0, :]
        empty = ~tokens.any(-1)
        if bool(empty.any()):
            raise no_valid_entry(first_index(empty), name)
        return tokens
    eff = full_mask(m, shape, causal, name=name)
    empty = ~eff.flatten(-2).any(-1)
    if bool(empty.any()):
        raise no_valid_entry(first_index(empty), name)
    tokens = eff.any(-1) & eff.any(-2)
    none = ~tokens.any(-1)
    if bool(none.any()):
        raise no_token(first_index(none), name, user)
    want = tokens[..., None, :] & tokens[..., :, None]
    if causal:
        want = want & causal_mask(shape[-2], shape[-1], m.device)
    bad = (eff != want) & tokens[..., :, None]  # rows outside T are left out of the block
    if bool(bad.any()):
        idx = first_index(bad)
        raise ValueError(
            f"{name}: {user} takes key padding [..., 1, N] (and causal=True for a causal pattern): each valid "
            f"token attends exactly the valid tokens{' j <= i' if causal else ''}; entry {idx} is {bool(eff[idx])}, "
            f"expected {bool(want[idx])}"
        )
    return tokens


def padding_parts(mask, shape, causal: bool, name: str = "mask", user: str = "this function"):
    """Split a padding mask into ``(query_valid [*batch, Nq] | None, key_valid [*batch, Nk] | None)``.

    A padding mask only removes tokens: ``mask_ij = query_valid_i & key_valid_j`` (``& j ≤ i`` when
    ``causal``); key padding ``[..., 1, Nk]`` is the usual case and is read without any ``Nq × Nk``
    work (its ``query_valid`` is None). ``query_valid`` is None when every query is valid; both are
    None for no mask. ``shape`` is ``(*batch, Nq, Nk)``.

    Raises ValueError naming ``name``, ``user`` (what supports only padding masks, e.g.
    ``"kernel 'relu' is linearised and"``) and the first entry that breaks the rule.
    """
    shape = tuple(shape)
    m = broadcast_mask(mask, shape, name)
    if m is None:
        return None, None
    if is_key_padding(m):
        return None, m[..., 0, :]
    eff = combine(m, causal, shape[-2], shape[-1])
    query_valid, key_valid = eff.any(-1), eff.any(-2)
    expected = combine(query_valid[..., :, None] & key_valid[..., None, :], causal, shape[-2], shape[-1])
    bad = expected != eff
    if bool(bad.any()):
        idx = first_index(bad)
        raise ValueError(
            f"{name}: {user} supports only padding masks (True exactly where query i and key j are both real "
            f"tokens{', j <= i' if causal else ''}), such as a key-padding mask of shape [B, 1, 1, N]; entry "
            f"{idx} is {bool(eff[idx])}, expected {bool(expected[idx])}"
        )
    if bool(query_valid.all()):
        query_valid = None
    return query_valid, key_valid


def from_parts(query_valid, key_valid, causal: bool, shape, device=None) -> torch.Tensor | None:
    """The dense bool mask ``shape`` ``(*batch, Nq, Nk)`` of padding parts (``[*batch, Nq]``,
    ``[*batch, Nk]``, each or None) and the causal rule; None when every entry is valid."""
    if query_valid is None and key_valid is None and not causal:
        return None
    v = torch.ones(tuple(shape), dtype=torch.bool, device=device)
    if key_valid is not None:
        v = v & key_valid[..., None, :]
    if query_valid is not None:
        v = v & query_valid[..., :, None]
    if causal:
        v = v & causal_mask(shape[-2], shape[-1], device)
    return v


def tokens_of_parts(query_valid, key_valid) -> torch.Tensor | None:
    """Tokens ``[*batch, N]`` valid as both query and key, from padding parts (each or None); None for all."""
    if query_valid is None:
        return key_valid
    if key_valid is None:
        return query_valid
    return query_valid & key_valid


def check_parts(query_valid, key_valid, causal: bool, name: str = "mask", user: str = "spectral_gap") -> None:
    """Raise, as :func:`attnstats.spectral_gap` does on the dense matrix, for a matrix whose padding parts
    (``[*batch, N]`` each, or None) leave no valid entry, or no token valid as both query and key."""
    if key_valid is None and query_valid is None:
        return  # no mask: every entry (on and below the diagonal when causal) is valid
    if key_valid is None:
        key_valid = torch.ones_like(query_valid)
    if causal:  # entry (i, j) valid iff query i and key j are valid and j <= i
        rows = key_valid.cumsum(-1) > 0
        has_entry = (rows if query_valid is None else rows & query_valid).any(-1)
    else:
        has_entry = key_valid.any(-1) if query_valid is None else key_valid.any(-1) & query_valid.any(-1)
    if not bool(has_entry.all()):
        raise no_valid_entry(first_index(~has_entry), name)
    has_token = tokens_of_parts(query_valid, key_valid).any(-1)
    if not bool(has_token.all()):
        raise no_token(first_index(~has_token), name, user)


def no_token(index, name: str = "mask", user: str = "spectral_gap") -> ValueError:
    """The error for a matrix (at batch ``index``) with no token that is both a valid query and a valid key."""
    return ValueError(
        f"{name}: the matrix at batch index {tuple(index)} has no token that is both a valid query and a valid key; "
        f"{user} expects a padding (and/or causal) mask"
    )
