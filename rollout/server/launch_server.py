"""`python -m rollout.launch_server`: the HTTP server (this process) and the engine (a spawned process).

The HTTP side starts at once and answers 503 until the engine has loaded the model; then one line,
"The server is fired up and ready to roll!", says where it listens. SIGINT and SIGTERM stop both
processes and exit 0; if the engine dies while serving, every route answers 503 with the reason (the signal
or exit code) for a second, then the server exits 1 (rollout/server/engine_client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Any, Iterator

import uvicorn

from runtime.server_args import ServerArgs

logger = logging.getLogger("rollout.launch_server")

_BOOL_FIELDS_HELP = {
    "is_embedding": "serve an embedding / reward model",
    "skip_tokenizer_init": "no tokenizer: token ids in and out, no 'text' in answers",
    "disable_radix_cache": "no prefix cache",
    "disable_cuda_graph": "no CUDA graphs for decode steps",
    "enable_deterministic_inference": "batch-invariant mode: a request gives bitwise the same tokens and "
                                      "logprobs whatever else runs, and the trainer-side forward of "
                                      "runtime/trainer_forward.py gives the same bits (CPU)",
    "deterministic": "alias of --enable-deterministic-inference",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per ServerArgs field, named as in API.md (--model-path, ...), with its default."""
    parser = argparse.ArgumentParser(prog="python -m rollout.launch_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=f.default, help=_BOOL_FIELDS_HELP.get(f.name))
            continue
        typ = int if "int" in kind else float if "float" in kind else str
        parser.add_argument(flag, type=typ, default=f.default, help=f"default: {f.default}")
    return parser


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ServerArgs(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


class _Server(uvicorn.Server):
    """uvicorn, plus the ready line once both the socket and the engine are up, and signal handling
    that stops gracefully without re-raising the signal afterwards (so we can stop the engine)."""

    def __init__(self, config: uvicorn.Config, engine_client: Any):
        super().__init__(config)
        self.engine_client = engine_client
        self.exit_code = 0

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            asyncio.ensure_future(self._announce())

    async def shutdown(self, sockets: Any = None) -> None:
        # In-flight requests end now, answered with their partial output (finish_reason abort),
        # rather than holding the graceful shutdown until they finish.
        client = self.engine_client
        if client.info is not None and client.dead_reason is None and client.num_in_flight:
            logger.info("Shutting down: aborting %d in-flight requests.", client.num_in_flight)
            client.abort("", abort_all=True, message="Aborted: the server is shutting down.")
        await super().shutdown(sockets)

    async def _announce(self) -> None:
        while self.engine_client.ready is None:
            await asyncio.sleep(0.01)
        await self.engine_client.ready.wait()
        info = self.engine_client.info
        logger.info("The server is fired up and ready to roll! http://%s:%d (model %s on %s, %s; KV pool %d "
                    "tokens, context %d)", self.config.host, self.config.port, self.engine_client.args.model_path,
                    info.device, info.dtype, info.max_total_num_tokens, info.context_len)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def launch_server(args: ServerArgs) -> int:
    """Run until SIGINT/SIGTERM (0), or until the engine fails to start (1)."""
    from rollout.server.engine_process import EngineProcess

    if args.model_path is None:
        from runtime.default_model import default_model_path
        args.model_path = default_model_path()
    checks = [("--model-path", args.model_path, "config.json")]
    if args.tokenizer_path is not None:
        checks.append(("--tokenizer-path", args.tokenizer_path, "tokenizer_config.json"))
    for flag, path, required in checks:
        if not os.path.isfile(os.path.join(path, required)):
            logger.error("%s %s is not a local Hugging Face model directory (no %s there).", flag, path, required)
            return 2
    # Until uvicorn takes over the signals, SIGTERM unwinds like Ctrl-C, so the engine is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The engine loads the model while this process imports the web stack and loads the tokenizer.
    engine = EngineProcess(args)
    engine.start()
    try:
        from rollout.server.http_server import create_app
        from rollout.server.engine_client import EngineClient

        engine_client = EngineClient(args)
    except BaseException:
        engine.stop()
        raise
    app = create_app(engine_client, engine)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=5, lifespan="on", loop="asyncio",
                            timeout_keep_alive=30)
    server = _Server(config, engine_client)

    def fatal() -> None:
        server.exit_code = 1
        server.should_exit = True

    engine_client.on_fatal = fatal
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started and server.exit_code == 0:
        return 1  # uvicorn could not start (e.g. the port is taken); it logged why
    if engine_client.dead_reason and server.exit_code:
        logger.error("Exiting: %s", engine_client.dead_reason.splitlines()[0])
    return server.exit_code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = launch_server(args)
    # Both processes are stopped and their files removed; the interpreter's teardown of what is left
    # (tokenizer, web stack, torch) only delays the exit that restarts and test fixtures wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

