#!/usr/bin/env bash
# `make demo` until the full demo lands: a short smoke of the foundation —
# a scratch PKI, a scratch database, migrations, and the CA on show. Cleans up after itself.
set -euo pipefail
bin=${1:-.venv/bin}
work=$(mktemp -d)
db="devicegate_smoke_$$"
cleanup() {
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "devicegate smoke (the full demo is not available yet): CA init + migrate on scratch state"
export DEVICEGATE_PKI_DIR="$work/pki"
export DEVICEGATE_CA_PASSPHRASE="smoke-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DEVICEGATE_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$db"
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $db"
"$bin/devicegate" ca init
"$bin/devicegate" ca show
"$bin/devicegate" db migrate
"$bin/devicegate" db migrate
echo "smoke passed"
