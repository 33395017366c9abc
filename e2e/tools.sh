#!/usr/bin/env bash
# Build (or find) a pinned tool and print its path.
#
#   e2e/tools.sh helm        # -> /home/me/.cache/nanochat-tools/helm-v4.3.2/helm
#
# Versions come from e2e/versions.env only. Tools are cached OUTSIDE the repo under
# ${NANOCHAT_TOOLS_CACHE:-$HOME/.cache/nanochat-tools}/<tool>-<version>/, built only when
# missing, so a second call is instant and bumping a version builds a fresh copy.
# Builds run under `nice` because go builds take minutes on a small shared machine.
# Progress goes to stderr; stdout is only the path, so `HELM=$(e2e/tools.sh helm)` works.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${NANOCHAT_TOOLS_CACHE:-$HOME/.cache/nanochat-tools}"

find_go() {
  if command -v go >/dev/null 2>&1; then command -v go
  elif [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go
  else echo "tools.sh: go is needed to build tools (https://go.dev/dl/)" >&2; return 1
  fi
}

build_helm() {
  local dir="$cache/helm-$HELM_VERSION" go
  if [ ! -x "$dir/helm" ]; then
    go="$(find_go)"
    mkdir -p "$dir"
    echo "tools.sh: building helm $HELM_VERSION into $dir (takes minutes)" >&2
    # Build into a temp dir then move, so an interrupted build never leaves a half binary
    # that later calls would take as done.
    local tmp
    tmp="$(mktemp -d "$dir/.build.XXXXXX")"
    # CGO off: a static binary that does not depend on this machine's libc.
    CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS="${GOFLAGS:-} -trimpath" \
      nice -n 10 "$go" install "$HELM_MODULE@$HELM_VERSION" >&2
    mv "$tmp/helm" "$dir/helm"
    rmdir "$tmp"
  fi
  echo "$dir/helm"
}

case "${1:-}" in
  helm) build_helm ;;
  *) echo "usage: $0 helm" >&2; exit 2 ;;
esac
