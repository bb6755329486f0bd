"""The wire between the HTTP process and the engine process: ZeroMQ sockets carrying msgpack frames.

Each frame is a list of typed messages (msgspec tagged Structs, never pickle): the HTTP process sends
requests and control messages on one PUSH/PULL pair, the engine answers on the other, one frame per
scheduler step. Both sockets live under a private temporary directory (ipc://); the HTTP process binds,
the engine process connects.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from runtime.messages import (AbortRequest, AbortRequestsExact, ControlRequest, ControlResult, EmbedRequest,
                              EngineFailed, EngineReady, EngineState, FlushCacheRequest, FlushCacheResult, GenerateRequest,
                              HealthCheckRequest, HealthCheckResult, RequestOutput, ServerStateRequest,
                              ServerStateResult)

# HTTP process -> engine process.
EngineInput = (GenerateRequest | EmbedRequest | AbortRequest | AbortRequestsExact | FlushCacheRequest
               | HealthCheckRequest | ServerStateRequest | ControlRequest)
# Engine process -> HTTP process.
EngineOutput = (RequestOutput | FlushCacheResult | HealthCheckResult | ServerStateResult | EngineReady
                | EngineFailed | ControlResult | EngineState)


class InputCodec:
    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(list[EngineInput])

    def encode(self, messages: list) -> bytes:
        return self.encoder.encode(messages)

    def decode_frames(self, frames: list) -> list:
        """A multipart message: the message frame, then the payload frames of the messages that declare
        `attached_payloads` (in message order), handed over as buffers, uncopied."""
        messages = self.decoder.decode(frames[0])
        rest = frames[1:]
        for msg in messages:
            n = getattr(msg, "attached_payloads", 0)
            if n:
                if n > len(rest):
                    raise ValueError(f"A message declares {n} attached payloads; {len(rest)} frames are left.")
                msg.serialized_named_tensors = [json_string_body(_buffer(f)) for f in rest[:n]]
                rest = rest[n:]
        if rest:
            raise ValueError(f"{len(rest)} frames attached to no message.")
        return messages


def _buffer(frame: object) -> bytes | memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame  # type: ignore[return-value]


def json_string_body(literal: bytes | memoryview) -> str | memoryview:
    """The text of a JSON string literal (quotes included, as the HTTP process cut it from its request body,
    syntax checked there): a view between the quotes when it has no escapes (base64 never needs one), else
    the decoded string."""
    view = memoryview(literal)
    if len(view) >= 2 and view[0] == view[-1] == ord('"') and not _ESCAPE.search(view):
        return view[1:-1]
    return msgspec.json.decode(view, type=str)


_ESCAPE = re.compile(rb"\\")


class OutputCodec:
    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(list[EngineOutput])

    def encode(self, messages: list) -> bytes:
        return self.encoder.encode(messages)

    def decode(self, frame: bytes) -> list:
        return self.decoder.decode(frame)


@dataclass
class IpcAddresses:
    """Where the two sockets live; a private directory that the HTTP process removes at exit."""

    directory: str
    to_engine: str
    from_engine: str

    @classmethod
    def create(cls) -> "IpcAddresses":
        directory = tempfile.mkdtemp(prefix="rollout-ipc-")
        os.chmod(directory, 0o700)
        return cls(directory, f"ipc://{directory}/to_engine", f"ipc://{directory}/from_engine")

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def configure(sock: zmq.Socket) -> zmq.Socket:
    # No high-water mark: a burst of requests (or of outputs) is queued, never dropped or blocked on,
    # and a closing socket does not linger on undelivered frames.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    return sock
