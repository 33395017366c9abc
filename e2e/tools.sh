#!/usr/bin/env bash
# Build (or find) a pinned tool and print its path.
#
#   e2e/tools.sh helm        # -> /home/me/.cache/nanochat-tools/helm-v4.3.2/helm
#   e2e/tools.sh kube        # -> dir with kube-apiserver kube-controller-manager
#                            #    kube-scheduler kubectl etcd
#   e2e/tools.sh kwok        # -> /home/me/.cache/nanochat-tools/kwok-v0.8.0/kwok
#   e2e/tools.sh promtool    # -> /home/me/.cache/nanochat-tools/promtool-v0.316.0/promtool
#   e2e/tools.sh all         # every tool above, one path per line
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

# `go install MODULE@VERSION` of one command into <cache>/<name>-<version>/<name>, once.
# Built into a temp dir then moved, so an interrupted build never leaves a half binary that
# later calls would take as done. CGO off: a static binary that does not depend on libc.
go_install_tool() {
  local name="$1" module="$2" version="$3" dir go tmp
  dir="$cache/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    go="$(find_go)"
    mkdir -p "$dir"
    echo "tools.sh: building $name $version into $dir (takes minutes)" >&2
    tmp="$(mktemp -d "$dir/.build.XXXXXX")"
    CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS="${GOFLAGS:-} -trimpath" \
      nice -n 10 "$go" install -ldflags "-s -w" "$module@$version" >&2
    mv "$tmp/$name" "$dir/$name"
    rmdir "$tmp"
  fi
  echo "$dir/$name"
}

build_helm() { go_install_tool helm "$HELM_MODULE" "$HELM_VERSION"; }

# k8s.io/kubernetes cannot be `go install`ed: its go.mod points the staging modules
# (k8s.io/api, k8s.io/client-go, ...) at ./staging/src with `replace`, which the module
# proxy does not carry. So build from a throwaway main module whose go.mod requires
# k8s.io/kubernetes and replaces each staging module with its published v0.<minor>.<patch>.
# The replace list is read from kubernetes' own go.mod, so a version bump needs no edit here.
build_kube() {
  local dir="$cache/kubernetes-$KUBERNETES_VERSION" go
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
  local missing=0 b
  for b in "${bins[@]}"; do [ -x "$dir/bin/$b" ] || missing=1; done
  if [ "$missing" = 1 ]; then
    go="$(find_go)"
    local staging="v0.${KUBERNETES_VERSION#v1.}"
    local src="$dir/src"
    mkdir -p "$src" "$dir/bin"
    echo "tools.sh: building Kubernetes $KUBERNETES_VERSION (staging $staging) into $dir" \
         "(tens of minutes on 2 cores the first time)" >&2
    local kmod
    kmod="$(cd "$src" && GOFLAGS=-mod=mod "$go" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
            | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    {
      echo "module nanochat.local/kube-build"
      echo
      sed -n 's/^go \(.*\)$/go \1/p' "$kmod"
      echo
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo
      echo "replace ("
      sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*$#\t\1 => \1 '"$staging"'#p' "$kmod"
      echo ")"
    } > "$src/go.mod"
    # etcd's server module is in kubernetes' module graph at the version kubernetes pins.
    local etcd_ver
    etcd_ver="$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$kmod")"
    local vpkg="k8s.io/component-base/version" cpkg="k8s.io/client-go/pkg/version"
    local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
    # Stamp the version the way hack/lib/version.sh does; without it the API server reports
    # v0.0.0-master and helm's kubeVersion checks and kubectl's skew warnings misfire.
    local ldflags="-s -w"
    for p in "$vpkg" "$cpkg"; do
      ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
      ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    local tmp
    tmp="$(mktemp -d "$dir/.build.XXXXXX")"
    (
      cd "$src"
      export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=mod -trimpath"
      nice -n 10 "$go" get "k8s.io/kubernetes@$KUBERNETES_VERSION" "go.etcd.io/etcd/server/v3@$etcd_ver" >&2
      nice -n 10 "$go" build -ldflags "$ldflags" -o "$tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >&2
      nice -n 10 "$go" build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 >&2
    )
    for b in "${bins[@]}"; do mv "$tmp/$b" "$dir/bin/$b"; done
    rmdir "$tmp"
  fi
  echo "$dir/bin"
}

build_kwok() { go_install_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"; }

# promtool, for `promtool check rules` and `promtool test rules` over the chart's alerts
# (tests/test_alerts.py). Prometheus' go.mod has no replace directives, so `go install` works;
# about 4 minutes on 2 cores with an empty Go build cache.
build_promtool() {
  go_install_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMETHEUS_VERSION"
}

case "${1:-}" in
  helm) build_helm ;;
  kube) build_kube ;;
  kwok) build_kwok ;;
  promtool) build_promtool ;;
  all) build_helm; build_kube; build_kwok; build_promtool ;;
  *) echo "usage: $0 helm|kube|kwok|promtool|all" >&2; exit 2 ;;
esac
