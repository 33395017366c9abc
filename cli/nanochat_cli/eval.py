"""The `nanochat eval` and `nanochat serve` commands (argparse pieces `main.py` wires in when torch,
the trainer extra, is installed).

    nanochat eval --checkpoint runs/demo --samples 10 --temperature 0.8 --k 1,10 --out results.json
    nanochat eval --endpoint http://teacher:8000 --model Qwen/Qwen3-8B --api-key-env OPENAI_API_KEY
    nanochat eval --checkpoint runs/ternary/final --name ternary \
        --compare parent=runs/base/final --compare teacher=http://teacher:8000/v1#Qwen/Qwen3-8B
    nanochat serve --checkpoint runs/demo/final --port 8000
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_trainer.checkpoint import load_model, resolve_model_dir
from nanochat_trainer.contract import compare_key_env, split_endpoint_source
from nanochat_trainer.errors import EXIT_CONFIG, EXIT_MACHINE, ConfigError
from nanochat_trainer.eval.client import CompletionsClient, EndpointError
from nanochat_trainer.eval.generate import generate
from nanochat_trainer.eval.humaneval import (
    STOP_SEQUENCES,
    evaluate_completions,
    load_problems,
    publish_result,
    summary_table,
)
from nanochat_trainer.parallel.distributed import _check_cuda as check_cuda  # the trainer's own wording
from nanochat_trainer.serve import run_server


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint dir, or a run dir (newest checkpoint)")
    src.add_argument("--endpoint", help="base URL of an OpenAI-compatible server (vLLM, nanochat serve)")
    parser.add_argument("--model", help="model name at the endpoint (required with --endpoint)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    parser.add_argument("--samples", type=positive_int, default=1, help="completions per problem (n)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= samples)")
    parser.add_argument("--max-problems", type=positive_int, default=None, help="only the first N problems")
    # HumanEval's canonical solutions take up to 513 GPT-2 tokens (3 over 384, 1 over 512).
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows per generation batch (checkpoint)")
    parser.add_argument("--workers", type=positive_int, default=4, help="sandbox processes in parallel")
    parser.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per completion in the sandbox")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--name", default="model", help="label of the model in a comparison")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="also score NAME on the same problems with the same settings, side by side: SOURCE is "
        "a checkpoint path, or URL#MODEL for an endpoint (API key from "
        f"${compare_key_env('<NAME>')}, NAME upper-cased, - as _); repeatable",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write the full results JSON here (default with --checkpoint: humaneval.json beside it)",
    )


# argparse types: downstream, 0 reads as "unset" (`--max-problems 0` scored all 164 problems).
def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count where 0 or less means nothing: problems, samples, tokens, rows, workers."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A duration where 0 or less means nothing: seconds to wait."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


@dataclass(frozen=True)
class Source:
    """One model to score: a checkpoint, or an endpoint's model."""

    name: str
    checkpoint: str | None = None
    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None

    @property
    def where(self) -> str:
        return self.checkpoint or f"{self.endpoint} ({self.model})"


def parse_compare(text: str) -> Source:
    """NAME=PATH or NAME=URL#MODEL (see --compare)."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--compare {text!r}: expected NAME=PATH or NAME=URL#MODEL")
    try:
        endpoint = split_endpoint_source(source)
    except ValueError as err:
        raise ValueError(f"--compare {text!r}: {err}") from None
    if endpoint is not None:
        return Source(name, endpoint=endpoint[0], model=endpoint[1], api_key_env=compare_key_env(name))
    if not Path(source).exists():
        raise ValueError(f"--compare {text!r}: checkpoint {source} does not exist")
    return Source(name, checkpoint=source)


# Refusals that are a wait or an overload, not the request's fault.
_TRANSIENT_4XX = {408, 429}


def endpoint_exit_status(exc: EndpointError) -> int:
    """2 when the endpoint refused the request itself (a wrong URL path, model name or API key:
    the user's configuration, which a retry would not change); 1 for an endpoint that is down, slow,
    overloaded or broken, which a retry (Kubernetes') may get past."""
    status = exc.refused
    if status is not None and 400 <= status < 500 and status not in _TRANSIENT_4XX:
        return EXIT_CONFIG
    return EXIT_MACHINE


def _ks(text: str, samples: int, temperature: float) -> list[int]:
    ks = sorted({int(x) for x in text.split(",") if x.strip()})
    if not ks or ks[0] < 1 or ks[-1] > samples:
        raise ValueError(f"--k {text!r}: each k must be between 1 and --samples ({samples})")
    if samples > 1 and temperature == 0:
        raise ValueError(
            f"--samples {samples} with --temperature 0: greedy completions are identical, so "
            "pass@k for k > 1 would be pass@1; set --temperature (Codex's pass@k sampled at 0.2 to 0.8)"
        )
    return ks


def _device(name: str | None) -> str:
    """--device, checked as the trainer checks `device: cuda` (one line, not torch's traceback)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ConfigError("--device", name, "not a torch device: cpu, cuda, cuda:N, mps, ...") from None
    if kind == "cuda":
        check_cuda()
    return name


def completions_from_checkpoint(path: str, problems: Sequence[dict], args: argparse.Namespace) -> dict[str, list[str]]:
    """Generate `args.samples` completions per problem from a checkpoint with the KV cache."""
    model, tok, _ = load_model(path, device=_device(args.device))
    outs = generate(
        model,
        tok,
        [p["prompt"] for p in problems],
        n=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=STOP_SEQUENCES,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    return {p["task_id"]: o for p, o in zip(problems, outs)}


def completions_from_endpoint(
    url: str,
    model: str,
    problems: Sequence[dict],
    args: argparse.Namespace,
    parallel: int = 4,
    api_key_env: str | None = None,
) -> dict[str, list[str]]:
    """Ask an OpenAI-compatible endpoint for `args.samples` completions per problem."""
    with CompletionsClient(url, model, api_key_env=api_key_env or args.api_key_env) as client:

        def one(i_p: tuple[int, dict]) -> list[str]:
            i, p = i_p
            r = client.complete(
                p["prompt"],
                max_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p if args.temperature > 0 else 1.0,
                n=args.samples,
                stop=list(STOP_SEQUENCES),
                seed=args.seed + i,
            )
            if len(r.choices) != args.samples:
                raise EndpointError(f"asked for {args.samples} choices, got {len(r.choices)}")
            return [c.text for c in r.choices]

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            outs = list(pool.map(one, enumerate(problems)))
    return {p["task_id"]: o for p, o in zip(problems, outs)}


def _completions(source: Source, problems: Sequence[dict], args: argparse.Namespace) -> dict[str, list[str]]:
    if source.checkpoint:
        return completions_from_checkpoint(source.checkpoint, problems, args)
    assert source.endpoint and source.model
    return completions_from_endpoint(source.endpoint, source.model, problems, args, api_key_env=source.api_key_env)


def comparison_table(rows: Sequence[dict], file=None) -> None:
    """The compared models side by side, one line each, pass@k in columns."""
    file = file or sys.stdout
    ks = list(rows[0]["pass_at_k"])
    width = max(len(r["name"]) for r in rows) + 2
    print("  ".join([f"{'model':<{width}}"] + [f"pass@{k:<5}" for k in ks] + ["source"]), file=file)
    for r in rows:
        print(
            "  ".join([f"{r['name']:<{width}}"] + [f"{r['pass_at_k'][k]:<10.4f}" for k in ks] + [r["source"]]),
            file=file,
        )


def run_eval_from_args(args: argparse.Namespace) -> int:
    """`nanochat eval`: 0 on success, 2 on a usage/input error, 1 when the endpoint fails."""
    try:
        ks = _ks(args.k, args.samples, args.temperature)
        if args.endpoint and not args.model:
            raise ValueError("--endpoint needs --model")
        if args.checkpoint and not Path(args.checkpoint).exists():
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        main = Source(args.name, checkpoint=args.checkpoint, endpoint=args.endpoint, model=args.model)
        others = [parse_compare(c) for c in args.compare]
        names = [main.name] + [o.name for o in others]
        if len(set(names)) != len(names):
            raise ValueError(f"--name/--compare names must differ: {names}")
        problems = load_problems(args.max_problems)
        t0 = time.monotonic()
        completions = _completions(main, problems, args)
        gen_s = time.monotonic() - t0
        other_completions = [_completions(o, problems, args) for o in others]
    except (ValueError, FileNotFoundError) as exc:
        print(f"nanochat eval: error: {exc}", file=sys.stderr)
        return 2
    except EndpointError as exc:
        print(f"nanochat eval: endpoint error: {exc}", file=sys.stderr)
        return endpoint_exit_status(exc)
    report = evaluate_completions(problems, completions, ks=ks, workers=args.workers, timeout=args.timeout)
    report["generation"] = {
        "source": args.checkpoint or args.endpoint,
        "model": args.model,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "seconds": round(gen_s, 3),
    }
    summary_table(report, file=sys.stderr)
    if others:
        # The same problems, samples, temperature and seed for every model: only the model differs.
        rows = [{"name": main.name, "source": main.where, "pass_at_k": report["pass_at_k"]}]
        for o, comp in zip(others, other_completions):
            r = evaluate_completions(problems, comp, ks=ks, workers=args.workers, timeout=args.timeout)
            rows.append(
                {"name": o.name, "source": o.where, "pass_at_k": r["pass_at_k"], "per_problem": r["per_problem"]}
            )
        report["comparison"] = rows
        comparison_table(rows, file=sys.stderr)
    out = args.out
    if out is None and args.checkpoint:
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
    parser.add_argument("--port", type=port_number, default=8000, help="0: any free port")
    parser.add_argument("--model-name", default="nanochat", help="the name /v1/models reports")
    parser.add_argument("--device", default=None)


_BIND_ERRNOS = {errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL}


def bind_error(host: str, port: int, err: OSError) -> ConfigError:
    """Why the server cannot listen, as the flag to change. A taken or privileged port is the
    user's choice on their own machine (the operator never runs `nanochat serve`, so no retry
    would help): exit 2, as metrics.port."""
    if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
        return ConfigError("--host", host, f"cannot listen there: {err.strerror or err}")
    return ConfigError("--port", port, f"cannot listen there: {err.strerror or err}")


def check_can_listen(host: str, port: int) -> None:
    """Bind (host, port) once before the model loads, so a taken port is said at once, not after it."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
                s.bind(address)
    except OSError as err:
        raise bind_error(host, port, err) from None


def run_serve_from_args(args: argparse.Namespace) -> int:
    """`nanochat serve`: blocks until interrupted; 2 when the checkpoint is missing or unreadable or
    the address cannot be listened on, 1 for a device the machine lacks."""
    if not Path(args.checkpoint).exists():
        print(f"nanochat serve: error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    try:
        check_can_listen(args.host, args.port)
        model, tok, _ = load_model(args.checkpoint, device=_device(args.device))
    except ValueError as exc:
        print(f"nanochat serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint} as {args.model_name!r} on http://{args.host}:{args.port}", file=sys.stderr)
    try:
        run_server(model, tok, host=args.host, port=args.port, model_name=args.model_name)
    except OSError as err:
        if err.errno not in _BIND_ERRNOS:
            raise
        # Taken while the model loaded.
        print(f"nanochat serve: error: {bind_error(args.host, args.port, err)}", file=sys.stderr)
        return 2
    return 0
