"""AsyncEngine: the Engine driven by one background thread, for asyncio callers (the HTTP server).

The engine is single-threaded by design; every mutation (new request, abort, adapter change) is posted to the
engine thread as a command and applied between steps, and each step's outputs are handed back to the asyncio
loop of the request that owns them. Leaving a ``stream()`` early (break, cancellation, client gone) aborts the
request, which frees its slot at the next step boundary.

Supervision: a step that raises is an engine bug, never a request's fault (the engine isolates those itself).
The thread then fails every request the engine holds with ENGINE_FAILURE, rebuilds the engine's per-request
state in-process (``Engine.reset``; registered adapters stay) and goes on serving; ``restarts`` counts it.
Only if the rebuild itself fails does the thread stop: ``alive`` turns False (the server's /health answers
503), and every pending and later call raises at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Union

from torch import nn

from pedro.engine.engine import Engine
from pedro.engine.request import Request, RequestOutput

log = logging.getLogger("pedro.engine")


class EngineDead(RuntimeError):
    """The engine thread has stopped; nothing more can be served by this AsyncEngine."""


class _Command:
    """Work for the engine thread, and how to answer its caller if the thread dies before running it."""

    def __init__(self, run: Callable[[], None], fail: Callable[[BaseException], None] = lambda err: None) -> None:
        self.run, self.fail = run, fail


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # posting a command vs. the thread dying: a command is run or refused, never lost
        self._failure: EngineDead | None = None
        self._thread = threading.Thread(target=self._loop, name="pedro-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._failure is None and self._thread.is_alive()

    @property
    def restarts(self) -> int:
        return self.engine.restarts

    # ------------------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._run_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as err:  # the rebuild failed, or a bug outside a step: stop, loudly
            log.exception("the engine thread stopped")
            self._die(EngineDead(f"the engine stopped: {err!r}"))
        else:
            self._die(EngineDead("the engine was shut down"))

    def _run_commands(self, block: bool) -> None:
        try:
            while True:
                self._commands.get(block=block, timeout=0.05 if block else None).run()
                block = False
        except queue.Empty:
            pass

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:
            log.exception("an engine step failed; failing the requests it held and rebuilding the engine")
            outputs = self.engine.reset(
                f"the engine failed while serving this request ({type(err).__name__}) and was restarted; retry"
            )
        for out in outputs:
            self._deliver(out.request_id, out)

    def _die(self, failure: EngineDead) -> None:
        with self._lock:
            self._failure = failure
        while True:  # commands posted before the failure was visible: run none, answer each
            try:
                self._commands.get_nowait().fail(failure)
            except queue.Empty:
                break
        for rid in list(self._listeners):
            self._deliver(rid, failure)

    def _deliver(self, request_id: str, item: Union[RequestOutput, BaseException]) -> None:
        listener = self._listeners.get(request_id)
        if listener is None:
            return
        loop, q = listener
        if isinstance(item, BaseException) or item.finished:
            self._listeners.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self._listeners.pop(request_id, None)
            if not isinstance(item, BaseException) and not item.finished:
                self.engine.abort(request_id)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:
            if not future.done():
                setter(value)

        def answer(setter: Callable[[Any], None], value: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, setter, value)
            except RuntimeError:  # the caller's loop is closed: nobody to answer
                pass

        def run() -> None:
            try:
                result = fn()
            except Exception as err:  # handed back to the caller, the engine thread goes on
                answer(future.set_exception, err)
            else:
                answer(future.set_result, result)

        self._post(_Command(run, lambda err: answer(future.set_exception, err)))
        return await future

    def _post(self, command: _Command) -> None:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            self._commands.put(command)

    # ------------------------------------------------------------------------------ public API

    async def open(self, requests: list[Request]) -> list[AsyncGenerator[RequestOutput, None]]:
        """Submit ``requests`` in one command, so the engine admits them between the same two steps (the n
        samples of a prompt then share one prefill) -> each one's stream, as ``stream`` yields it. Raises
        RequestError for an invalid request; then none of them runs."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in requests]

        def submit() -> None:
            added: list[str] = []
            try:
                for request, q in zip(requests, queues):
                    self._listeners[request.request_id] = (loop, q)
                    self.engine.add_request(request, track_text=True)
                    added.append(request.request_id)
            except BaseException:
                for request in requests:
                    self._listeners.pop(request.request_id, None)
                for rid in added:
                    self.engine.abort(rid)
                raise

        await self._call(submit)
        return [self._listen(request.request_id, q) for request, q in zip(requests, queues)]

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each step the request advances (``delta_token_ids`` / ``delta_text`` are
        new); the last one has ``finished`` set. Raises RequestError for an invalid request."""
        (outputs,) = await self.open([request])
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()  # leaving early aborts the request now, not when the generator is collected

    async def _listen(self, rid: str, q: asyncio.Queue) -> AsyncGenerator[RequestOutput, None]:
        """What the engine thread delivers for request ``rid``; leaving early aborts it."""
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._listeners.pop(rid, None)
                with contextlib.suppress(EngineDead):
                    self._post(_Command(lambda: self.engine.abort(rid)))

    async def generate(self, request: Request) -> RequestOutput:
        """Run one request to completion."""
        last = None
        async for out in self.stream(request):
            last = out
        assert last is not None, "a request's stream ends with its final output"
        return last

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self.engine.abort(request_id))

    async def add_adapter(self, name: str, source: Union[str, Path, nn.Module]) -> dict[str, Any]:
        return await self._call(lambda: self.engine.add_adapter(name, source))

    async def remove_adapter(self, name: str) -> None:
        await self._call(lambda: self.engine.remove_adapter(name))

    async def list_adapters(self) -> list[dict[str, Any]]:
        return await self._call(self.engine.list_adapters)

    def shutdown(self) -> None:
        """Stop the engine thread (running requests are left as they are)."""
        self._stopped.set()
        self._thread.join()
