#!/usr/bin/env bash
# Installs the Debian packages the emoji quickstart renders its data from (about 35 MB). Idempotent.
set -euo pipefail
pkgs=(fonts-noto-color-emoji unicode-data unicode-cldr-core)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "No apt-get here: install ${need[*]} (or their equivalents) with your package manager." >&2
  exit 0  # the library works without them; only the quickstart needs them, and it says so itself
fi
run=()
[ "$(id -u)" -eq 0 ] || run=(sudo)
"${run[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
echo "installed ${need[*]}"
