#!/usr/bin/env bash
# Writes a kubeconfig for a smartnat appliance from a ServiceAccount token Secret (etc/rbac.yaml).
#
# Usage: kubeconfig-from-serviceaccount.sh [-n NAMESPACE] [-s SECRET] [-w SECONDS] SERVER_URL [OUTPUT]
#   SERVER_URL  the API server as the appliance reaches it, e.g. https://192.0.2.10:6443
#   OUTPUT      file to write (mode 0600), default /etc/smartnat/kubeconfig
#   -n          namespace of the Secret (default smartnat-system)
#   -s          Secret name (default smartnat-token; smartnat-kube-proxy-token for kube-proxy)
#   -w          seconds to wait for the token controller to fill the Secret in (default 30)
#
# Runs wherever kubectl can read that Secret (set KUBECTL to use another command, e.g.
# "k3s kubectl"). The token is the appliance's password: copy the file over a safe channel.
set -euo pipefail

namespace=smartnat-system
secret=smartnat-token
wait_seconds=30

usage() {
  sed -n '4,10s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

while getopts ":n:s:w:h" opt; do
  case $opt in
    n) namespace=$OPTARG ;;
    s) secret=$OPTARG ;;
    w) wait_seconds=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
(($# >= 1 && $# <= 2)) || usage
server=$1
output=${2:-/etc/smartnat/kubeconfig}

if [[ ! $server =~ ^https://[^[:space:]\"\'/]+(/[^[:space:]\"\']*)?$ ]]; then
  echo "kubeconfig-from-serviceaccount.sh: SERVER_URL must be an https:// URL, got '$server'" >&2
  exit 2
fi
[[ $wait_seconds =~ ^[0-9]+$ ]] || usage
for name in "$namespace" "$secret"; do
  [[ $name =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || {
    echo "kubeconfig-from-serviceaccount.sh: '$name' is not a Kubernetes object name" >&2
    exit 2
  }
done

read -r -a kubectl <<<"${KUBECTL:-kubectl}"

secret_field() { # prints one base64-encoded data field of the Secret, or nothing
  "${kubectl[@]}" --namespace "$namespace" get secret "$secret" -o "jsonpath={.data.$1}"
}

# The token controller fills token and ca.crt in shortly after the Secret is created.
token_b64=""
for ((i = 0; ; i++)); do
  token_b64=$(secret_field token)
  [[ -n $token_b64 ]] && break
  if ((i >= wait_seconds)); then
    echo "kubeconfig-from-serviceaccount.sh: secret $namespace/$secret has no token after ${wait_seconds}s;" \
      "is it of type kubernetes.io/service-account-token with an existing ServiceAccount?" >&2
    exit 1
  fi
  sleep 1
done
ca_b64=$(secret_field 'ca\.crt')
if [[ -z $ca_b64 ]]; then
  echo "kubeconfig-from-serviceaccount.sh: secret $namespace/$secret has no ca.crt" >&2
  exit 1
fi
token=$(printf '%s' "$token_b64" | base64 --decode)
# A JWT: base64url segments and dots. Anything else would need YAML quoting; refuse it.
if [[ ! $token =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "kubeconfig-from-serviceaccount.sh: the token in $namespace/$secret is not a JWT" >&2
  exit 1
fi
if [[ ! $ca_b64 =~ ^[A-Za-z0-9+/=]+$ ]]; then
  echo "kubeconfig-from-serviceaccount.sh: ca.crt in $namespace/$secret is not base64" >&2
  exit 1
fi

# Write next to the target and rename, so a reader never sees half a file or a wider mode.
umask 077
dir=$(dirname -- "$output")
mkdir -p -- "$dir"
tmp=$(mktemp -- "$dir/.kubeconfig.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: smartnat
    cluster:
      server: "$server"
      certificate-authority-data: $ca_b64
users:
  - name: $secret
    user:
      token: $token
contexts:
  - name: smartnat
    context:
      cluster: smartnat
      user: $secret
      namespace: $namespace
current-context: smartnat
preferences: {}
EOF
chmod 0600 -- "$tmp"
mv -f -- "$tmp" "$output"
trap - EXIT
echo "wrote $output for $namespace/$secret (server $server)" >&2
