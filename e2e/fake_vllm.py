"""FakeVLLM: a stand-in for the vLLM image, which needs GPUs this machine does not have. The e2e
node agent runs it in place of the `vllm` command of a container whose image is the operator's
`--vllm-image` in the tests (`TestNodeAgent(stand_ins=...)`), with the arguments the operator
rendered:

    python e2e/fake_vllm.py serve /data/runs/r/hf --host 127.0.0.1 --port 8000 \
        --served-model-name r --tensor-parallel-size 2 --max-model-len 256 --dtype bfloat16 ...

It takes `vllm serve`'s flags that the operator writes (an unknown flag is an error, as in vLLM),
prints them as one JSON line, and serves the Hugging Face directory it is given, read by
nanochat's Hugging Face adapter (so the export is really read), with nanochat's own
OpenAI-compatible server (`nanochat_trainer.serve`: /v1/completions, /health), on the CPU, in
one process: what is fake is the engine, its tensor parallelism and its GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanochat_trainer.models.hf_adapter import load_hf_checkpoint
from nanochat_trainer.serve import run_server
from nanochat_trainer.tokenizer import load_tokenizer

# The operator's --vllm-image in the e2e tests: a name no runtime could pull, which the node agent
# runs as this file (tests/e2e/conftest.py).
IMAGE = "e2e.invalid/fake-vllm:stand-in"
STAND_IN = [sys.executable, str(Path(__file__).resolve())]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm (e2e stand-in)")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model", help="a Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--generation-config", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print("fake vllm: " + json.dumps(vars(args), sort_keys=True), flush=True)
    model, _ = load_hf_checkpoint(args.model, max_seq_len=args.max_model_len)
    tokenizer = load_tokenizer(args.model)
    run_server(model.eval(), tokenizer, host=args.host, port=args.port, model_name=args.served_model_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
