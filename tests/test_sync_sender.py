"""The trainer side's zero-copy buckets: after sync.flatten_parameters a model's buckets are views of its
parameters (no copy, larger buckets); otherwise each bucket is copied into a reused buffer."""

import torch

from sync import WeightSender, flatten_parameters, unflatten_bucket
from sync.scratch import ScratchBuffer
from sync.sender import VIEW_BUCKET_BYTES


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


def _buckets(sender: WeightSender, named):
    metas = sender.plan(named)
    out, start = [], 0
    for meta in metas:
        chunk = named[start:start + len(meta.names)]
        start += len(meta.names)
        out.append((meta, chunk, WeightSender._bucket_bytes(chunk, meta, ScratchBuffer())))
    return out


def test_flat_parameters_go_out_as_views_in_one_bucket():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flatten_parameters(model)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    for n, t in named:
        assert torch.equal(t, before[n])  # flattening keeps the values
    sender = WeightSender(group=None, bucket_bytes=256)  # tiny limit: a copying sender would split a lot
    buckets = _buckets(sender, named)
    assert len(buckets) == 1 and VIEW_BUCKET_BYTES > sum(t.nbytes for _, t in named)
    meta, chunk, flat = buckets[0]
    assert flat.untyped_storage().data_ptr() == named[0][1].untyped_storage().data_ptr()  # no copy
    for (name, tensor), (got_name, got) in zip(chunk, unflatten_bucket(flat, meta)):
        assert name == got_name and torch.equal(got, tensor)


def test_separate_parameters_are_copied_into_buckets_of_the_limit():
    model = _model()
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    buckets = _buckets(WeightSender(group=None, bucket_bytes=1024), named)
    assert len(buckets) > 1
    for meta, chunk, flat in buckets:
        assert meta.buffer_nbytes() <= 1024 or len(meta.names) == 1
        copied = all(flat.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for _, t in chunk)
        assert copied == (len(chunk) > 1)  # a one-tensor bucket is the tensor itself
        for (name, tensor), (got_name, got) in zip(chunk, unflatten_bucket(flat, meta)):
            assert name == got_name and torch.equal(got, tensor)
