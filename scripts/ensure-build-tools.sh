#!/usr/bin/env bash
# Makes sure the install can build devicegate's C accelerators (gateway/events/_codec.c and
# gateway/_tlsext.c): a C compiler, the headers of the Python that installs it, and
# OpenSSL's headers. Installs what is missing with apt-get when running as root; otherwise
# says what to install. Never fails: the accelerators are optional (without them the event
# encoder runs in Python and refused handshakes do not name their certificate;
# tests/events/test_event_codec.py and tests/gateway/test_tls_presented.py say so).
# Usage: scripts/ensure-build-tools.sh [PYTHON]
set -uo pipefail

python="${1:-python3}"
include=$("$python" -c 'import sysconfig; print(sysconfig.get_path("include"))')

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
[ -e "$include/Python.h" ] || need_apt+=(python3-dev)
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)

((${#need_apt[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "warning: cannot build the C accelerators (gateway/*.c); install ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 0
fi
echo "installing ${need_apt[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null; } \
    || echo "warning: apt-get could not install ${need_apt[*]}" >&2
exit 0
