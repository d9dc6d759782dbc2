"""`python -m tests.process_report --out OUT --exit-code N`: writes what this process sees (argv, working directory,
torch's thread count, the TEST_ variables of its environment) to OUT as JSON, prints "reported", exits with N."""

import argparse
import json
import os
import sys

import torch

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()
    seen = {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "threads": torch.get_num_threads(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("TEST_")},
    }
    with open(args.out, "w") as handle:
        json.dump(seen, handle)
    print("reported", flush=True)
    sys.exit(args.exit_code)
