"""AsyncEngine: the Engine driven by one background thread, for asyncio callers (the HTTP server, #5).

The engine is single-threaded by design; every mutation (new request, abort, adapter change) is posted to the
engine thread as a command and applied between steps, and each step's outputs are handed back to the asyncio
loop of the request that owns them. Leaving a ``stream()`` early (break, cancellation, client gone) aborts the
request, which frees its slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Union

from torch import nn

from pedro.engine.engine import Engine
from pedro.engine.request import Request, RequestError, RequestOutput


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pedro-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                while True:
                    self._commands.get(block=block, timeout=0.05 if block else None)()
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as err:  # a bug, not a bad request: fail every waiting stream, stop
                    self._failure = RuntimeError(f"the engine thread failed: {err!r}")
                    self._failure.__cause__ = err
                    for rid in list(self._listeners):
                        self._deliver(rid, self._failure)
                    return
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: Union[RequestOutput, BaseException]) -> None:
        listener = self._listeners.get(request_id)
        if listener is None:
            return
        loop, q = listener
        if isinstance(item, BaseException) or item.finished:
            self._listeners.pop(request_id, None)
        loop.call_soon_threadsafe(q.put_nowait, item)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as err:  # handed back to the caller, the engine thread goes on
                loop.call_soon_threadsafe(future.set_exception, err)
            else:
                loop.call_soon_threadsafe(future.set_result, result)

        if self._failure is not None:
            raise self._failure
        self._commands.put(command)
        return await future

    # ------------------------------------------------------------------------------ public API

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each step the request advances (``delta_token_ids`` / ``delta_text`` are
        new); the last one has ``finished`` set. Raises RequestError for an invalid request."""
        q: asyncio.Queue = asyncio.Queue()
        rid = request.request_id

        def submit() -> None:
            self._listeners[rid] = (loop, q)
            try:
                self.engine.add_request(request, track_text=True)
            except RequestError:
                self._listeners.pop(rid, None)
                raise

        loop = asyncio.get_running_loop()
        await self._call(submit)
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
                self._commands.put(lambda: self.engine.abort(rid))

    async def generate(self, request: Request) -> RequestOutput:
        """Run one request to completion."""
        last = None
        async for out in self.stream(request):
            last = out
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
