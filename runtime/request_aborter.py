"""Aborting requests by rid prefix, the same way in both schedulers (runtime/scheduler.py and
runtime/encoder_scheduler.py): each aborted request ends with finish type abort and answers with what it
has so far."""

from __future__ import annotations

from typing import Any

from runtime.messages import RequestOutput


class RequestAborter:
    """A mixin for a scheduler with `requests` (rid -> request), `_finish(req)` and `_output(req)`."""

    requests: dict[str, Any]

    def abort(self, rid: str, abort_all: bool = False, message: str = "Aborted by the client.") -> list[RequestOutput]:
        """Abort requests whose rid starts with `rid` (or all); they answer with their partial output."""
        outputs = []
        for req in list(self.requests.values()):
            if abort_all or req.rid.startswith(rid):
                req.finish_reason = {"type": "abort", "message": message}
                self._finish(req)
                outputs.append(self._output(req))
        return outputs
