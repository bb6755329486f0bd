"""What the server tests check on every answer, and the server they start: `ok` (a 200, its JSON), `bad`
(a 400 whose message names the given words), and `cpu_server` (a server on CPU in float32, stopped on exit,
which must exit 0).

    with cpu_server(model_dir, "--enable-metrics", log_path=log) as server:
        out = ok(server.post("/generate", json={...}))
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import requests

from tests.helpers import ServerProcess


def ok(resp: requests.Response) -> Any:
    assert resp.status_code == 200, (resp.status_code, resp.text[:2000])
    return resp.json()


def bad(resp: requests.Response, *words: str) -> str:
    """The message of a 400 `{"error": {"message"}}` that contains every one of `words`."""
    assert resp.status_code == 400, (resp.status_code, resp.text[:2000])
    message = resp.json()["error"]["message"]
    for w in words:
        assert w in message, (w, message)
    return message


@contextlib.contextmanager
def cpu_server(model_path: str, *flags: str, log_path: str | None = None) -> Iterator[ServerProcess]:
    """A started server (`--device cpu --dtype float32 --log-level warning` and `flags`); on exit it is
    stopped and must have exited 0."""
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32", "--model-path", model_path,
                          "--log-level", "warning", *flags], log_path=log_path)
    proc.start(timeout=300)
    try:
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log()}"
