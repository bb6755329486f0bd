"""The HTTP front end's limits: request body size and read time (a pure ASGI middleware in front of every
route), and the queue bound (429 with Retry-After).

The middleware reads the whole body before the route runs, so a route never sees more than its limit and
a client that stops sending cannot hold a request forever:
- a `Content-Length` over the limit is a 413 before one byte of the body is read;
- a body sent without one (chunked) is counted as it arrives and cut off with a 413 at the limit;
- a body that stops arriving (shorter than its `Content-Length`, or a stalled chunked upload) is a 408
  once no byte came for `read_timeout_s`.
Then the route gets the body in one message and, after it, the connection's own messages (so a client
disconnect still reaches the route). Every answer carries the `{"error": {"message"}}` body of API.md.
"""

from __future__ import annotations

import asyncio
import mmap
from typing import Any

from rollout.server.responses import error_response
from runtime.heap_trim import release_free_heap

MIB = 1 << 20
# The routes whose bodies carry weights get their own limit: a model's tensors in base64 are gigabytes.
WEIGHT_BODY_ROUTES = ("/update_weights_from_tensor",)
RETRY_AFTER_S = 1
# A refused body up to this size is read and dropped before the 413 (see _drain).
DRAIN_BYTES = 256 * MIB
# Declared bodies from this size on are received into one buffer (see _BodyBuffer).
WHOLE_BUFFER_BYTES = 1 * MIB
# After a body this big (a weight payload) has been handled, free heap pages go back to the system.
TRIM_AFTER_BYTES = 16 * MIB


def queue_full_response(message: str) -> Any:
    response = error_response(message, 429)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _closing(response: Any) -> Any:
    """The answer to a request whose body was not read whole: the connection cannot carry another."""
    response.headers["Connection"] = "close"
    return response


def request_header(scope: dict, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes, as ASGI gives them), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _mib(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"


class _BodyBuffer:
    """A request body as it arrives. A big body whose length was declared is written into one buffer of that
    size: kept as a list of chunks, a weight payload's ~10,000 chunks of 64 KiB would stay in the heap as
    freed medium-sized blocks once the request is done (glibc returns a big block to the system at once, a
    heap full of small holes only when the top of the heap is free, which under load it never is)."""

    def __init__(self, declared: int):
        self.size = 0
        self.chunks: list[bytes] = []
        # An anonymous mapping, not a bytearray: bytearray(n) zeroes every page up front (a few hundred ms
        # for a model-sized body, on the event loop); the kernel gives the mapping's pages as they are written.
        self.whole = mmap.mmap(-1, declared) if declared >= WHOLE_BUFFER_BYTES else None

    def add(self, chunk: bytes, limit: int) -> bool:
        """False once the body is over `limit` (or longer than it said it was)."""
        end = self.size + len(chunk)
        if end > limit or (self.whole is not None and end > len(self.whole)):
            self.size = end
            return False
        if self.whole is not None:
            self.whole[self.size:end] = chunk
        else:
            self.chunks.append(chunk)
        self.size = end
        return True

    def take(self) -> bytes | mmap.mmap:
        if self.whole is not None:
            whole, self.whole = self.whole, None
            return whole if len(whole) == self.size else whole[:self.size]
        body, self.chunks = b"".join(self.chunks), []
        return body


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int, max_weight_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.max_weight_bytes = max_weight_bytes
        self.read_timeout_s = read_timeout_s

    def limit_for(self, path: str) -> tuple[int, str]:
        if path in WEIGHT_BODY_ROUTES:
            return self.max_weight_bytes, "--max-weight-request-bytes"
        return self.max_bytes, "--max-request-bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, flag = self.limit_for(scope["path"])
        too_large = _closing(error_response(f"The request body is larger than this server's limit of "
                                            f"{_mib(limit)} ({flag}) on {scope['path']}.", 413))
        declared = request_header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                return await _closing(error_response(f"Invalid Content-Length header: {declared[:40]!r}.", 400))(
                    scope, receive, send)
            if length > limit:
                if length <= DRAIN_BYTES and request_header(scope, b"expect") is None:
                    await self._drain(receive)  # so that a client still uploading reads the 413
                return await too_large(scope, receive, send)

        buffer = _BodyBuffer(length if declared is not None else 0)
        more = True
        while more:
            message = await self._next(receive)
            if message is None:
                return await self._timed_out(buffer.size)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            more = message.get("more_body", False)
            if not buffer.add(message.get("body", b""), limit):
                if more:
                    await self._drain(receive, buffer.size)
                return await too_large(scope, receive, send)

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": buffer.take(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
        if buffer.size >= TRIM_AFTER_BYTES:
            release_free_heap()  # what parsing and forwarding it left in the heap goes back (runtime/heap_trim.py)

    async def _next(self, receive: Any) -> dict | None:
        """The next message, or None when nothing came for read_timeout_s."""
        try:
            return await asyncio.wait_for(receive(), self.read_timeout_s)
        except asyncio.TimeoutError:
            return None

    async def _drain(self, receive: Any, size: int = 0) -> None:
        """Read and drop the rest of a refused body (up to DRAIN_BYTES): uvicorn stops reading once the
        answer is sent, and a client still writing its body would see a broken pipe, not the 413."""
        while size <= DRAIN_BYTES:
            message = await self._next(receive)
            if message is None or message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _timed_out(self, size: int) -> Any:
        return _closing(error_response(f"The request body stopped arriving: nothing for {self.read_timeout_s:g} s "
                                       f"after {size} bytes (--request-read-timeout).", 408))
