#!/usr/bin/env bash
# Regenerates the bad-input files in this folder with openssl (see README.md). Not run by the
# tests: the files are committed so every run sees the same bytes.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
subj="/CN=bad.test"
san="subjectAltName=DNS:bad.test"

openssl genrsa -out "$tmp/rsa1024.key" 1024 2>/dev/null
openssl req -new -key "$tmp/rsa1024.key" -subj "$subj" -addext "$san" -sha256 -out csr-rsa1024.pem
openssl genrsa -out "$tmp/rsa2047.key" 2047 2>/dev/null
openssl req -new -key "$tmp/rsa2047.key" -subj "$subj" -addext "$san" -sha256 -out csr-rsa2047.pem
openssl ecparam -name prime192v1 -genkey -noout -out "$tmp/p192.key"
openssl req -new -key "$tmp/p192.key" -subj "$subj" -addext "$san" -sha256 -out csr-p192.pem
openssl dsaparam -genkey -out "$tmp/dsa.key" 2048 2>/dev/null
openssl req -new -key "$tmp/dsa.key" -subj "$subj" -addext "$san" -sha256 -out csr-dsa.pem
openssl genrsa -out "$tmp/rsa2048.key" 2048 2>/dev/null
openssl req -new -key "$tmp/rsa2048.key" -subj "$subj" -addext "$san" -sha1 -out csr-sha1.pem
openssl req -new -key "$tmp/rsa2048.key" -subj "$subj" -addext "$san" -sha256 -out csr-good-rsa2048.pem
# A valid CSR whose signature's last byte is flipped: well-formed DER, signature fails.
openssl req -in csr-good-rsa2048.pem -outform DER -out "$tmp/good.der"
python3 - "$tmp/good.der" csr-bad-signature.der <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[-1] ^= 0x01
open(sys.argv[2], "wb").write(bytes(data))
PY
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/p256.key"
openssl req -new -key "$tmp/p256.key" -subj "/CN=outside.example.com" \
  -addext "subjectAltName=DNS:outside.example.com" -sha256 -out csr-outside-policy.pem
head -c 512 /dev/urandom > garbage.bin
: > empty.csr
