#!/usr/bin/env bash
# Vagrant demo, k8s machine: k3s, the Mapping CRD and RBAC, the demo workload, and kubeconfigs
# for the appliance in /root/smartnat/ (the Vagrantfile copies them over).
# Usage: provision-k8s.sh NODE_IP K3S_VERSION
set -euo pipefail

node_ip=$1
k3s_version=$2
src=/srv/smartnat
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

iface=$(ip -o -4 addr show | awk -v want="$node_ip" '{split($4, a, "/")} a[1] == want {print $2; exit}')
[[ -n $iface ]] || {
  echo "provision-k8s: no interface has $node_ip" >&2
  exit 1
}

if ! command -v k3s >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates
  # Flannel on the internal network; no ingress controller or service load balancer: the
  # appliance is what exposes Services here.
  curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION=$k3s_version sh -s - server \
    --node-ip "$node_ip" --flannel-iface "$iface" --tls-san "$node_ip" \
    --disable traefik --disable servicelb --disable metrics-server
fi

until kubectl get --raw /readyz >/dev/null 2>&1; do sleep 2; done
kubectl wait --for=condition=Ready node --all --timeout=300s

kubectl apply -f "$src/etc/crd/mappings.yaml"
kubectl wait --for=condition=Established crd/mappings.smartnat.aureacentral.com --timeout=60s
kubectl apply -f "$src/etc/rbac.yaml"
kubectl apply -f "$src/vagrant/manifest.yaml"

install -d -m 0700 /root/smartnat
"$src/etc/kubeconfig-from-serviceaccount.sh" "https://$node_ip:6443" /root/smartnat/kubeconfig
"$src/etc/kubeconfig-from-serviceaccount.sh" -s smartnat-kube-proxy-token \
  "https://$node_ip:6443" /root/smartnat/kube-proxy.kubeconfig
kubectl -n smartnat-demo rollout status deployment/echo --timeout=300s
