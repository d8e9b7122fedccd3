#!/usr/bin/env bash
# Makes sure the services the tests and the demo need are here and running:
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth for loopback), the Mosquitto
# binary (tests start their own brokers), openssl and curl, SoftHSM2, OpenSC's
# pkcs11-tool and OpenSSL's pkcs11 engine (the PKCS#11 signer's and agent's tests). Starts what is installed but
# stopped; installs what is missing with apt-get when running as root; otherwise says
# what to install and fails.
set -euo pipefail

need_apt=()
command -v psql >/dev/null && command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v chromium >/dev/null || need_apt+=(chromium)   # console browser tests
command -v testssl >/dev/null || need_apt+=(testssl.sh)  # TLS audit tests
command -v faketime >/dev/null || need_apt+=(faketime)   # clock-jump fault test
command -v cc >/dev/null || need_apt+=(gcc)              # its libfaketime sleep shim
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)  # bench/loadgen/handshake.c
command -v softhsm2-util >/dev/null || need_apt+=(softhsm2)  # CA keys in a PKCS#11 token
command -v pkcs11-tool >/dev/null || need_apt+=(opensc)      # tests/provisioning/test_pkcs11.py
# The agent's IDevID key in a token: OpenSSL's pkcs11 engine (docs/secure-element.md).
dpkg -s libengine-pkcs11-openssl >/dev/null 2>&1 || need_apt+=(libengine-pkcs11-openssl)

if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "devicegate needs: ${need_apt[*]}. Install them with: sudo apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    echo "installing ${need_apt[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }

if ! pg_ready; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if [[ -z "$version" ]]; then
        echo "PostgreSQL is installed but has no cluster; create one with pg_createcluster" >&2
        exit 1
    fi
    echo "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 50); do pg_ready && break; sleep 0.2; done
    pg_ready || { echo "PostgreSQL did not start" >&2; exit 1; }
fi

# Tests connect as postgres@127.0.0.1 without a password. A fresh Debian cluster asks
# for one on TCP; when we are root, allow loopback trust once.
if ! psql -h 127.0.0.1 -U postgres -w -Atc 'select 1' >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        hba=$(su postgres -c "psql -Atc 'show hba_file'")
        echo "host all postgres 127.0.0.1/32 trust" | cat - "$hba" > "$hba.new" && mv "$hba.new" "$hba"
        chown postgres: "$hba"
        su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
    fi
    psql -h 127.0.0.1 -U postgres -w -Atc 'select 1' >/dev/null || {
        echo "cannot log in to PostgreSQL as postgres@127.0.0.1 without a password" >&2; exit 1; }
fi

# The machine's own broker on 1883 is not used by the tests (they start private ones),
# but the demo and developers expect it: start it when installed and stopped.
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    if [[ -f /etc/mosquitto/mosquitto.conf ]]; then
        mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
    fi
fi
echo "services ready: PostgreSQL $(psql -h 127.0.0.1 -U postgres -Atc 'show server_version'), $(mosquitto -h 2>/dev/null | head -1)"
