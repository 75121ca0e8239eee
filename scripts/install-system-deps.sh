#!/usr/bin/env bash
# Installs the Debian packages visae's demo and tests read: real object photos
# (tuxpaint stamps), real background photos (opencv-doc), Fashion-MNIST,
# Chromium for the browser tests and PostgreSQL for the study server's tests.
# Needs root on Debian; elsewhere it says what to install.
set -euo pipefail
packages=(tuxpaint-stamps-default opencv-doc dataset-fashion-mnist chromium postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "visae: missing system packages: ${missing[*]} (install them with: sudo apt-get install ${missing[*]})" >&2
fi
