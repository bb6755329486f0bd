"""`FinishChecker`: whether a request's newest token ends it (a stop token or string, its length limits,
the context, a completed grammar), as the finish reason SGLang reports."""

from __future__ import annotations

from runtime.request import Request
from runtime.stop_checker import StopChecker


class FinishChecker:
    def __init__(self, eos_token_ids: set[int], stop_checker: StopChecker | None, context_len: int):
        self.eos_token_ids = eos_token_ids
        self.stop_checker = stop_checker   # None without a tokenizer: stop strings are not matched
        self.context_len = context_len

    def check(self, req: Request, token: int) -> dict | None:
        """The finish reason after `token` was appended to the request's output, or None to go on."""
        reason = self._limits(req, token)
        if reason is None and req.grammar is not None:
            reason = grammar_finish(req, token)
        return reason

    def _limits(self, req: Request, token: int) -> dict | None:
        sp = req.sampling_params
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            if len(req.output_ids) >= sp.min_new_tokens:
                return {"type": "stop", "matched": token}
        if sp.stop and self.stop_checker is not None and len(req.output_ids) >= sp.min_new_tokens:
            matched = self.stop_checker.find(req.output_ids, sp.stop)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        if len(req.output_ids) >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        if len(req.input_ids) + len(req.output_ids) >= self.context_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None


def grammar_finish(req: Request, token: int) -> dict | None:
    """Advance the request's grammar by its new token: a complete grammar ends the request (stop, as
    EOS would; with ignore_eos the grammar still ends it, since it can take nothing more)."""
    if not req.grammar.accept(token):  # the allowed set was applied, so this is our bug: end loudly
        return {"type": "abort", "message": f"Internal error: the grammar rejected the sampled token {token}."}
    if req.grammar.terminated:
        return {"type": "stop", "matched": token}
    return None
