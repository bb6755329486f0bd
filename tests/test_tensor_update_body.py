"""/update_weights_from_tensor's body is parsed with its payloads left in place (views of the body) and sent
to the engine as frames of their own: the checks and messages are those of every other route, and the
engine reads the same base64 text a full JSON decode would give."""

from __future__ import annotations

import json
import mmap

import pytest
import torch

from rollout.server.ipc import InputCodec, json_string_body
from rollout.server.schemas import BadRequest
from rollout.server.tensor_update_body import parse_tensor_update_body
from runtime.messages import UpdateWeightsFromTensorReq
from sync import decode_named_tensors, encode_named_tensors


def test_payloads_are_views_of_the_body_and_reach_the_engine_intact() -> None:
    payload = encode_named_tensors([("w", torch.arange(6, dtype=torch.float32))])
    escaped = json.dumps(payload).replace("/", "\\/")  # a JSON writer may escape '/': still the same text
    body = bytearray(('{"serialized_named_tensors": [' + json.dumps(payload) + ", " + escaped + '], '
                      '"weight_version": "v3", "digests": null}').encode())
    fields, views = parse_tensor_update_body(body, {})
    assert fields["weight_version"] == "v3" and fields["serialized_named_tensors"] == []
    assert fields["attached_payloads"] == 2
    start = body.index(b'"', body.index(b"["))
    body[start + 1] ^= 0x20  # the views see the body change: nothing was copied
    assert bytes(views[0])[1] == body[start + 1]
    body[start + 1] ^= 0x20
    codec = InputCodec()
    frame = codec.encode([UpdateWeightsFromTensorReq(id=7, **fields)])
    (msg,) = codec.decode_frames([frame, *views])
    assert [str(bytes(p), "ascii") if isinstance(p, memoryview) else p for p in msg.serialized_named_tensors] == \
        [payload, payload]
    for p in msg.serialized_named_tensors:
        ((name, t),) = decode_named_tensors(p)
        assert name == "w" and torch.equal(t, torch.arange(6, dtype=torch.float32))
    assert isinstance(json_string_body(b'"QUJD"'), memoryview) and json_string_body(b'"QU\\/JD"') == "QU/JD"


@pytest.mark.parametrize("body, match", [
    (b"", "serialized_named_tensors is required"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"serialized_named_tensors": 5}', "serialized_named_tensors must be a list, got 5"),
    (b'{"serialized_named_tensors": []}', "non-empty list of base64 strings .* got \\[\\]"),
    (b'{"serialized_named_tensors": ["QUJD", 7]}', "got \\['QUJD', 7\\]"),
    (b'{"serialized_named_tensors": ["' + b"A" * 8000 + b'", {"x": 1}]}', "a list whose item 1 is \\{'x': 1\\}"),
    (b'{"serialized_named_tensors": ["QUJD"], "weight_version": 5}', "weight_version"),
    (b'{"serialized_named_tensors": ["QUJD"], "load_format": [' + b"[" * 100 + b"]" * 100 + b"]}", "nested too deeply"),
    (b'{"serialized_named_tensors": ["QUJD"', "not valid JSON"),
])
def test_bad_bodies_are_400_naming_the_field(body: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        parse_tensor_update_body(body, {})
    if body:  # a big body arrives as an anonymous mapping (rollout/server/limits.py): same answers
        mapped = mmap.mmap(-1, len(body))
        mapped[:] = body
        with pytest.raises(BadRequest, match=match):
            parse_tensor_update_body(mapped, {})
