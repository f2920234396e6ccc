"""How a ``teacher-farm`` command starts quietly and ends tidily: vLLM's log level, SIGTERM, teardown.

An engine in this process (``serve``, ``cache --model``) must be stopped while the interpreter is
still whole: vLLM's ``AsyncLLM.__del__`` otherwise runs during interpreter shutdown, when the module
globals it calls are already gone, and prints a traceback after a run that went well.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that its cleanup runs as after Ctrl-C."""


def quiet_engine(verbose: bool) -> None:
    """vLLM's own logs at WARNING (its engine processes inherit this), INFO with ``-v``.

    Must run before vLLM is imported; an explicit ``VLLM_LOGGING_LEVEL`` wins unless ``-v`` is given.
    """
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # What vLLM logs while it is imported, before it sets up its own handler, comes through ours.
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block (servers install their own handler)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, where SIGTERM stops ``main`` as Ctrl-C does: by cancelling it.

    Raising from a signal handler (``stop_on_sigterm``) lands in whichever task happens to run;
    that task then dies with an exception nobody retrieves, and asyncio prints its traceback.
    Cancelling the main task lets every ``finally`` and ``async with`` run in order instead.
    """
    terminated = False

    async def cancellable() -> T:
        task = asyncio.current_task()
        assert task is not None  # a coroutine that runs is in a task

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        return await main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        return asyncio.run(cancellable())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise
    finally:
        # The loop's close leaves SIGTERM at its default; the command's own handler comes back.
        signal.signal(signal.SIGTERM, previous)


def release_engine() -> None:
    """Stop every vLLM engine of this process now, while the interpreter is whole.

    An engine that ``Teacher.shutdown`` stopped can still be referenced at exit (a stored traceback
    of an import made while it loaded keeps the loading frame alive), so vLLM's ``__del__`` would
    run once more during interpreter shutdown and fail. Stopping twice is harmless; after this, the
    class's ``__del__`` has nothing left to do and is disarmed.
    """
    gc.collect()
    module = sys.modules.get("vllm.v1.engine.async_llm")
    if module is None:
        return
    engines = [o for o in gc.get_objects() if issubclass(type(o), module.AsyncLLM)]
    for engine in engines:
        engine.shutdown()
    if engines:
        module.AsyncLLM.__del__ = _already_stopped


def _already_stopped(self: object) -> None:
    pass
