"""API keys: `--api-key` for generation, `--admin-api-key` for the control routes (SGLang's split).

Which key a route takes (SGLang's semantics for its "admin optional" routes, which are ours here):
- a control route (weight updates, pause / continue, memory, cache flush, versions, process groups):
  the admin key when `--admin-api-key` is set (the normal key is refused there); otherwise the normal
  key when `--api-key` is set; otherwise open.
- every other route: the normal key when `--api-key` is set, else open (also with only an admin key:
  then generation is open and control is locked).
- `/health` is always open (load balancers and probes carry no secret).
A missing or wrong key is a 401 with the JSON error body. A pure ASGI middleware: one compare per request.
"""

from __future__ import annotations

import hmac
from typing import Any

from rollout.server.limits import request_header
from rollout.server.responses import error_response

CONTROL_ROUTES = frozenset({
    "/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
    "/destroy_weights_update_group", "/update_weights_from_tensor", "/get_weights_by_name",
    "/update_weight_version", "/pause_generation", "/continue_generation", "/release_memory_occupation",
    "/resume_memory_occupation", "/flush_cache", "/start_expert_distribution_record",
    "/stop_expert_distribution_record", "/dump_expert_distribution_record",
})
OPEN_ROUTES = frozenset({"/health"})


def _bearer(key: str | None) -> bytes | None:
    return f"Bearer {key}".encode() if key else None


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str | None, admin_api_key: str | None = None):
        self.app = app
        self.normal = _bearer(api_key)
        self.admin = _bearer(admin_api_key)

    def expected(self, path: str) -> tuple[bytes | None, str]:
        """The header a path needs (None: open) and the flag it comes from."""
        if path in OPEN_ROUTES:
            return None, ""
        if path in CONTROL_ROUTES and self.admin is not None:
            return self.admin, "--admin-api-key"
        return self.normal, "--api-key"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        want, flag = self.expected(scope["path"])
        if want is None:
            return await self.app(scope, receive, send)
        got = request_header(scope, b"authorization") or b""
        if hmac.compare_digest(got, want):
            return await self.app(scope, receive, send)
        which = "admin API key" if flag == "--admin-api-key" else "API key"
        response = error_response(f"Unauthorized: {scope['path']} needs the server's {which} ({flag}) as "
                                  "'Authorization: Bearer <key>'.", 401)
        await response(scope, receive, send)
