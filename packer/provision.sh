#!/usr/bin/env bash
# Installs smartnatd on Debian 12: system packages, the /opt/smartnat venv, systemd units,
# sysctl and module settings, example configuration, and kube-proxy for "mode: service".
# Used by packer (smartnat.pkr.hcl) and by the Vagrant demo; safe to run again.
#
# Environment:
#   SMARTNAT_SRC          source tree to install (default: the checkout this script lives in)
#   SMARTNAT_SRC_TARBALL  install from this .tar.gz instead (top directory stripped; packer
#                         uploads `git archive --prefix=smartnat/ HEAD` output)
#   SMARTNAT_ROOT         install below this directory instead of / (for tests). Then apt-get
#                         is never run and units are enabled by symlink, not by systemctl.
#   KUBE_VERSION          kube-proxy (and kubectl) version from dl.k8s.io; default: the one
#                         pinned in packaging/kube-version of the source tree
#   SKIP_DOWNLOADS=1      do not download kube-proxy and kubectl
#   SKIP_PACKAGES=1       do not run apt-get
#   SKIP_VENV=1           do not create /opt/smartnat nor pip-install smartnatd
#   ENABLE_KUBE_PROXY=0   leave kube-proxy.service disabled, and disable it if an earlier run
#                         enabled it: every Mapping uses "mode: direct". smartnat.service only
#                         orders itself after kube-proxy, so a disabled kube-proxy never starts.
#
# Existing /etc/smartnat/*.env files are kept: only missing ones are installed.
set -euo pipefail

root=${SMARTNAT_ROOT:-}
root=${root%/}
venv=/opt/smartnat
unit_dir=/usr/local/lib/systemd/system
libexec_dir=/usr/local/libexec/smartnat
share_dir=/usr/local/share/smartnat
packages=(
  nftables libnftables1 iproute2 conntrack python3 python3-venv # smartnatd
  procps                                                       # sysctl, for the sysctl.d file
  iptables ipset ipvsadm                                       # kube-proxy in IPVS mode
  ca-certificates curl                                         # downloads
)

log() { echo "provision: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if [[ -z $root && $EUID -ne 0 ]]; then
  die "run as root (or set SMARTNAT_ROOT to install below a directory)"
fi
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# --- source tree -------------------------------------------------------------------------------
if [[ -n ${SMARTNAT_SRC_TARBALL:-} ]]; then
  mkdir "$work/src"
  tar -xzf "$SMARTNAT_SRC_TARBALL" -C "$work/src" --strip-components=1
  src=$work/src
else
  src=${SMARTNAT_SRC:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}
fi
[[ -f $src/pyproject.toml && -d $src/packaging/systemd ]] || die "$src is not a smartnatd source tree"
log "installing from $src into ${root:-/}"
kube_version=${KUBE_VERSION:-}
if [[ -z $kube_version && -r $src/packaging/kube-version ]]; then
  kube_version=$(<"$src/packaging/kube-version")
fi
[[ $kube_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "KUBE_VERSION='$kube_version' is not a release number X.Y.Z"

# --- system packages ---------------------------------------------------------------------------
if [[ ${SKIP_PACKAGES:-0} == 1 ]]; then
  log "skipping apt-get (SKIP_PACKAGES=1)"
elif [[ -n $root ]]; then
  log "skipping apt-get: it cannot install below SMARTNAT_ROOT=$root"
else
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

# --- files -------------------------------------------------------------------------------------
put() { # put MODE SOURCE DESTINATION: install a file below $root, creating directories
  install -D -m "$1" -- "$2" "$root$3"
}
put_once() { # like put, but keep a file that is already there (the operator's configuration)
  if [[ -e $root$3 ]]; then
    log "keeping existing $3"
  else
    put "$@"
  fi
}

put 0644 "$src/packaging/systemd/smartnat.service" "$unit_dir/smartnat.service"
put 0644 "$src/packaging/systemd/kube-proxy.service" "$unit_dir/kube-proxy.service"
put 0755 "$src/packaging/kube-proxy/kube-proxy.sh" "$libexec_dir/kube-proxy.sh"
put 0644 "$src/etc/sysctl.d/90-smartnat.conf" /etc/sysctl.d/90-smartnat.conf
put 0644 "$src/packaging/modules-load.d/smartnat.conf" /etc/modules-load.d/smartnat.conf
put 0644 "$src/etc/crd/mappings.yaml" "$share_dir/crd/mappings.yaml"
put 0644 "$src/etc/rbac.yaml" "$share_dir/rbac.yaml"
put 0755 "$src/etc/kubeconfig-from-serviceaccount.sh" "$share_dir/kubeconfig-from-serviceaccount.sh"

install -d -m 0755 "$root/etc/smartnat"
put_once 0644 "$src/packaging/kube-proxy/kube-proxy.env" /etc/smartnat/kube-proxy.env
if [[ -f $src/etc/smartnat.env ]]; then
  put 0644 "$src/etc/smartnat.env" "$share_dir/smartnat.env.example"
  put_once 0644 "$src/etc/smartnat.env" /etc/smartnat/smartnat.env
else
  log "no etc/smartnat.env in the source tree; write /etc/smartnat/smartnat.env by hand"
fi

# --- the daemon's venv -------------------------------------------------------------------------
if [[ ${SKIP_VENV:-0} == 1 ]]; then
  log "skipping the venv and pip (SKIP_VENV=1)"
else
  python3 -m venv "$root$venv"
  "$root$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
  # Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds. A
  # developer checkout may also hold a .venv, packer's output (packer/build/: disk images) and
  # test and bytecode caches, none of which belong in the copy (or would make it huge).
  mkdir "$work/build"
  excludes=(
    ./.git ./.venv ./build ./dist ./packer/build
    '*.egg-info' __pycache__ .pytest_cache .mypy_cache .hypothesis
  )
  tar -C "$src" "${excludes[@]/#/--exclude=}" -cf - . | tar -C "$work/build" -xf -
  "$root$venv/bin/python" -m pip install --quiet --no-cache-dir "$work/build"
  "$root$venv/bin/smartnatd" --version >/dev/null
fi
install -d -m 0755 "$root/usr/local/bin"
ln -sfn -- "$venv/bin/smartnatd" "$root/usr/local/bin/smartnatd"

# --- kube-proxy and kubectl ----------------------------------------------------------------------
download() { # download NAME: fetch a Kubernetes release binary, check its sha256, install it
  local arch url
  arch=$(dpkg --print-architecture)
  url=https://dl.k8s.io/release/v$kube_version/bin/linux/$arch/$1
  log "downloading $url"
  curl -fsSL --retry 3 -o "$work/$1" "$url"
  curl -fsSL --retry 3 -o "$work/$1.sha256" "$url.sha256"
  echo "$(<"$work/$1.sha256")  $work/$1" | sha256sum --check --quiet
  put 0755 "$work/$1" "/usr/local/bin/$1"
}
if [[ ${SKIP_DOWNLOADS:-0} == 1 ]]; then
  log "skipping kube-proxy and kubectl $kube_version downloads (SKIP_DOWNLOADS=1)"
else
  download kube-proxy
  download kubectl
fi

# --- enable the units -----------------------------------------------------------------------------
# Enabled, not started now: they start at the next boot (an image's first boot included). Until
# /etc/smartnat/smartnat.env and the kubeconfigs are configured they exit 78 and stay failed (no
# restart loop); configured from cloud-init's write_files, which runs before
# network-online.target, they come up at first boot.
units=(smartnat.service)
disabled=()
if [[ ${ENABLE_KUBE_PROXY:-1} == 1 ]]; then
  units+=(kube-proxy.service)
else
  disabled+=(kube-proxy.service)
fi
if [[ -n $root ]]; then
  # What `systemctl enable`/`disable` do for WantedBy=multi-user.target, without systemctl.
  wants=$root/etc/systemd/system/multi-user.target.wants
  install -d -m 0755 "$wants"
  for unit in "${units[@]}"; do
    ln -sfn -- "$unit_dir/$unit" "$wants/$unit"
  done
  for unit in "${disabled[@]}"; do
    rm -f -- "$wants/$unit"
  done
else
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    sysctl --quiet --load=/etc/sysctl.d/90-smartnat.conf
  fi
  systemctl enable "${units[@]}"
  if ((${#disabled[@]})); then
    systemctl disable "${disabled[@]}"
  fi
fi
started=smartnat
[[ ${ENABLE_KUBE_PROXY:-1} == 1 ]] && started="kube-proxy smartnat"
log "done; next: write /etc/smartnat/kubeconfig (kubeconfig-from-serviceaccount.sh) and" \
  "set SNCTRLR_INTERFACES_PATTERN in /etc/smartnat/smartnat.env, then: systemctl restart $started" \
  "(enabled: until configured they fail at boot with exit 78)"
