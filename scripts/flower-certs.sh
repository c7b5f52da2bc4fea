#!/usr/bin/env bash
# Test certificates for a loopback SuperLink, and SuperNode authentication keys.
#   scripts/flower-certs.sh [N]     -> $FEDSEED_FLOWER_DIR/certs: ca.crt, server.pem/.key, supernode0..N-1(.pub)
# The server certificate names 127.0.0.1, 127.0.0.2 (the loopback fleet gateway's "public" address)
# and localhost; for real machines issue one for the SuperLink's (or gateway's) address from your own CA. Node keys must be EC keys on a NIST curve in OpenSSH
# format (ed25519 is refused by Flower).
set -euo pipefail
. "$(dirname "$0")/flower-env.sh"
N=${1:-3}
OUT=$FEDSEED_FLOWER_DIR/certs
mkdir -p "$OUT" && cd "$OUT"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -new -x509 -key ca.key -sha256 -days 30 -subj "/CN=fedseed loopback CA" -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
  "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
for ((i = 0; i < N; i++)); do
  rm -f "supernode$i" "supernode$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode$i" -f "supernode$i"
done
echo "certificates and $N node keys in $OUT"
