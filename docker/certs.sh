#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate for TLS between SuperLink, SuperNodes and flwr.
#
#   bash docker/certs.sh [OUT_DIR] [SAN ...]
#   bash docker/certs.sh docker/certs DNS:superlink.example.org IP:10.0.0.5
#
# The server certificate names localhost, superlink and 127.0.0.1 plus every SAN given; give
# the name or address the SuperNodes will dial. Writes ca.crt (give it to SuperNodes and flwr),
# ca.key (keep it private), server.pem and server.key (the SuperLink's). Never overwrites.
set -euo pipefail
out=${1:-$(dirname "$0")/certs}
shift $(( $# > 0 ? 1 : 0 ))
if [ -e "$out/ca.crt" ] || [ -e "$out/server.pem" ]; then
  echo "certs.sh: $out already holds certificates; remove them first or choose another folder" >&2
  exit 1
fi
mkdir -p "$out"
sans="DNS:localhost,DNS:superlink,IP:127.0.0.1"
for san in "$@"; do sans="$sans,$san"; done
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=fedcil-lora CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=superlink" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 365 \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n" "$sans") \
  -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "certs.sh: CA and server certificate for $sans in $out"
