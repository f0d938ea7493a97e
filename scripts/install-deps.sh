#!/usr/bin/env bash
# Installs the Debian 12 packages smartnatd needs. Idempotent; apt-get runs only when something
# is missing.
#
#   install-deps.sh          what `make demo` needs: the daemon's runtime and the namespace demo
#   install-deps.sh --test   that plus the tools only the test suite uses (`make test`)
#
# make and git are not installed here (make runs this script): on a fresh Debian 12 cloud image,
# `apt-get install -y make git` first.
set -euo pipefail

# nftables, libnftables1, iproute2, conntrack: the kernel edges; python3, python3-venv: .venv;
# procps: sysctl, which the demo's namespaces are set up with.
runtime=(nftables libnftables1 iproute2 conntrack python3 python3-venv procps)
# Only the tests use these; a missing tool skips its tests with a message, it does not fail them.
#   - iputils-ping: marked pings in the routing tests
#   - shellcheck: lint of the shell scripts
#   - systemd: systemd-analyze verify/security of the units (cloud images have it already)
#   - ruby: `ruby -c` syntax check of vagrant/Vagrantfile
#   - packer: `packer fmt -check` of packer/smartnat.pkr.hcl, a format and HCL syntax check
#     only. Debian's packer 1.6.6 cannot `packer init` or validate the template
#     (required_version >= 1.10); building images needs HashiCorp's packer.
test_only=(iputils-ping shellcheck systemd ruby packer)

case ${1:-} in
  "") pkgs=("${runtime[@]}") ;;
  --test) pkgs=("${runtime[@]}" "${test_only[@]}") ;;
  *)
    echo "usage: $0 [--test]" >&2
    exit 2
    ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0

if [[ $EUID -ne 0 ]]; then
  echo "install-deps.sh: run as root (sudo) to install: ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
