"""The topic policy: statements compiled per device, pure decisions (docs/policy.md).

`engine` compiles and decides, `load` reads files, `explain` says why. Nothing here does
I/O on the packet path; `load_policy` reads a file when asked.

Imports: ``schemas`` and ``gateway.mqtt`` (the one topic matcher) only, so the policy
command (``provisioning.commands.policy``) may import this package and nothing else of
the gateway.
"""

from __future__ import annotations

from gateway.policy.engine import (
    ALLOWED,
    DEFAULT_DENY,
    DENIED,
    CompiledPolicy,
    CompiledStatement,
    Decision,
    PolicyError,
    PolicySet,
    Subject,
    compile_for,
    expand_resource,
    upstream_client_id,
)
from gateway.policy.explain import Explanation, explain
from gateway.policy.load import decode_policy, load_policy
from schemas.policy import Action, Effect

__all__ = [
    "ALLOWED",
    "DEFAULT_DENY",
    "DENIED",
    "Action",
    "CompiledPolicy",
    "CompiledStatement",
    "Decision",
    "Effect",
    "Explanation",
    "PolicyError",
    "PolicySet",
    "Subject",
    "compile_for",
    "decode_policy",
    "expand_resource",
    "explain",
    "load_policy",
    "upstream_client_id",
]
