"""`EngineLink`: the HTTP process's two sockets to the engine process and their codecs (the wire format
is rollout/server/ipc.py's)."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Sequence

import zmq
import zmq.asyncio

from rollout.server.ipc import InputCodec, IpcAddresses, OutputCodec, configure

logger = logging.getLogger(__name__)


class EngineLink:
    def __init__(self) -> None:
        self._in_codec, self._out_codec = InputCodec(), OutputCodec()
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None

    def bind(self, addresses: IpcAddresses) -> None:
        self._ctx = zmq.asyncio.Context()
        # Sends never block (no high-water mark), so a plain socket works from the event loop and
        # costs no await; receives go through the asyncio socket.
        self._push = configure(zmq.Context.instance().socket(zmq.PUSH))
        self._push.bind(addresses.to_engine)
        self._pull = configure(self._ctx.socket(zmq.PULL))
        self._pull.bind(addresses.from_engine)

    def send(self, messages: list, attachments: Sequence[Any] = ()) -> None:
        """`attachments`: buffers sent uncopied as the frames after the messages' (see ipc.InputCodec)."""
        frame = self._in_codec.encode(messages)
        if attachments:
            self._push.send_multipart([frame, *attachments], copy=False)
        else:
            self._push.send(frame, copy=False)

    async def receive(self) -> AsyncIterator[list[Any]]:
        """The engine's frames, decoded, forever (an undecodable frame is logged and dropped)."""
        while True:
            frame = await self._pull.recv(copy=True)
            try:
                outputs = self._out_codec.decode(frame)
            except Exception:
                logger.exception("Dropped an undecodable frame from the engine")
                continue
            yield outputs

    def close(self) -> None:
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
