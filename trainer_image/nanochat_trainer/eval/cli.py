"""The `nanochat eval` and `nanochat serve` commands (argparse pieces the main CLI wires in).

    nanochat eval --checkpoint runs/demo --samples 10 --temperature 0.8 --k 1,10 --out results.json
    nanochat eval --endpoint http://teacher:8000 --model Qwen/Qwen3-8B --api-key-env OPENAI_API_KEY
    nanochat serve --checkpoint runs/demo/final --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .humaneval import STOP_SEQUENCES, evaluate_completions, load_problems, publish_result, summary_table


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint dir, or a run dir (newest checkpoint)")
    src.add_argument("--endpoint", help="base URL of an OpenAI-compatible server (vLLM, nanochat serve)")
    parser.add_argument("--model", help="model name at the endpoint (required with --endpoint)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= samples)")
    parser.add_argument("--max-problems", type=int, default=None, help="only the first N problems")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generation batch (checkpoint)")
    parser.add_argument("--workers", type=int, default=4, help="sandbox processes in parallel")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per completion in the sandbox")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--out", default=None,
                        help="write the full results JSON here (default with --checkpoint: humaneval.json beside it)")


def _ks(text: str, samples: int) -> list[int]:
    ks = sorted({int(x) for x in text.split(",") if x.strip()})
    if not ks or ks[0] < 1 or ks[-1] > samples:
        raise ValueError(f"--k {text!r}: each k must be between 1 and --samples ({samples})")
    return ks


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def completions_from_checkpoint(path: str, problems: Sequence[dict], args: argparse.Namespace) -> dict[str, list[str]]:
    """Generate `args.samples` completions per problem from a checkpoint with the KV cache."""
    from ..checkpoint import load_model
    from .generate import generate

    model, tok, _ = load_model(path, device=_device(args.device))
    outs = generate(model, tok, [p["prompt"] for p in problems], n=args.samples, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, stop=STOP_SEQUENCES, seed=args.seed,
                    batch_size=args.batch_size)
    return {p["task_id"]: o for p, o in zip(problems, outs)}


def completions_from_endpoint(url: str, model: str, problems: Sequence[dict], args: argparse.Namespace,
                              parallel: int = 4) -> dict[str, list[str]]:
    """Ask an OpenAI-compatible endpoint for `args.samples` completions per problem."""
    from .client import CompletionsClient

    with CompletionsClient(url, model, api_key_env=args.api_key_env) as client:
        def one(i_p: tuple[int, dict]) -> list[str]:
            i, p = i_p
            r = client.complete(p["prompt"], max_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p if args.temperature > 0 else 1.0, n=args.samples,
                                stop=list(STOP_SEQUENCES), seed=args.seed + i)
            if len(r.choices) != args.samples:
                from .client import EndpointError
                raise EndpointError(f"asked for {args.samples} choices, got {len(r.choices)}")
            return [c.text for c in r.choices]

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            outs = list(pool.map(one, enumerate(problems)))
    return {p["task_id"]: o for p, o in zip(problems, outs)}


def run_eval_from_args(args: argparse.Namespace) -> int:
    """`nanochat eval`: 0 on success, 2 on a usage/input error, 1 when the endpoint fails."""
    from .client import EndpointError

    try:
        ks = _ks(args.k, args.samples)
        if args.endpoint and not args.model:
            raise ValueError("--endpoint needs --model")
        if args.checkpoint and not Path(args.checkpoint).exists():
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        problems = load_problems(args.max_problems)
        t0 = time.monotonic()
        if args.checkpoint:
            completions = completions_from_checkpoint(args.checkpoint, problems, args)
        else:
            completions = completions_from_endpoint(args.endpoint, args.model, problems, args)
        gen_s = time.monotonic() - t0
    except (ValueError, FileNotFoundError) as exc:
        print(f"nanochat eval: error: {exc}", file=sys.stderr)
        return 2
    except EndpointError as exc:
        print(f"nanochat eval: endpoint error: {exc}", file=sys.stderr)
        return 1
    report = evaluate_completions(problems, completions, ks=ks, workers=args.workers, timeout=args.timeout)
    report["generation"] = {"source": args.checkpoint or args.endpoint, "model": args.model,
                            "temperature": args.temperature, "top_p": args.top_p,
                            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "seconds": round(gen_s, 3)}
    summary_table(report, file=sys.stderr)
    out = args.out
    if out is None and args.checkpoint:
        from ..checkpoint import resolve_model_dir

        source = Path(args.checkpoint)
        out = (source.parent if source.is_file() else resolve_model_dir(source)) / "humaneval.json"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
    publish_result(report)
    return 0


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (newest checkpoint)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="nanochat", help="the name /v1/models reports")
    parser.add_argument("--device", default=None)


def run_serve_from_args(args: argparse.Namespace) -> int:
    """`nanochat serve`: blocks until interrupted; 2 when the checkpoint is missing or unreadable."""
    if not Path(args.checkpoint).exists():
        print(f"nanochat serve: error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    from ..checkpoint import load_model
    from ..serve import run_server

    try:
        model, tok, _ = load_model(args.checkpoint, device=_device(args.device))
    except ValueError as exc:
        print(f"nanochat serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint} as {args.model_name!r} on http://{args.host}:{args.port}", file=sys.stderr)
    run_server(model, tok, host=args.host, port=args.port, model_name=args.model_name)
    return 0
