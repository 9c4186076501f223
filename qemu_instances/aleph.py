"""Resolve an aleph.im item hash (a STORE message) to its file: where its bytes are served and the pin they must match.

Neither the aleph API nor aleph-vm verifies anything for us: the API may return any JSON, and aleph-vm trusts it.
qinst verifies the chain itself. The hash asked for pins the message: sha256(item_content) for an inline message
(or the CID of the stored content for a message kept in storage or on IPFS, fetched and recomputed the same way).
Only that verified item_content is read: its item_type and item_hash pin the file's bytes, a sha256 for `storage`
items and an IPFS CID for `ipfs` items (recomputed while downloading, qemu_instances/unixfs.py). The fields the API
adds beside it (`content`, `confirmed`, ...) are never used.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from qemu_instances import cid as cids
from qemu_instances.digests import Algorithm, Digest
from qemu_instances.errors import DownloadError, ImageError, UsageError

if TYPE_CHECKING:
    import requests

    from qemu_instances.download import RetryPolicy

_HASH = re.compile(r"[0-9a-f]{64}")
_MESSAGE_LIMIT = 1 << 20  # a STORE message's content is a few hundred bytes


@dataclass(frozen=True)
class AlephFile:
    item_hash: str  # the STORE message's hash
    item_type: str  # "storage" (bytes named by their sha256) or "ipfs" (named by a CID)
    urls: tuple[str, ...]  # where the bytes are served, tried in order on 404/413: storage/raw, then the gateway
    digest: Digest  # the file's pin from the verified message: sha256 or CID

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def source(self) -> str:
        return f"aleph-{self.item_type}"


def validate_item_hash(item_hash: str) -> str:
    """A message hash: 64 hex digits (sha256), or a CID (Qm..., bafy...) in its canonical text."""
    text = item_hash.strip()
    if _HASH.fullmatch(text.lower()):
        return text.lower()
    try:
        return str(cids.parse(text))
    except ImageError as exc:
        raise UsageError(
            f"invalid aleph item hash {item_hash[:80]!r}: expected 64 hex digits or a CID (Qm..., bafy...)"
        ) from exc


def check_base_url(url: str, what: str) -> str:
    """The aleph API and IPFS gateway are reached over https; plain http only on loopback (tests, local nodes)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return url.rstrip("/")
    if parts.scheme == "http" and _loopback(host):
        return url.rstrip("/")
    raise UsageError(f"{what} {url!r} must be an https:// URL (plain http only on a loopback host)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(data: bytes, url: str) -> Any:
    from qemu_instances.files import parse_json

    return parse_json(data, f"unexpected answer from the aleph API at {url}", ImageError)


def _hash_of(data: bytes, like: str) -> str:
    """data's hash in the kind of `like`: sha256 hex, or the CID imported with the defaults `like` implies."""
    if _HASH.fullmatch(like):
        return hashlib.sha256(data).hexdigest()
    from qemu_instances.unixfs import cid_of

    return str(cid_of(data, cids.parse(like)))


class _Resolver:
    def __init__(self, api: str, gateway: str, session: requests.Session, policy: RetryPolicy) -> None:
        self.api, self.gateway, self.session, self.policy = api, gateway, session, policy

    def get(self, url: str) -> bytes:
        from qemu_instances.download import fetch_bytes

        return fetch_bytes(url, session=self.session, policy=self.policy, limit=_MESSAGE_LIMIT)

    def message(self, item_hash: str) -> dict[str, Any]:
        """The processed message, from messages.json; or the reason why there is none."""
        url = f"{self.api}/api/v0/messages.json?hashes={quote(item_hash)}"
        messages = _json(self.get(url), url)
        messages = messages.get("messages") if isinstance(messages, dict) else None
        if not isinstance(messages, list):
            raise ImageError(f"unexpected answer from the aleph API at {url}: no list of messages")
        # Take only the message we asked for: an API that ignored the filter must not hand us some other file.
        found = next((m for m in messages if isinstance(m, dict) and m.get("item_hash") == item_hash), None)
        return found if found is not None else self.status(item_hash)

    def status(self, item_hash: str) -> dict[str, Any]:
        url = f"{self.api}/api/v0/messages/{quote(item_hash)}"
        try:
            answer = _json(self.get(url), url)
        except DownloadError as exc:
            if exc.status == 404:
                raise ImageError(f"aleph message {item_hash} not found at {self.api}") from exc
            raise
        status = answer.get("status") if isinstance(answer, dict) else None
        message = answer.get("message") if isinstance(answer, dict) else None
        if status == "processed" and isinstance(message, dict) and message.get("item_hash") == item_hash:
            return message
        if status == "forgotten":
            by = answer.get("forgotten_by")
            by_text = ", ".join(map(str, by)) if isinstance(by, list) and by else "an unnamed message"
            raise ImageError(f"aleph message {item_hash} was forgotten (its content deleted) by FORGET {by_text}")
        if status == "rejected":
            reason = answer.get("reason") or answer.get("details") or answer.get("error_code") or "no reason given"
            raise ImageError(f"aleph message {item_hash} was rejected by the network: {str(reason)[:200]}")
        if status == "pending":
            raise ImageError(
                f"aleph message {item_hash} is pending (received, not processed yet)", hint="try again later"
            )
        raise ImageError(f"aleph message {item_hash} not found at {self.api} (status {str(status)[:40]!r})")

    def item_content(self, item_hash: str, message: dict[str, Any]) -> dict[str, Any]:
        """The message's content, verified against item_hash: inline, or fetched from where it is stored."""
        text = message.get("item_content")
        if isinstance(text, str):
            data = text.encode("utf-8")
            where = "its item_content"
        else:
            data = self.stored(item_hash)
            where = "its stored content"
        actual = _hash_of(data, item_hash)
        if actual != item_hash:
            raise ImageError(f"aleph message {item_hash} does not match its hash: {where} hashes to {actual}")
        content = _json(data, f"{self.api} (message {item_hash})")
        if not isinstance(content, dict):
            raise ImageError(f"aleph message {item_hash}: its content is not a JSON object")
        return content

    def stored(self, item_hash: str) -> bytes:
        """A non-inline message's content: from the API's storage, else (a CID) from the IPFS gateway."""
        urls = [f"{self.api}/api/v0/storage/raw/{item_hash}"]
        if not _HASH.fullmatch(item_hash):
            urls.append(f"{self.gateway}/ipfs/{item_hash}")
        for url in urls[:-1]:
            try:
                return self.get(url)
            except DownloadError as exc:
                if exc.status not in (404, 413):
                    raise
        return self.get(urls[-1])


def resolve(
    item_hash: str,
    *,
    api: str,
    session: requests.Session,
    policy: RetryPolicy | None = None,
    gateway: str | None = None,
) -> AlephFile:
    """Fetch and verify the STORE message item_hash; return its file's URLs and pin."""
    from qemu_instances.download import RetryPolicy
    from qemu_instances.settings import DEFAULT_IPFS_GATEWAY

    item_hash = validate_item_hash(item_hash)
    api = check_base_url(api, "the aleph API")
    gateway = check_base_url(gateway or DEFAULT_IPFS_GATEWAY, "the IPFS gateway")
    resolver = _Resolver(api, gateway, session, policy or RetryPolicy())
    message = resolver.message(item_hash)
    if message.get("type") != "STORE":
        raise ImageError(
            f"aleph message {item_hash} is a {str(message.get('type'))[:20]} message, not a STORE (a file)"
        )
    content = resolver.item_content(item_hash, message)
    # The envelope's `type` is not covered by the hash: the verified content must have a STORE's shape too.
    item_type, file_hash = content.get("item_type"), content.get("item_hash")
    if "type" in content or item_type not in ("storage", "ipfs") or not isinstance(file_hash, str):
        raise ImageError(f"aleph message {item_hash} is not a STORE: its content names no stored file")
    if item_type == "storage":
        if not _HASH.fullmatch(file_hash):
            raise ImageError(f"aleph message {item_hash}: storage item_hash {file_hash[:80]!r} is not a sha256")
        return AlephFile(
            item_hash, item_type, (f"{api}/api/v0/storage/raw/{file_hash}",), Digest(Algorithm.SHA256, file_hash)
        )
    cid = cids.parse(file_hash)  # ImageError (exit 3) when malformed
    cid.require_recomputable()  # fail closed before any byte is downloaded
    return AlephFile(
        item_hash,
        item_type,
        (f"{api}/api/v0/storage/raw/{cid}", f"{gateway}/ipfs/{cid}"),
        Digest(Algorithm.CID, str(cid)),
    )
