"""devicegate's control plane: CA, tokens, registry, enrollment, revocation, audit, CLI."""
