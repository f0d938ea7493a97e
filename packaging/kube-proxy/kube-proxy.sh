#!/usr/bin/env bash
# Runs kube-proxy in IPVS mode on the smartnat appliance (started by kube-proxy.service).
#
# The appliance is not a cluster node: kube-proxy only turns ClusterIPs into IPVS virtual servers
# here, so that smartnatd can DNAT "mode: service" Mappings to a ClusterIP. --masquerade-all makes
# pods answer through this box whatever the source address was.
#
# --nodeport-addresses=127.0.0.1/32: by default kube-proxy serves every NodePort of the cluster on
# every address of the box, including the cluster-facing and default-route ones, which
# smartnatd's drop of unmapped traffic does not cover (it covers the external interfaces'
# addresses only). The appliance needs ClusterIPs, not NodePorts, and IPVS mode never serves
# NodePorts on loopback (kubernetes/kubernetes#96879): with this, no NodePort is open at all.
#
# Settings come from $KUBE_PROXY_ENV (default /etc/smartnat/kube-proxy.env); without the file the
# defaults below apply. Exit codes: 78 (EX_CONFIG) for a missing binary or kubeconfig, so
# systemd does not restart in a loop; otherwise kube-proxy's own.
set -euo pipefail

env_file=${KUBE_PROXY_ENV:-/etc/smartnat/kube-proxy.env}
if [[ -r $env_file ]]; then
  # shellcheck source=/dev/null
  . "$env_file"
fi

bin=${KUBE_PROXY_BIN:-/usr/local/bin/kube-proxy}
kubeconfig=${KUBE_PROXY_KUBECONFIG:-/etc/smartnat/kube-proxy.kubeconfig}
read -r -a modules <<<"${KUBE_PROXY_MODULES-ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack}"
read -r -a extra_args <<<"${KUBE_PROXY_ARGS:-}"

fail_config() {
  echo "kube-proxy.sh: $*" >&2
  exit 78
}

[[ -x $bin ]] || fail_config "$bin is not an executable file; set KUBE_PROXY_BIN in $env_file"
[[ -r $kubeconfig ]] || fail_config "cannot read $kubeconfig; create it with kubeconfig-from-serviceaccount.sh or set KUBE_PROXY_KUBECONFIG in $env_file"

# IPVS mode falls back to iptables mode (or fails) without these; load them before it looks.
for module in "${modules[@]}"; do
  if [[ -d /sys/module/$module ]]; then
    continue # loaded, or built into the kernel
  fi
  modprobe "$module" || fail_config "cannot load kernel module $module (modprobe failed)"
done

exec "$bin" \
  --proxy-mode=ipvs \
  --masquerade-all \
  --kubeconfig="$kubeconfig" \
  --nodeport-addresses=127.0.0.1/32 \
  --healthz-bind-address=127.0.0.1:10256 \
  --metrics-bind-address=127.0.0.1:10249 \
  "${extra_args[@]}" \
  "$@"
