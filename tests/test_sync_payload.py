"""The update_weights_from_tensor payload: safetensors bytes in base64, never pickle."""

from __future__ import annotations

import base64
import io
import pickle

import pytest
import torch

from sync.errors import WeightUpdateError
from sync.safetensors_payload import decode_named_tensors, encode_named_tensors


def test_round_trip_keeps_order_dtypes_and_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    named = [
        ("z.last_alphabetically_first", torch.randn(3, 4, generator=gen)),
        ("a.bf16", torch.randn(5, generator=gen).bfloat16()),
        ("m.fp16", torch.randn(2, 2, 2, generator=gen).half()),
        ("b.scalar", torch.tensor(1.5)),
        ("c.ints", torch.arange(6, dtype=torch.int64)),
        ("d.transposed", torch.randn(3, 2, generator=gen).t()),
    ]
    payload = encode_named_tensors(named)
    assert isinstance(payload, str)
    out = decode_named_tensors(payload)
    assert [n for n, _ in out] == [n for n, _ in named]
    for (name, t), (_, u) in zip(named, out):
        assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t), name
    from_bytes = decode_named_tensors(payload.encode())  # bytes accepted too
    assert [n for n, _ in from_bytes] == [n for n, _ in out]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(from_bytes, out))


def test_tensors_sharing_memory_are_encoded() -> None:
    w = torch.randn(4, 4)
    out = decode_named_tensors(encode_named_tensors([("embed", w), ("lm_head", w), ("row", w[1])]))
    assert torch.equal(out[0][1], w) and torch.equal(out[1][1], w) and torch.equal(out[2][1], w[1])


def test_pickle_payloads_are_refused() -> None:
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle ran')",))

    for raw in (pickle.dumps({"w": torch.zeros(2)}), pickle.dumps(Evil())):
        with pytest.raises(WeightUpdateError, match="pickle"):
            decode_named_tensors(base64.b64encode(raw).decode())
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)  # a zip archive of pickles
    with pytest.raises(WeightUpdateError, match="not safetensors"):
        decode_named_tensors(base64.b64encode(buf.getvalue()).decode())


def test_garbage_is_refused() -> None:
    with pytest.raises(WeightUpdateError, match="base64"):
        decode_named_tensors("not base64 at all!")
    with pytest.raises(WeightUpdateError, match="not safetensors"):
        decode_named_tensors(base64.b64encode(b"\x05\x00\x00\x00\x00\x00\x00\x00{}").decode())
    with pytest.raises(ValueError, match="twice"):
        encode_named_tensors([("a", torch.zeros(1)), ("a", torch.ones(1))])


def test_payload_applies_to_a_model(tiny_model_dir) -> None:
    from runtime.model_runner import ModelRunner
    from runtime.server_args import ServerArgs
    from sync import apply_named_tensors, model_checksums, named_checksums

    model = ModelRunner(ServerArgs(model_path=tiny_model_dir("llama"), max_total_tokens=512,
                                   device="cpu", dtype="float32"),
                        progress=False).model
    named = [(n, model.weight_target(n) * 1.5) for n in model.hf_weight_names()[:4]]
    report = apply_named_tensors(model, decode_named_tensors(encode_named_tensors(named)))
    assert report.names == [n for n, _ in named]
    assert model_checksums(model, report.names) == named_checksums(named)


def test_payload_whose_header_is_128_bytes_is_not_taken_for_a_pickle() -> None:
    # Its first byte is 0x80 (the 8-byte header length), as a pickle's is: found by tests/test_bad_input.py.
    named = [("model.norm.weight", torch.arange(32, dtype=torch.float32))]
    payload = encode_named_tensors(named)
    assert base64.b64decode(payload)[:1] == b"\x80"
    (name, tensor), = decode_named_tensors(payload)
    assert name == "model.norm.weight" and torch.equal(tensor, named[0][1])
    import pickle
    with pytest.raises(WeightUpdateError, match="pickle"):
        decode_named_tensors(base64.b64encode(pickle.dumps({"x": 1})).decode())


def test_decoded_tensors_are_views_of_one_buffer() -> None:
    # Issue 11 (soak): a copy per tensor left a model's worth of freed blocks in the engine's heap after
    # every tensor update, and its resident memory crept up under load. One buffer is freed whole.
    named = [("a", torch.randn(300, 7)), ("b", torch.arange(5, dtype=torch.int64)), ("c", torch.randn(2, 3).half())]
    out = decode_named_tensors(encode_named_tensors(named))
    assert [n for n, _ in out] == ["a", "b", "c"]
    assert all(torch.equal(t, ref) and t.dtype == ref.dtype for (_, t), (_, ref) in zip(out, named))
    assert len({t.untyped_storage().data_ptr() for _, t in out}) == 1
