"""Every refused update names the field or file and what is wrong: no "Internal error handling ...:
SafetensorError(...)" and no bare "TypeError: 'int' object is not iterable" (both seen before these checks,
from a non-safetensors checkpoint and from a tensor payload whose name list was not a list)."""

from __future__ import annotations

import base64

import pytest
import torch
from safetensors.torch import save

from runtime.engine import Engine
from sync import WeightUpdateError, decode_named_tensors


@pytest.mark.parametrize("names, match", [("5", "must be a JSON list of tensor names, got 5"),
                                          ('{"a": 1}', "must be a JSON list"), ("[1, 2]", "got \\[1, 2\\]"),
                                          ("not json", "is not a JSON list of tensor names")])
def test_payload_name_list_errors(names, match):
    raw = save({"a": torch.zeros(2)}, metadata={"names": names})
    with pytest.raises(WeightUpdateError, match=match):
        decode_named_tensors(base64.b64encode(raw).decode())


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True,
                 max_total_tokens=1024, progress=False)
    yield eng
    eng.shutdown()


def test_engine_messages_name_what_is_wrong(engine, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    ok, msg = engine.update_weights_from_disk(str(bad))
    assert not ok and msg == (f"Failed to update weights: {bad / 'model.safetensors'} is not a safetensors file: it "
                              "has 4 bytes, fewer than the 8-byte header length.\nRolling back to original weights.")
    (bad / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    ok, msg = engine.update_weights_from_disk(str(bad))
    assert not ok and "header length field says 1000000 bytes, the file has 10" in msg and "Internal" not in msg
    ok, msg = engine.update_weights_from_tensor([("model.norm.weight", 5)])
    assert not ok and "Weight model.norm.weight is a int, not a tensor" in msg
    ok, msg = engine.update_weights_from_tensor([5])
    assert not ok and "named_tensors must be a list of (name, tensor) pairs" in msg
    n = len(engine.get_weights_by_name("model.norm.weight"))
    ok, msg = engine.update_weights_from_tensor([("model.norm.weight", torch.full((n,), float("nan")))])
    assert not ok and f"Weight model.norm.weight holds non-finite values ({n} NaN, 0 Inf of {n} elements)" in msg
    ok, msg = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[n]], group_name="none")
    assert not ok and "No weight-update group named 'none'" in msg
