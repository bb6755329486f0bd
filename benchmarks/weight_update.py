"""Weight-update speed against the raw operations underneath, in one run: `python -m benchmarks.weight_update`.

- disk: Engine.update_weights_from_disk (validate headers, read each file without mmap, check NaN/Inf,
  copy in place, flush; and again with per-tensor digests verified) vs safetensors' memory-mapped
  `get_tensor` and `copy_` into the same parameters; the checks alone are timed too.
- broadcast: a trainer process pushes every weight in buckets (gloo; NCCL with --device cuda), received
  by Engine.update_weights_from_distributed (one request per bucket) vs one raw `dist.broadcast` of the
  same bytes as one flat tensor between the same two processes, on the same group.
- control: pause_generation + a zero-byte update + continue_generation, in ms, under load: generation
  requests are in flight the whole time, so the pause waits for the running step as it does when a
  trainer pushes weights during rollouts (the idle-engine figure is printed beside it).

Goals (issue 4): disk at most 1.3x raw, broadcast at most 1.2x raw, control at most 50 ms. Defaults to
SmolLM2-135M in fp32 (about 540 MB); `--tiny` runs a small random model to check the script works.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import threading
import time

import torch
import torch.distributed as dist

GROUP = "bench_weight_group"


def _trainer(port: int, names: list[str], ckpt: str, bucket_bytes: int, repeats: int, flat_params: bool,
             go, done, backend: str = "gloo", dtype: str = "float32") -> None:
    """Rank 0: for each repeat, one bucketed push, then one raw flat broadcast of the same bytes.

    flat_params: the trainer laid its parameters out with sync.flatten_parameters (buckets go out as views
    of them); else each tensor is its own allocation and the sender copies every bucket."""
    torch.set_num_threads(1)
    from sync import WeightSender, flatten_parameters, init_custom_process_group, iterate_checkpoint, tcp_init_method

    device = "cuda" if backend == "nccl" else "cpu"   # NCCL sends CUDA tensors, gloo CPU ones
    tensors = dict(iterate_checkpoint(ckpt))
    # In the server's dtype, as a trainer sends them (the announced specs are the server's).
    named = [(n, tensors[n].to(device, getattr(torch, dtype)).contiguous()) for n in names]
    if flat_params:
        holder = torch.nn.Module()
        for i, (_, t) in enumerate(named):
            holder.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
        flatten_parameters(holder)
        named = [(n, p.data) for (n, _), p in zip(named, holder.parameters())]
    group = init_custom_process_group(backend, tcp_init_method("127.0.0.1", port), 2, 0, GROUP, timeout=300)
    sender = WeightSender(group, bucket_bytes=bucket_bytes)
    # The same bytes as one flat tensor. Written, not just allocated: untouched pages all map the kernel's
    # shared zero page, which the send would read from cache, far faster than real memory.
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in named])
    for _ in range(repeats):
        assert go.get() == "update"
        sender.send_buckets(named)
        assert go.get() == "raw"
        dist.broadcast(flat, group=group, group_src=0)
        if backend == "nccl":
            torch.cuda.synchronize()
    done.put("ok")
    go.get()  # the receiver leaves the group first
    dist.destroy_process_group(group)


def _best(times: list[float]) -> float:
    return min(times)


def bench_disk(eng, model_path: str, repeats: int) -> dict[str, float]:
    """Ours (plain reads, no mmap, NaN/Inf checks), ours with per-tensor digests verified, and the raw
    path beside them: safetensors' memory-mapped get_tensor + copy_ (what disk updates did before, without
    the header validation), plus the checks alone on tensors in memory."""
    from safetensors import safe_open

    from sync import iterate_checkpoint, tensor_checksum
    from sync.disk import checkpoint_files
    from sync.tensor_checks import check_finite

    model = eng.runner.model
    digests = {n: tensor_checksum(t) for n, t in iterate_checkpoint(model_path)}
    in_memory = list(iterate_checkpoint(model_path))
    times: dict[str, list[float]] = {"ours": [], "ours_digests": [], "raw_mmap": [], "finite_only": [],
                                     "crc_only": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ok, msg = eng.update_weights_from_disk(model_path)
        times["ours"].append(time.perf_counter() - t0)
        assert ok, msg
        t0 = time.perf_counter()
        ok, msg = eng.update_weights_from_disk(model_path, digests=digests)
        times["ours_digests"].append(time.perf_counter() - t0)
        assert ok, msg
        t0 = time.perf_counter()
        with torch.no_grad():
            for path in checkpoint_files(model_path):
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        target = model.weight_target(name)
                        if target is not None:
                            target.copy_(f.get_tensor(name))
        times["raw_mmap"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        check_finite(in_memory)
        times["finite_only"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _, t in in_memory:
            tensor_checksum(t)
        times["crc_only"].append(time.perf_counter() - t0)
    return {k: _best(v) for k, v in times.items()}


def bench_broadcast(eng, model_path: str, bucket_bytes: int, repeats: int, flat_params: bool,
                    backend: str = "gloo") -> tuple[float, float, int, dict[str, int]]:
    from rollout.client.local_server import free_port
    from sync import plan_buckets
    from sync.sender import VIEW_BUCKET_BYTES

    model = eng.runner.model
    names = [n for n in model.hf_weight_names() if model.weight_target(n) is not None]
    specs = [(n, list(model.weight_target(n).shape), model.weight_target(n).dtype) for n in names]
    # The trainer's WeightSender.plan: buckets of its parameters' own bytes may be larger (no copy to hold).
    metas = plan_buckets(specs, max(bucket_bytes, VIEW_BUCKET_BYTES) if flat_params else bucket_bytes)
    total = sum(m.buffer_nbytes() for m in metas)
    ctx = mp.get_context("spawn")
    go, done = ctx.Queue(), ctx.Queue()
    port = free_port()
    dtype = str(specs[0][2]).removeprefix("torch.")
    proc = ctx.Process(target=_trainer, args=(port, names, model_path, bucket_bytes, repeats, flat_params, go, done,
                                              backend, dtype), daemon=True)
    proc.start()
    ok, msg = eng.init_weights_update_group("127.0.0.1", port, 1, 2, group_name=GROUP, backend=backend, timeout=300)
    assert ok, msg
    group = eng.scheduler.controller.updater.groups[GROUP].group
    flat = torch.empty(total, dtype=torch.uint8, device=eng.runner.device if backend == "nccl" else "cpu")
    receiver = eng.scheduler.controller.updater.receiver
    paths: dict[str, int] = {}  # buckets per receive path (sync.model_receiver), over all repeats
    ours, raw = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        go.put("update")
        for meta in metas:
            ok, msg = eng.update_weights_from_distributed(meta.names, meta.dtypes, meta.shapes, group_name=GROUP,
                                                          load_format="flattened_bucket")
            assert ok, msg
            paths[receiver.last_path] = paths.get(receiver.last_path, 0) + 1
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        go.put("raw")
        dist.broadcast(flat, group=group, group_src=0)
        if backend == "nccl":
            torch.cuda.synchronize(flat.device)
        raw.append(time.perf_counter() - t0)
    assert done.get(timeout=300) == "ok"
    eng.destroy_weights_update_group(GROUP)
    go.put("bye")
    proc.join(60)
    return _best(ours), _best(raw), total, paths


def _control_ms(eng) -> float:
    t0 = time.perf_counter()
    assert eng.pause_generation("in_place")[0]
    assert eng.update_weights_from_tensor([])[0]
    assert eng.continue_generation()[0]
    return (time.perf_counter() - t0) * 1000


def bench_control(eng, repeats: int, load_threads: int = 2) -> tuple[float, float]:
    """Median ms of pause + zero-byte update + continue: under load (requests generating), and idle."""
    idle = statistics.median(_control_ms(eng) for _ in range(repeats))
    vocab = eng.runner.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(200, vocab, (32,), generator=gen).tolist() for _ in range(4)]
    params = {"max_new_tokens": 32, "temperature": 1.0, "ignore_eos": True}
    stop = threading.Event()
    steps_started = threading.Event()

    def load() -> None:  # back-to-back batches: some request is generating at every moment
        while not stop.is_set():
            steps_started.set()
            eng.generate(input_ids=prompts, sampling_params=params)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(load_threads)]
    for t in threads:
        t.start()
    try:
        steps_started.wait()
        time.sleep(0.5)  # past the first prefill: decode steps are running
        loaded = []
        for _ in range(repeats):
            loaded.append(_control_ms(eng))
            time.sleep(0.01)  # let a few steps run between controls
    finally:
        stop.set()
        for t in threads:
            t.join()
    return statistics.median(loaded), idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="HF checkpoint directory (default: the embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="a small random model: checks the script, not speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--disk-only", action="store_true", help="only the disk figures (and the checks' cost)")
    parser.add_argument("--receive", choices=["direct", "buffered"], default="direct",
                        help="the server's --weight-update-receive mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                        help="broadcast backend (default: nccl on CUDA, gloo on CPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: disk, unflat, control")
    args = parser.parse_args()
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    skip = set(filter(None, args.skip.split(",")))

    from runtime.engine import Engine

    tmp = None
    if args.tiny:
        from tests.helpers import make_tiny_model_dir
        tmp = tempfile.TemporaryDirectory()
        model_path = make_tiny_model_dir(tmp.name, hidden_size=64, num_layers=2)
    elif args.model_path:
        model_path = args.model_path
    else:
        from runtime.default_model import default_model_path
        model_path = default_model_path()
    eng = Engine(model_path, dtype=args.dtype, device=args.device, skip_tokenizer_init=True, max_total_tokens=4096,
                 progress=False, weight_update_receive=args.receive)
    nan = float("nan")
    try:
        d = bench_disk(eng, model_path, args.repeats) if "disk" not in skip else {}
        disk, disk_raw = d.get("ours", nan), d.get("raw_mmap", nan)
        if args.disk_only:
            print(json.dumps({"model_path": model_path, **{f"disk_{k}_s": v for k, v in d.items()},
                              "disk_ratio": disk / disk_raw}))
            return
        bucket_bytes = int(args.bucket_mb * 2**20)
        bc, bc_raw, nbytes, paths = bench_broadcast(eng, model_path, bucket_bytes, args.repeats, flat_params=True,
                                                    backend=backend)
        bc_copy, bc_copy_raw = bench_broadcast(eng, model_path, bucket_bytes, args.repeats, flat_params=False,
                                               backend=backend)[:2] if "unflat" not in skip else (nan, nan)
        control_ms, control_idle_ms = bench_control(eng, max(args.repeats * 10, 20)) if "control" not in skip \
            else (nan, nan)
    finally:
        eng.shutdown()
        if tmp is not None:
            tmp.cleanup()
    result = {
        "model_path": model_path, "bytes": nbytes, "torch_threads": torch.get_num_threads(),
        "device": args.device, "dtype": args.dtype, "backend": backend,
        "disk_s": disk, "disk_raw_s": disk_raw, "disk_ratio": disk / disk_raw,
        "disk_digests_s": d.get("ours_digests", nan), "finite_check_s": d.get("finite_only", nan),
        "crc_s": d.get("crc_only", nan),
        "broadcast_s": bc, "broadcast_raw_s": bc_raw, "broadcast_ratio": bc / bc_raw,
        "broadcast_receive": args.receive, "broadcast_paths": paths,
        "broadcast_unflat_trainer_s": bc_copy, "broadcast_unflat_trainer_raw_s": bc_copy_raw,
        "broadcast_unflat_trainer_ratio": bc_copy / bc_copy_raw,
        "control_ms": control_ms, "control_idle_ms": control_idle_ms,
        "goals_met": {"disk<=1.3x": disk / disk_raw <= 1.3, "broadcast<=1.2x": bc / bc_raw <= 1.2,
                      "control<=50ms": control_ms <= 50},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {model_path}: {nbytes / 2**20:.1f} MiB of weights")
    print(f"disk update       {disk:8.3f} s   raw mmap+copy_   {disk_raw:8.3f} s   ratio {disk / disk_raw:5.2f} (goal <= 1.3; "
          "ours reads without mmap and checks NaN/Inf)")
    print(f"  with digests    {d['ours_digests']:8.3f} s   (+{d['ours_digests'] - disk:.3f} s: CRC-32 of every tensor); "
          f"checks alone in memory: NaN/Inf {d['finite_only']:.3f} s, CRC-32 {d['crc_only']:.3f} s")
    print(f"broadcast update  {bc:8.3f} s   raw flat bcast   {bc_raw:8.3f} s   ratio {bc / bc_raw:5.2f} (goal <= 1.2; "
          "trainer params flattened: buckets sent as views)")
    print(f"broadcast update  {bc_copy:8.3f} s   raw flat bcast   {bc_copy_raw:8.3f} s   ratio "
          f"{bc_copy / bc_copy_raw:5.2f} (trainer params separate: the sender copies each bucket)")
    print(f"                  receive mode {args.receive}; buckets per path: "
          + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())))
    print(f"control           {control_ms:8.2f} ms  pause + zero-byte update + continue, requests in flight "
          f"(goal <= 50 ms; idle engine {control_idle_ms:.2f} ms)")


if __name__ == "__main__":
    main()
