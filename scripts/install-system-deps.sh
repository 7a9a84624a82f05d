#!/usr/bin/env bash
# Installs the Debian packages the emoji quickstart renders its data from (about 35 MB); with --browser also the
# browser that the test of `mmfuse serve`'s page drives (chromium + chromium-driver, about 250 MB), which only
# `make test` needs. Idempotent: quick when all are installed.
#
#   ./scripts/install-system-deps.sh            # make quickstart: the emoji packages
#   ./scripts/install-system-deps.sh --browser  # make test: the emoji packages and the browser
set -euo pipefail
pkgs=(fonts-noto-color-emoji unicode-data unicode-cldr-core)
browser=()
for arg in "$@"; do
  case "$arg" in
    --browser) browser=(chromium chromium-driver) ;;
    *) echo "usage: $0 [--browser]" >&2; exit 2 ;;
  esac
done
missing() { for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done; }
mapfile -t need < <(missing "${pkgs[@]}")
mapfile -t need_browser < <(missing "${browser[@]}")
[ ${#need[@]} -eq 0 ] && [ ${#need_browser[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "No apt-get here: install ${need[*]} ${need_browser[*]} (or their equivalents) with your package manager." >&2
  exit 0  # the library works without them; the quickstart says so itself, and the browser test is skipped
fi
run=()
[ "$(id -u)" -eq 0 ] || run=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${run[@]}" apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  "${run[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
  echo "installed ${need[*]}"
fi
if [ ${#need_browser[@]} -gt 0 ]; then
  # Not fatal: where the distribution's chromium is only a snap stub (Ubuntu), the browser test is skipped instead.
  if "${run[@]}" apt-get install -y -qq "${need_browser[@]}" >/dev/null; then
    echo "installed ${need_browser[*]}"
  else
    echo "could not install ${need_browser[*]}: the test of mmfuse serve's page in a browser will be skipped" >&2
  fi
fi
