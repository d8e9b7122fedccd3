from typing import Any

def encode(
    values: dict[str, Any], chain_id: str, seq: int, prev_digest: bytes, /
) -> tuple[bytes, bytes, tuple[Any, ...]] | None: ...
