"""An asyncio lock or semaphore made per running event loop: one bound to a loop cannot be
used from another, and test clients run an app in several loops, one after the other."""

from __future__ import annotations

import asyncio
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._loop = self._value = None

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._value = loop, self._make()
        return self._value
