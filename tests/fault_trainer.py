"""A trainer that dies between broadcast buckets: `python tests/fault_trainer.py '<json>'`.

It hosts the weight-update group (rank 0) while posting /init_weights_update_group to the server, sends
the first `buckets` buckets of a perturbed checkpoint (each announced with /update_weights_from_distributed
and answered before the next), prints "sent <k>" and SIGKILLs itself: the server holds a mix of two
versions and no control message follows. Config: {"url", "port", "ckpt", "buckets", "bucket_bytes", "nan"};
"nan": true puts a NaN in the first bucket instead (and the trainer exits normally after one bucket).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import requests
import torch

torch.set_num_threads(1)


def main(cfg: dict) -> None:
    from sync import WeightSender, init_custom_process_group, iterate_checkpoint, tcp_init_method

    url, port = cfg["url"], cfg["port"]
    joined: dict = {}

    def join() -> None:
        joined["r"] = requests.post(url + "/init_weights_update_group", timeout=120, json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "backend": "gloo", "group_name": "faults", "timeout": 30})

    t = threading.Thread(target=join)
    t.start()
    group = init_custom_process_group("gloo", tcp_init_method("127.0.0.1", port), 2, 0, "faults", timeout=30)
    t.join()
    assert joined["r"].status_code == 200, joined["r"].text
    gen = torch.Generator().manual_seed(3)
    named = [(n, (t + 0.3 * torch.randn(t.shape, generator=gen)).contiguous()) for n, t in iterate_checkpoint(cfg["ckpt"])]
    if cfg.get("nan"):
        named[0][1].view(-1)[0] = float("nan")
    sender = WeightSender(group, bucket_bytes=cfg["bucket_bytes"])
    metas = sender.plan(named)
    assert len(metas) > cfg["buckets"], f"only {len(metas)} buckets"
    answers: list = []
    sent = 0

    def announce(meta) -> None:
        nonlocal sent
        if sent == cfg["buckets"]:  # the next bucket would go out now: die between buckets instead
            print(f"sent {sent} " + json.dumps(answers), flush=True)
            if not cfg.get("nan"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(0)
        sent += 1
        body = {"names": meta.names, "dtypes": meta.dtypes, "shapes": meta.shapes, "group_name": "faults",
                "load_format": "flattened_bucket"}
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("r", requests.post(url + "/update_weights_from_distributed",
                                                                             json=body, timeout=120)))
        th.start()
        # The answer comes after the broadcast, which starts when this hook returns: wait for it on a thread.
        threading.Thread(target=lambda: (th.join(), answers.append([box["r"].status_code, box["r"].json()])),
                         daemon=True).start()

    def ordered(meta) -> None:  # a server takes requests in order: the previous bucket's answer comes first
        while len(answers) < sent:
            threading.Event().wait(0.01)
        announce(meta)

    sender.send_buckets(named, on_bucket=ordered)
    while len(answers) < sent:
        threading.Event().wait(0.01)
    print(f"sent {sent} " + json.dumps(answers), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
