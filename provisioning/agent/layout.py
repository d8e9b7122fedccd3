"""The device directory's file names and the key types a device can make.

Kept free of heavy imports: the ``devicegate enroll`` options and its overwrite check read
them before the crypto and HTTP modules of `provisioning.agent.device` are loaded.
"""

from __future__ import annotations

from enum import StrEnum

KEY_FILE = "device.key"
CERT_FILE = "device.crt"
CHAIN_FILE = "chain.pem"
NEXT_KEY_FILE = "device.key.next"


class KeyType(StrEnum):
    P256 = "p256"
    P384 = "p384"
    ED25519 = "ed25519"
    RSA2048 = "rsa2048"
