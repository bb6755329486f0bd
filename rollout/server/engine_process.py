"""The engine process: model runner, scheduler and the scheduler loop, fed over ZeroMQ.

`EngineProcess` is the HTTP process's handle on it (spawn, liveness, stop); `run_engine` is what runs
inside it. The loop is runtime/scheduler_loop.py's, the same one the in-process Engine runs; only where
messages come from (a PULL socket) and where outputs go (a PUSH socket, one frame per step) differ.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from rollout.server.ipc import InputCodec, IpcAddresses, OutputCodec, configure
from runtime.messages import EngineFailed, EngineReady
from runtime.server_args import ServerArgs, set_process_threads

logger = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0  # how often an idle engine checks that the HTTP process still exists


PARENT_DEATH_SIGNAL = signal.SIGUSR1


def _die_with_parent() -> None:
    """Ask Linux to signal us if the HTTP process dies, even by SIGKILL (no orphan engine)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, PARENT_DEATH_SIGNAL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_engine(args: ServerArgs, addresses: IpcAddresses, parent_pid: int) -> None:
    """Entry point of the engine process (multiprocessing 'spawn')."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the HTTP process stops us
    stop, orphaned = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_parent_death(*_: Any) -> None:
        orphaned.set()
        stop.set()

    signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    _die_with_parent()
    if os.getppid() != parent_pid:  # it died before we asked to be told
        on_parent_death()
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s engine %(levelname)s %(name)s: %(message)s")
    set_process_threads(args)  # this process is the engine's alone

    ctx = zmq.Context()
    pull = configure(ctx.socket(zmq.PULL))
    pull.connect(addresses.to_engine)
    push = configure(ctx.socket(zmq.PUSH))
    push.connect(addresses.from_engine)
    in_codec, out_codec = InputCodec(), OutputCodec()
    try:
        scheduler = _build_scheduler(args)
    except Exception as e:
        logger.exception("The engine failed to start")
        push.send(out_codec.encode([EngineFailed(message=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")]))
        time.sleep(0.2)  # let the frame leave before the socket closes
        push.close(linger=1000)
        sys.exit(1)
    runner = scheduler.runner
    push.send(out_codec.encode([EngineReady(
        vocab_size=runner.vocab_size, context_len=runner.context_len,
        max_total_num_tokens=scheduler.max_total_num_tokens,
        max_running_requests=args.max_running_requests, weight_version=scheduler.weight_version,
        device=str(runner.device), dtype=str(runner.dtype).replace("torch.", ""))]))

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    last_parent_check = time.monotonic()

    def receive(block: bool) -> list:
        nonlocal last_parent_check
        messages: list = []
        if block:
            if not poller.poll(50):
                now = time.monotonic()
                if now - last_parent_check > PARENT_CHECK_S:
                    last_parent_check = now
                    if os.getppid() != parent_pid:
                        on_parent_death()
                return messages
        while True:
            try:
                # Uncopied frames: a weight payload rides as its own frame of hundreds of megabytes.
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return messages
            try:
                messages += in_codec.decode_frames(frames)
            except Exception:  # a frame we cannot read is our own bug; log it, keep serving
                logger.exception("Dropped an undecodable message of %d frames", len(frames))

    def send(outputs: list) -> None:
        push.send(out_codec.encode(outputs), copy=False)

    from runtime.scheduler_loop import run_scheduler_loop
    try:
        run_scheduler_loop(scheduler, receive, send, stop)
    finally:
        pull.close()
        push.close()
        ctx.term()
        if orphaned.is_set():  # the HTTP process was killed: nobody else removes the socket files
            logger.error("The HTTP process is gone; the engine exits.")
            addresses.cleanup()
    logger.info("Engine process stopped.")
    # Everything left is memory and threads the OS reclaims at once; the interpreter's own teardown of
    # the model and the KV pool took about 2 s (measured), which every shutdown and restart waited on.
    logging.shutdown()
    os._exit(0)


def _build_scheduler(args: ServerArgs):
    from transformers import AutoTokenizer

    from runtime.scheduler_factory import build_scheduler

    tokenizer = None
    if not args.skip_tokenizer_init:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
    return build_scheduler(args, tokenizer, progress=False)


class EngineProcess:
    """The HTTP process's handle on the engine process."""

    def __init__(self, args: ServerArgs):
        self.args = args
        self.addresses = IpcAddresses.create()
        self.process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=run_engine, args=(self.args, self.addresses, os.getpid()),
                                   name="rollout-engine", daemon=True)
        self.process.start()
        logger.info("Engine process started (pid %d).", self.process.pid)

    @property
    def sentinel(self) -> int:
        assert self.process is not None
        return self.process.sentinel

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def exitcode(self) -> int | None:
        return None if self.process is None else self.process.exitcode

    def reap(self, timeout: float = 2.0) -> int | None:
        """After its sentinel fired: wait for the dead process (no zombie left) and return its exit code.
        The sentinel (a pipe) closes a moment before waitpid can collect the process, hence the short join."""
        if self.process is None:
            return None
        self.process.join(timeout)
        return self.process.exitcode

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL: the engine never outlives the server."""
        p = self.process
        if p is not None and p.pid is not None:
            if p.is_alive():
                p.terminate()
                p.join(timeout)
            if p.is_alive():
                logger.warning("Engine process did not stop in %.0f s; killing it.", timeout)
                p.kill()
                p.join(5)
        self.addresses.cleanup()
