"""The body of `/update_weights_from_tensor`, read without copying its payloads.

A payload is a model's worth of base64 text. Decoding the body into Python objects and re-encoding the
control message for the engine copied it twice on the event loop (seconds for a small model, during which
/health and every other route waited) and held three copies at once. Here the body is decoded with each
payload left as `msgspec.Raw`, a view of its JSON string literal inside the body; those views travel to the
engine as frames of their own (rollout/server/ipc.py), and the engine reads the base64 in place. The other
fields go through the same checks as every route's (rollout/server/weight_schemas.py), with the same
messages; a body that is not a JSON object gets parse_json_body's answer.
"""

from __future__ import annotations

import mmap
from typing import Any, Union

import msgspec

from rollout.server.schemas import BadRequest, decode_json, parse_json_body, short
from rollout.server.weight_schemas import parse_update_from_tensor

# The body as the limits middleware hands it over: bytes, or for a big one an anonymous mapping.
Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

class _Body(msgspec.Struct, forbid_unknown_fields=False):
    """The fields the route reads (others are ignored, as on every control route), each left undecoded; one
    pass over the body finds them all."""

    serialized_named_tensors: list[msgspec.Raw] | msgspec.UnsetType = msgspec.UNSET
    load_format: msgspec.Raw = msgspec.Raw()  # empty: absent from the body
    weight_version: msgspec.Raw = msgspec.Raw()
    flush_cache: msgspec.Raw = msgspec.Raw()
    digests: msgspec.Raw = msgspec.Raw()


_DECODER = msgspec.json.Decoder(_Body)
PAYLOADS = "serialized_named_tensors"
# Up to this size a refused payload list is quoted in the error (as parse_update_from_tensor does).
QUOTE_BYTES = 4096


def parse_tensor_update_body(body: Buffer, query: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """(the control message's fields, with an empty payload list; the payloads' JSON string literals, as
    buffers into `body`). BadRequest naming the field and the value."""
    try:
        parsed = _DECODER.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        # Not a JSON object, a payload list that is not a list, bad syntax, no body: the generic parser and
        # checks give the generic answer (this path never serves a valid body).
        return parse_update_from_tensor({**query, **parse_json_body(bytes(body), allow_empty=True)}), []
    fields: dict[str, Any] = dict(query)
    for key in ("load_format", "weight_version", "flush_cache", "digests"):
        raw = getattr(parsed, key)
        if len(raw):
            fields[key] = decode_json(bytes(raw))
    items = parsed.serialized_named_tensors
    if items is msgspec.UNSET:
        return parse_update_from_tensor(fields), []  # refuses: the field is required
    strings = [bytes(memoryview(item)[:1]) == b'"' for item in items]
    if not items or not all(strings):
        quoted = "[" + ", ".join(bytes(item).decode("utf-8", "replace") for item in items) + "]"
        got = (short(decode_json(quoted.encode())) if len(quoted) <= QUOTE_BYTES else
               f"a list whose item {strings.index(False)} is {short(decode_json(bytes(items[strings.index(False)])))}")
        raise BadRequest(f"{PAYLOADS} must be a non-empty list of base64 strings (safetensors bytes, see "
                         f"sync.encode_named_tensors), got {got}.")
    checked = parse_update_from_tensor({**fields, PAYLOADS: [""] * len(items)})
    return {**checked, PAYLOADS: [], "attached_payloads": len(items)}, [memoryview(item) for item in items]
