#!/usr/bin/env bash
# Vagrant demo, smartnat machine: installs smartnatd with packer/provision.sh (as an image build
# would), routes the pod network through the k8s machine, and writes the demo settings.
# The Vagrantfile then copies the kubeconfigs in and starts the services.
# Usage: provision-appliance.sh K8S_IP POD_CIDR KUBE_VERSION EXTERNAL_IP...
set -euo pipefail

k8s_ip=$1
pod_cidr=$2
kube_version=$3
shift 3
external_ips=("$@")
src=/srv/smartnat

SMARTNAT_SRC=$src KUBE_VERSION=$kube_version "$src/packer/provision.sh"

iface_of() { # the interface that holds an IPv4 address
  ip -o -4 addr show | awk -v want="$1" '{split($4, a, "/")} a[1] == want {print $2; exit}'
}

external_ifaces=()
for address in "${external_ips[@]}"; do
  iface=$(iface_of "$address")
  [[ -n $iface ]] || {
    echo "provision-appliance: no interface has $address" >&2
    exit 1
  }
  external_ifaces+=("$iface")
done
default_iface=$(ip -o -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
joined=$(
  IFS='|'
  echo "${external_ifaces[*]}"
)
pattern="^(${joined})\$"

# Pod IPs ("mode: direct", and what kube-proxy turns ClusterIPs into) are behind the k8s node.
cat >/etc/systemd/system/smartnat-demo-routes.service <<EOF
[Unit]
Description=smartnatd demo: route the pod network through the k8s machine
After=network-online.target
Wants=network-online.target
Before=kube-proxy.service smartnat.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip route replace $pod_cidr via $k8s_ip

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable --now smartnat-demo-routes.service

# A demo box: these settings replace whatever provision.sh installed.
cat >/etc/smartnat/smartnat.env <<EOF
# Written by vagrant/provision-appliance.sh for the demo.
SNCTRLR_INTERFACES_PATTERN='$pattern'
SNCTRLR_DEFAULT_GW_INTERFACE=$default_iface
SNCTRLR_INSTANCE_NAME=smartnat
SNCTRLR_DEBUG_ENABLED=true
EOF
chmod 0644 /etc/smartnat/smartnat.env
echo "provision-appliance: external interfaces ${external_ifaces[*]} (pattern $pattern), default route via $default_iface" >&2
