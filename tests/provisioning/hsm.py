"""SoftHSM2 for the tests: a token directory of the test session's own, tokens made by
``softhsm2-util``, and the PKCS#11 CA made in them.

SoftHSM2 reads ``SOFTHSM2_CONF`` once per process (at C_Initialize), so a test process has
one token directory (`Hsm`, made by the session fixture ``hsm``) and its tests tell their
CAs apart by token label. ``softhsm2-util`` and ``devicegate`` subprocesses get the same
``SOFTHSM2_CONF`` through the environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from provisioning.pki.pkcs11 import TokenRef

MODULE_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
)

SIGNERS = ("file", "pkcs11")
"""The CA signers a test marked with `both_signers` runs with."""


def softhsm_module() -> Path | None:
    """SoftHSM2's PKCS#11 module, when installed (scripts/ensure-services.sh installs it)."""
    if shutil.which("softhsm2-util") is None:
        return None
    return next((path for path in MODULE_CANDIDATES if path.exists()), None)


@dataclass(frozen=True)
class Hsm:
    """A SoftHSM2 token directory and its configuration file."""

    directory: Path
    conf: Path
    module: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def new_token(self, label: str | None = None, *, pin: str | None = None) -> TokenRef:
        """A new initialised token, and its PIN in a 0600 file beside the tokens."""
        label = label or f"t-{secrets.token_hex(4)}"
        pin = pin or secrets.token_hex(6)
        subprocess.run(
            [
                "softhsm2-util", "--init-token", "--free", "--label", label,
                "--pin", pin, "--so-pin", secrets.token_hex(6),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, **self.env},
        )  # fmt: skip
        pin_file = self.directory / f"{label}.pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(pin + "\n")
        return TokenRef(self.module, label, pin_file)

    def token_directory(self, label: str) -> Path:
        """The directory SoftHSM2 keeps the token ``label`` in (its label is in token.object)."""
        for candidate in (self.directory / "tokens").iterdir():
            marker = candidate / "token.object"
            if marker.exists() and label.encode() in marker.read_bytes():
                return candidate
        raise LookupError(label)


def make_hsm(directory: Path) -> Hsm | None:
    """A token directory under ``directory``; SOFTHSM2_CONF names it for this process and
    its children from now on. None when SoftHSM2 is not installed."""
    module = softhsm_module()
    if module is None:
        return None
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return Hsm(directory, conf, module)
