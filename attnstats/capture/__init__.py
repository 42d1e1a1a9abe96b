"""Capture attention from PyTorch models: ``with attnstats.record(model) as rec: model(**inputs)``.

One module per backend: :mod:`.sdpa` (``F.scaled_dot_product_attention``), :mod:`.hf` (transformers
attention functions), :mod:`.mha` (``nn.MultiheadAttention``), :mod:`.module` (a user function);
:mod:`.recorder` drives them, :mod:`.record` holds :class:`AttentionRecord`, and :mod:`.threads` keeps
each block to its own thread and shares the global patches between blocks.
"""
from .record import AttentionRecord
from .recorder import BACKENDS, NothingCapturedWarning, Recorder, head_sigmas, record

__all__ = ["record", "Recorder", "AttentionRecord", "NothingCapturedWarning", "BACKENDS", "head_sigmas"]
