"""The wire between the HTTP process and the engine process: ZeroMQ sockets carrying msgpack frames.

Each frame is a list of typed messages (msgspec tagged Structs, never pickle): the HTTP process sends
requests and control messages on one PUSH/PULL pair, the engine answers on the other, one frame per
scheduler step. Both sockets live under a private temporary directory (ipc://); the HTTP process binds,
the engine process connects.
"""

from __future__ import annotations

import os
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

    def decode(self, frame: bytes) -> list:
        return self.decoder.decode(frame)


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
