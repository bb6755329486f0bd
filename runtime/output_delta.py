"""`output_delta`: what a decoder request produced since its last output, as the RequestOutput the
scheduler sends (tokens, their weight versions, logprobs, sampling masks; prompt logprobs once; routed
experts with the finished output)."""

from __future__ import annotations

from runtime.messages import RequestOutput
from runtime.request import Request


def output_delta(req: Request, weight_version: str) -> RequestOutput:
    """The delta since `req.sent_tokens`, which it then advances; `weight_version` is the scheduler's
    current one, reported by a request that produced no token yet."""
    new = req.output_ids[req.sent_tokens:]
    k = req.sent_tokens
    out = RequestOutput(
        rid=req.rid, new_token_ids=new, prompt_tokens=len(req.input_ids), cached_tokens=req.cached_tokens,
        # The version that produced the request's last token (an old one for a request aborted
        # before its first step under new weights).
        weight_version=req.output_weight_versions[-1] if req.output_weight_versions else weight_version,
        finished=req.finished, finish_reason=req.finish_reason,
        output_token_weight_versions=req.output_weight_versions[k:], embedding=req.embedding)
    if req.return_sampling_mask:
        out.output_sampling_masks = req.output_sampling_masks[k:]
    if req.return_logprob:
        out.output_token_logprobs = req.output_token_logprobs[k:]
        out.output_top_logprobs = req.output_top_logprobs[k:]
        out.output_token_ids_logprobs = req.output_token_ids_logprobs[k:]
        if not req.sent_input_logprobs and (not req.input_logprobs_pending or req.finished):
            out.input_token_logprobs = req.input_token_logprobs
            out.input_top_logprobs = req.input_top_logprobs if req.top_logprobs_num else None
            out.input_token_ids_logprobs = req.input_token_ids_logprobs if req.token_ids_logprob is not None else None
            req.sent_input_logprobs = True
    if req.finished and req.routed_experts is not None:
        out.routed_experts = req.routed_experts.cpu().numpy().astype("<i2").tobytes()
        out.routed_experts_shape = list(req.routed_experts.shape)
    req.sent_tokens = len(req.output_ids)
    return out
