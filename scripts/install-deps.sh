#!/usr/bin/env bash
# Installs the system packages smartnatd and its tests need (Debian 12). Idempotent.
set -euo pipefail
# iputils-ping: marked pings in routing tests; shellcheck, systemd (systemd-analyze), ruby
# (ruby -c on the Vagrantfile), packer (Debian's 1.6.6: `packer fmt -check` of the template;
# too old to validate it): the artefact tests, which would otherwise skip.
pkgs=(nftables libnftables1 iproute2 conntrack python3 python3-venv procps iputils-ping shellcheck systemd ruby packer)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
