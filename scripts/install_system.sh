#!/usr/bin/env bash
# System packages the project needs (Debian): LLVM 19 for Dr.Jit's CPU backend
# (older LLVM aborts with "Cannot select ... fminimum") and Chromium for the browser test.
set -euo pipefail
packages=(libllvm19 chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
