"""Aborting requests, the same way in both schedulers (runtime/scheduler.py and
runtime/encoder_scheduler.py): by rid prefix (each ends with finish type abort and answers with what it
has so far), or at the door while the weights cannot serve."""

from __future__ import annotations

from typing import Any

from runtime.messages import RequestOutput


class RequestAborter:
    """A mixin for a scheduler with `requests` (rid -> request), `_finish(req)` and `_output(req)`."""

    requests: dict[str, Any]
    weight_version: str
    unusable: str | None  # why the weights cannot serve (a broken update), else None

    def abort(self, rid: str, abort_all: bool = False, message: str = "Aborted by the client.") -> list[RequestOutput]:
        """Abort requests whose rid starts with `rid` (or all); they answer with their partial output."""
        outputs = []
        for req in list(self.requests.values()):
            if abort_all or req.rid.startswith(rid):
                req.finish_reason = {"type": "abort", "message": message}
                self._finish(req)
                outputs.append(self._output(req))
        return outputs

    def refusal(self, msg: Any) -> list[RequestOutput]:
        """A new request's answer while the weights cannot serve: the front ends refuse first (503), so
        this answers only one that raced an update breaking. Empty when the request may go on."""
        if self.unusable is None:
            return []
        return [RequestOutput(rid=msg.rid, new_token_ids=[], prompt_tokens=len(msg.input_ids), cached_tokens=0,
                              weight_version=self.weight_version, finished=True,
                              finish_reason={"type": "abort", "message": self.unusable})]
