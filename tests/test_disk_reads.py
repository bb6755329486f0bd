"""Disk updates read checkpoints without mmap and refuse, with the old weights untouched, every file that is
not what it claims: not safetensors, truncated, rewritten while read, holding NaN/Inf, or not matching the
trainer's digests. The oracle for "untouched" is sync.model_checksums (CRC-32 of every weight's bytes);
for "read correctly", safetensors' own loader on the same file.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.model_runner import ModelRunner
from runtime.server_args import ServerArgs
from sync import WeightUpdateError, iterate_checkpoint, model_checksums, tensor_checksum, update_weights_from_disk
from sync.checkpoint_file import CheckpointChangedError, CheckpointFile

NORM = "model.norm.weight"


@pytest.fixture()
def ckpt(tiny_model_dir, tmp_path) -> Path:
    """A private copy of a tiny checkpoint with other values than the model's (seed 1)."""
    src = Path(tiny_model_dir("llama", seed=1))
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture()
def model(tiny_model_dir):
    args = ServerArgs(model_path=tiny_model_dir("llama"), device="cpu", dtype="float32")
    return ModelRunner(args).model


def _file(ckpt: Path) -> Path:
    return ckpt / "model.safetensors"


def _refused(model, path, match: str) -> str:
    before = model_checksums(model)
    with pytest.raises(WeightUpdateError, match=match) as err:
        update_weights_from_disk(model, path)
    assert model_checksums(model) == before
    return str(err.value)


def test_reads_what_safetensors_reads(ckpt) -> None:
    want = load_file(str(_file(ckpt)))
    got = dict(CheckpointFile.open(_file(ckpt)).read_tensors())
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    # Unaligned offsets (a 3-byte tensor before a float32) are copied out, not viewed misaligned.
    odd = ckpt / "odd.safetensors"
    save_file({"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5), "c": torch.randn(2).bfloat16()}, str(odd))
    ref = load_file(str(odd))
    for name, t in CheckpointFile.open(odd).read_tensors():
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:5], "fewer than the 8-byte header length"),
    (lambda b: b"", "fewer than the 8-byte header length"),
    (lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b[24:], "header is not JSON"),
    (lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "not a safetensors file"),
    (lambda b: (2).to_bytes(8, "little") + b"[]" + b[10:], "is a JSON list, not an object"),
])
def test_broken_file_is_refused_naming_it(model, ckpt, damage, match) -> None:
    f = _file(ckpt)
    f.write_bytes(damage(f.read_bytes()))
    message = _refused(model, str(ckpt), match)
    assert str(f) in message


def test_bad_header_entries_name_the_tensor(model, ckpt) -> None:
    f = _file(ckpt)
    save_file({NORM: torch.ones(64)}, str(f))
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    f.write_bytes(bytes(raw[:8]) + header.replace('"F32"', '"X99"').encode() + bytes(raw[8 + n:]))
    assert "has dtype 'X99'" in _refused(model, str(ckpt), NORM)
    f.write_bytes(bytes(raw[:8]) + header.replace("[64]", "[65]").encode() + bytes(raw[8 + n:]))
    assert "do not hold 65 elements" in _refused(model, str(ckpt), NORM)


def test_file_rewritten_after_its_header_is_refused(model, ckpt) -> None:
    f = _file(ckpt)
    cf = CheckpointFile.open(f)
    time.sleep(0.02)  # past the file system's timestamp granularity
    data = f.read_bytes()
    f.write_bytes(b"")    # what torch.save / save_file do to a file they overwrite in place
    f.write_bytes(data)
    with pytest.raises(CheckpointChangedError, match="changed while being read"):
        cf.read_tensors()


def test_rewriting_while_updating_never_crashes(model, ckpt) -> None:
    """A trainer re-saving the checkpoint in place (truncate, then write) in a loop while the server updates
    from it. With a memory-mapped reader this process died of SIGBUS; now every update either applies the
    whole file or is refused naming it, and the weights are always one whole version."""
    f = _file(ckpt)
    data = f.read_bytes()
    want = {n: tensor_checksum(t) for n, t in iterate_checkpoint(str(ckpt))}
    stop = threading.Event()

    def trainer() -> None:
        while not stop.is_set():
            with open(f, "r+b") as out:
                out.truncate(0)
                for i in range(0, len(data), 1 << 16):  # written in pieces, as a real save is
                    out.write(data[i:i + (1 << 16)])
                    out.flush()

    before = model_checksums(model)
    writer = threading.Thread(target=trainer, daemon=True)
    writer.start()
    outcomes = {"applied": 0, "refused": 0}
    try:
        for _ in range(40):
            try:
                update_weights_from_disk(model, str(ckpt), digest=False)
                outcomes["applied"] += 1
                now = model_checksums(model)
                assert all(now[n] == c for n, c in want.items() if n in now)
            except WeightUpdateError as e:
                assert str(f) in str(e), e
                outcomes["refused"] += 1
                assert model_checksums(model) in (before, {n: want.get(n, c) for n, c in before.items()})
    finally:
        stop.set()
        writer.join()
    assert outcomes["refused"] > 0, outcomes  # the race was hit


def test_nan_and_inf_in_data_bytes_are_refused(model, ckpt) -> None:
    tensors = load_file(str(_file(ckpt)))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    tensors[NORM][7] = float("inf")
    save_file(tensors, str(_file(ckpt)))
    message = _refused(model, str(ckpt), "non-finite")
    assert "model.layers.0.mlp.up_proj.weight" in message and "1 NaN" in message and str(_file(ckpt)) in message


def test_digests_verified(model, ckpt) -> None:
    digests = {n: tensor_checksum(t) for n, t in iterate_checkpoint(str(ckpt))}
    bad = dict(digests, **{NORM: digests[NORM] ^ 1})
    before = model_checksums(model)
    with pytest.raises(WeightUpdateError, match=f"Weight {NORM} in .* does not match its digest"):
        update_weights_from_disk(model, str(ckpt), digests=bad)
    with pytest.raises(WeightUpdateError, match="does not hold"):
        update_weights_from_disk(model, str(ckpt), digests={"model.nope.weight": 1})
    assert model_checksums(model) == before
    update_weights_from_disk(model, str(ckpt), digests=digests)
    assert model_checksums(model) != before
