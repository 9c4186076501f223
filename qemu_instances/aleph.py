"""Resolve an aleph.im item hash (a STORE message) to its file URL and sha256, as the aleph VM supervisor does."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from qemu_instances.digests import Algorithm, Digest
from qemu_instances.errors import ImageError, UsageError

if TYPE_CHECKING:
    import requests

    from qemu_instances.download import RetryPolicy

_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AlephFile:
    item_hash: str  # the STORE message's hash
    url: str  # where the raw bytes are served
    digest: Digest  # sha256 of the raw bytes (the message's content.item_hash)


def validate_item_hash(item_hash: str) -> str:
    item_hash = item_hash.strip().lower()
    if not _HASH.fullmatch(item_hash):
        raise UsageError(f"invalid aleph item hash {item_hash!r}: expected 64 hex digits")
    return item_hash


def resolve(item_hash: str, *, api: str, session: requests.Session, policy: RetryPolicy | None = None) -> AlephFile:
    """Fetch the STORE message for item_hash and return its file; ipfs items are refused for now."""
    from qemu_instances.download import RetryPolicy, fetch_bytes

    item_hash = validate_item_hash(item_hash)
    api = api.rstrip("/")
    url = f"{api}/api/v0/messages.json?hashes={quote(item_hash)}"
    try:
        messages = json.loads(fetch_bytes(url, session=session, policy=policy or RetryPolicy()))["messages"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"unexpected answer from the aleph API at {url}") from exc
    if not isinstance(messages, list):
        raise ImageError(f"unexpected answer from the aleph API at {url}: 'messages' is not a list")
    # Take only the message we asked for: an API that ignored the filter must not hand us some other file.
    message = next((m for m in messages if isinstance(m, dict) and m.get("item_hash") == item_hash), None)
    if message is None:
        raise ImageError(f"aleph item {item_hash} not found at {api}")
    if message.get("type") != "STORE":
        raise ImageError(
            f"aleph item {item_hash} is a {message.get('type')} message, not a STORE message (a stored file)"
        )
    content = message.get("content")
    if not isinstance(content, dict):
        content = {}
    file_hash, item_type = content.get("item_hash"), content.get("item_type")
    if item_type == "ipfs":
        raise ImageError(
            f"aleph item {item_hash} is stored on IPFS (CID {file_hash}); qinst does not fetch IPFS items yet",
            hint="use --source upstream, or a catalog entry with a url and digest",
        )
    if item_type != "storage" or not isinstance(file_hash, str) or not _HASH.fullmatch(file_hash):
        raise ImageError(f"aleph item {item_hash} has an unsupported content: item_type={item_type!r}")
    return AlephFile(
        item_hash=item_hash,
        url=f"{api}/api/v0/storage/raw/{file_hash}",
        digest=Digest(Algorithm.SHA256, file_hash),
    )
