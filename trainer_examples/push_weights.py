"""Push a checkpoint's weights (optionally perturbed, as an optimizer step would) to running servers.

    python -m trainer_examples.push_weights --servers http://127.0.0.1:30000 http://127.0.0.1:30001 \
        --checkpoint /path/to/hf_dir --master-port 29500 --version step-1 --perturb 0.01

Uses only the public client: init_weights_update_group joins the servers' group as rank 0 (posting
/init_weights_update_group to each server at once), update_weights_from_distributed sends buckets,
destroy_weights_update_group leaves the group.
"""

from __future__ import annotations

import argparse
import time

import torch

from rollout import RolloutClient
from sync import iterate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", required=True)
    parser.add_argument("--checkpoint", required=True, help="HF safetensors directory to read the weights from")
    parser.add_argument("--master-address", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--version", default=None, help="weight_version the servers report after the push")
    parser.add_argument("--perturb", type=float, default=0.0, help="add N(0, perturb) noise to every weight")
    parser.add_argument("--bucket-mb", type=float, default=64)
    args = parser.parse_args()

    named = list(iterate_checkpoint(args.checkpoint))
    if args.perturb:
        named = [(n, t + args.perturb * torch.randn_like(t)) for n, t in named]
    if args.backend == "nccl":
        named = [(n, t.cuda()) for n, t in named]
    with RolloutClient(args.servers) as client:
        group = client.init_weights_update_group(args.master_address, args.master_port, backend=args.backend)
        start = time.perf_counter()
        client.update_weights_from_distributed(group, named, weight_version=args.version,
                                               bucket_bytes=int(args.bucket_mb * 2**20))
        print(f"pushed {len(named)} tensors to {len(args.servers)} servers in {time.perf_counter() - start:.2f} s")
        client.destroy_weights_update_group(group)


if __name__ == "__main__":
    main()
