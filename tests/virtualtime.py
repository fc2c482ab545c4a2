"""An event loop on virtual time, for tests of code that sleeps or times out through asyncio.

Whenever nothing is ready, the loop's clock jumps to its next timer instead of waiting for it
(trio's ``MockClock(autojump_threshold=0)``): a 10 s timeout passes at once and measures exactly
10 s. Code that takes a clock is given :func:`now`, the same clock its sleeps run on, where a
``FrozenClock`` would stand still while the loop slept. No threads or real sockets: the loop
cannot tell waiting for them from having nothing to do.
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec

P = ParamSpec("P")


class _JumpingSelector(selectors.DefaultSelector):
    """Polls instead of blocking; a wait it would have blocked for moves the clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("the test waits for something no timer or task will bring")
        self.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def now() -> float:
    """The running loop's time: pass it as the clock of the code under test."""
    return asyncio.get_running_loop().time()


def virtual_time(
    test: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, None]:
    """Run an ``async def`` test (fixtures and parameters as usual) on a loop of its own on
    virtual time, instead of on the session's loop."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runner.run(test(*args, **kwargs))

    return run
