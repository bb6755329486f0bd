"""`python -m runtime.generate`: run the in-process Engine on a prompt and print the answer."""

from __future__ import annotations

import argparse
import json
import logging

from runtime.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=None, help="local HF directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--logprobs", action="store_true", help="print the full response with logprobs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with Engine(args.model_path) as engine:
        out = engine.generate(prompt=args.prompt, return_logprob=args.logprobs,
                              sampling_params={"max_new_tokens": args.max_new_tokens,
                                               "temperature": args.temperature, "n": args.n})
    for item in out if isinstance(out, list) else [out]:
        if args.logprobs:
            print(json.dumps(item, indent=1))
        else:
            print(repr(args.prompt + item["text"]), item["meta_info"]["finish_reason"])


if __name__ == "__main__":
    main()
