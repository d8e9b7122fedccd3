"""A device-side TLS client whose key is in a PKCS#11 token, run as its own process.

The tests start it with ``python -m tests.provisioning.pkcs11_client``: PKCS#11 state is
per process (C_Initialize, the login, SoftHSM2's configuration read at C_Initialize), so
each scenario gets a fresh one, as a device's agent would. It prints one JSON line:
``{"ok": true, "version": ..., "reply": ...}`` or ``{"ok": false, "failure": ...,
"reason": ..., "error": ...}`` and exits 0 or 1; a crash shows as a signal exit.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import sys
from pathlib import Path

from provisioning.agent.pkcs11_key import Pkcs11KeyError, pkcs11_client_context


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--module", type=Path)
    parser.add_argument("--pin-file", type=Path)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--send", default="ping\n")
    parser.add_argument("--contexts", type=int, default=1, help="build this many, keep the last")
    args = parser.parse_args()
    try:
        contexts = [
            pkcs11_client_context(args.cert, args.uri, args.module, args.pin_file, ca_cert=args.ca)
            for _ in range(args.contexts)
        ]
    except Pkcs11KeyError as error:
        print(json.dumps({"ok": False, "failure": error.failure, "reason": error.reason,
                          "error": str(error)}))  # fmt: skip
        return 1
    context = contexts[-1]
    del contexts[:-1]
    gc.collect()  # the other contexts' SSL_CTXs are freed before the handshake
    if args.port is None:
        print(json.dumps({"ok": True}))
        return 0
    with (
        socket.create_connection(("127.0.0.1", args.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version = tls.version()
        tls.sendall(args.send.encode())
        reply = b""
        while len(reply) < 1 << 20:
            chunk = tls.recv(65536)
            if not chunk:
                break
            reply += chunk
        print(json.dumps({"ok": True, "version": version, "reply": reply.decode()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
