"""Helpers that more than one test file needs (``tests/conftest.py`` puts this folder on the path)."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch


class StorageIds:
    """Stand-ins for ``id(tensor.untyped_storage())`` (what ``OpLog`` identifies storages by).

    ``reuse=False``: never reused (collision-free). ``reuse=True``: the id of a storage that died
    goes to the next new storage, last freed first, as CPython reuses the address of a freed object
    (which it does at random in a real run; this makes it happen every time)."""

    def __init__(self, *, reuse: bool) -> None:
        self.reuse = reuse
        self.ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.fresh = itertools.count(1)
        self.free: list[int] = []

    def __call__(self, tensor: torch.Tensor) -> int | None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        if storage not in self.ids:
            number = self.free.pop() if self.reuse and self.free else next(self.fresh)
            self.ids[storage] = number
            weakref.finalize(storage, self.free.append, number)
        return self.ids[storage]
