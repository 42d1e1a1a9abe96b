"""What makes ``record`` safe under threads: per-thread active recorders and shared, counted patches.

Two kinds of state are involved.

- Per thread: the recorders whose ``with`` block is open in the calling thread
  (:func:`active_recorders`). Global wrappers dispatch only to these, so a thread without a block
  passes straight through to the original function, and a block never sees another thread's calls.
  (PyTorch's torch-function mode stack is itself per thread, so the ``sdpa`` capture mode needs no
  help.)
- Global: a dict entry that several blocks replace, such as a transformers registry entry, a model
  file's ``eager_attention_forward`` (an entry of the module's ``__dict__``) or a layer's instance
  ``forward``. :func:`patch_entry` installs one wrapper per entry, counts the blocks using it under a
  lock, and puts the original object back (the same object) when the last of them ends, whatever order
  blocks in different threads end in.

Everything here also passes straight through while ``torch.compile`` traces (:func:`compiling`), so that
dynamo never traces attnstats code.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

__all__ = ["active_recorders", "enter_thread", "leave_thread", "patch_entry", "compiling", "MISSING"]

_local = threading.local()
_lock = threading.Lock()


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # a dict entry that did not exist before the patch (deleted again on release)


def compiling() -> bool:
    """True while dynamo traces the calling code: attnstats hooks and wrappers then do nothing."""
    return torch.compiler.is_compiling()


def active_recorders() -> tuple:
    """The recorders active in the calling thread, in the order their blocks were entered."""
    return tuple(getattr(_local, "recorders", ()))


def enter_thread(recorder) -> list:
    """Make ``recorder`` active in the calling thread; return the list to pass to :func:`leave_thread`."""
    recorders = getattr(_local, "recorders", None)
    if recorders is None:
        recorders = _local.recorders = []
    recorders.append(recorder)
    return recorders


def leave_thread(recorders: list, recorder) -> None:
    """Remove ``recorder`` (by identity) from the thread list it was added to; blocks may end in any order."""
    for i in range(len(recorders) - 1, -1, -1):
        if recorders[i] is recorder:
            del recorders[i]
            return


class _Slot:
    __slots__ = ("table", "key", "original", "wrapper", "users")

    def __init__(self, table, key, original, wrapper):
        self.table, self.key, self.original, self.wrapper, self.users = table, key, original, wrapper, 0


_slots: dict[tuple[int, object], _Slot] = {}  # (id(table), key) -> slot; a slot keeps its table alive


def patch_entry(table: dict, key, make_wrapper: Callable) -> Callable[[], None]:
    """Put ``make_wrapper(original)`` at ``table[key]`` (or share the wrapper already there); return a release.

    ``original`` is ``table[key]`` before the first patch, or :data:`MISSING`. The release function
    (idempotent) drops this use; the last release restores ``original`` (or deletes the entry), unless
    something else has replaced the wrapper in between, which is then left in place.
    """
    with _lock:
        slot = _slots.get((id(table), key))
        if slot is None:
            original = table.get(key, MISSING)
            slot = _Slot(table, key, original, make_wrapper(original))
            table[key] = slot.wrapper
            _slots[(id(table), key)] = slot
        slot.users += 1
    released = False

    def release() -> None:
        nonlocal released
        with _lock:
            if released:
                return
            released = True
            slot.users -= 1
            if slot.users > 0:
                return
            del _slots[(id(table), key)]
            if table.get(key, MISSING) is not slot.wrapper:
                return
            if slot.original is MISSING:
                del table[key]
            else:
                table[key] = slot.original

    return release
