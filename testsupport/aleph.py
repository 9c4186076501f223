"""A faithful double of the aleph.im API and of an IPFS gateway, shared by the tests and the benchmarks.

What it keeps from the real thing (pyaleph, aleph-message): a message's hash is sha256(item_content) and the
message's content exists only inside item_content (the parsed `content` copy beside it is what the API adds, and
a test may make it lie); `GET /api/v0/messages.json?hashes=H` lists only processed messages; `GET
/api/v0/messages/H` tells processed / forgotten (forgotten_by) / rejected (error_code, details) / pending;
`/api/v0/storage/raw/H` ignores Range (Accept-Ranges: none) and answers 413 above a size (nodes before pyaleph
0.10.0: 100 MiB); a gateway serves `/ipfs/<cid>` and honours Range.

Documents are plain (target, body) pairs, so a benchmark can write them into a directory served by another server;
AlephDouble registers them on a tests/httpserver.py server (anything with add(), add_json() and fault()).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from qemu_instances.cid import parse
from qemu_instances.unixfs import cid_of

SENDER = "0x" + "ab" * 20
# Any CID of each version: cid_of() takes only the version and codec from it (Kubo's defaults for that version).
CIDV0 = parse("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH")
CIDV1 = parse("bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2y")


class Server(Protocol):
    def add(self, target: str, body: bytes, content_type: str = ..., **headers: str) -> str: ...

    def add_json(self, target: str, data: Any) -> str: ...

    def fault(self, target: str, **kwargs: Any) -> Any: ...


def file_cid(data: bytes, version: int) -> str:
    """The CID `ipfs add` (Kubo's defaults; --cid-version=1 for version 1) gives data."""
    return str(cid_of(data, CIDV1 if version == 1 else CIDV0))


def store_content(file_hash: str, item_type: str, **extra: Any) -> dict[str, Any]:
    """The content of a STORE message (aleph_message.models.StoreContent)."""
    return {"address": SENDER, "time": 1700000000.0, "item_type": item_type, "item_hash": file_hash, **extra}


def inline_message(content: dict[str, Any], *, type: str = "STORE", item_content: str | None = None) -> dict[str, Any]:
    """A message as the API returns it: item_hash = sha256(item_content); `content` is the API's parsed copy."""
    text = item_content if item_content is not None else json.dumps(content, separators=(",", ":"))
    return {
        "item_hash": hashlib.sha256(text.encode()).hexdigest(),
        "type": type,
        "chain": "ETH",
        "sender": SENDER,
        "channel": "TEST",
        "item_type": "inline",
        "item_content": text,
        "content": content,
        "confirmed": False,
        "signature": "0x" + "00" * 65,
        "time": 1700000000.0,
    }


def messages_target(item_hash: str) -> str:
    return f"/api/v0/messages.json?hashes={item_hash}"


def status_target(item_hash: str) -> str:
    return f"/api/v0/messages/{item_hash}"


def raw_target(file_hash: str) -> str:
    return f"/api/v0/storage/raw/{file_hash}"


def gateway_target(cid: str) -> str:
    return f"/ipfs/{cid}"


def listing(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "messages": messages,
        "pagination_page": 1,
        "pagination_per_page": 20,
        "pagination_total": len(messages),
        "pagination_item": "messages",
    }


def message_documents(message: dict[str, Any], *, item_hash: str | None = None) -> dict[str, Any]:
    """The API's answers about a processed message (JSON data by target); item_hash overrides the listed one."""
    item_hash = item_hash or message["item_hash"]
    return {
        messages_target(item_hash): listing([message]),
        status_target(item_hash): {"status": "processed", "item_hash": item_hash, "message": message},
    }


class AlephDouble:
    """The aleph API (and, at /ipfs/, a gateway) on a test HTTP server."""

    def __init__(self, server: Server, *, raw_limit: int | None = None) -> None:
        self.server = server
        self.raw_limit = raw_limit  # storage/raw answers 413 for files above this size

    def add_raw(self, file_hash: str, data: bytes) -> None:
        target = raw_target(file_hash)
        self.server.add(target, data, Accept_Ranges="none")
        if self.raw_limit is not None and len(data) > self.raw_limit:
            self.server.fault(target, fail_times=1 << 30, fail_status=413)
        else:
            self.server.fault(target, ignore_range=True)

    def add_gateway(self, cid: str, data: bytes) -> None:
        self.server.add(gateway_target(cid), data)

    def add_message(self, message: dict[str, Any], *, item_hash: str | None = None) -> str:
        docs = message_documents(message, item_hash=item_hash)
        for target, data in docs.items():
            self.server.add_json(target, data)
        return item_hash or str(message["item_hash"])

    def store(
        self, data: bytes, *, item_type: str = "storage", version: int = 0, raw: bool = True, gateway: bool = True
    ) -> tuple[str, str]:
        """Store data as aleph would and publish an inline STORE message for it: (message hash, file hash)."""
        if item_type == "storage":
            file_hash = hashlib.sha256(data).hexdigest()
            self.add_raw(file_hash, data)
        else:
            file_hash = file_cid(data, version)
            if raw:
                self.add_raw(file_hash, data)
            if gateway:
                self.add_gateway(file_hash, data)
        return self.add_message(inline_message(store_content(file_hash, item_type))), file_hash

    def status(self, item_hash: str, answer: dict[str, Any]) -> None:
        """A message that messages.json does not list, with its status answer."""
        self.server.add_json(messages_target(item_hash), listing([]))
        self.server.add_json(status_target(item_hash), {"item_hash": item_hash, **answer})

    def forgotten(self, item_hash: str, by: str) -> None:
        self.status(item_hash, {"status": "forgotten", "forgotten_by": [by], "reception_time": "2026-01-01T00:00:00"})

    def pending(self, item_hash: str) -> None:
        self.status(item_hash, {"status": "pending", "messages": [], "reception_time": "2026-01-01T00:00:00"})

    def rejected(self, item_hash: str, details: str) -> None:
        self.status(item_hash, {"status": "rejected", "error_code": 4, "details": details})

    def unknown(self, item_hash: str) -> None:
        """Nothing known: messages.json lists nothing, messages/H is a 404 (the server's default)."""
        self.server.add_json(messages_target(item_hash), listing([]))
