"""eDRV webhook bodies: signature verification and envelope parsing (pure: no I/O, time passed in).

The reference leaves eDRV's signed string open, so every known form is accepted: `sha256=<hex>` over the
body (older docs), and `t=<ts>,v1=<hex>` (newer docs) with t in seconds or milliseconds over `{t}.{body}` or
over the body alone. Hex compares case-insensitively; stale timestamps are refused against replay.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

MAX_SKEW_S = 300.0
# Forms that sign the body alone, with no timestamp: a captured webhook verifies for ever. The receiver
# refuses one whose envelope is older than its duplicate check reaches (see too_old_to_tell).
BODY_ONLY = frozenset({"sha256 over body", "sha256 over escaped body", "v1 over body"})


class BadWebhook(ValueError):
    """Malformed or wrongly signed: answered 4xx and logged in one line."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    id: str
    object: str
    type: str
    data: dict[str, Any]
    created_at: datetime | None


def _hmac(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def _escaped(body: bytes) -> bytes | None:
    """The older docs sign the escaped-unicode form of the payload (ë -> \\u00eb)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    escaped = text.encode("ascii", "backslashreplace").decode().replace("\\x", "\\u00")
    return escaped.encode() if escaped != text else None


def verify(header: str | None, body: bytes, secret: str, now: float) -> str:
    """Returns which variant matched; raises BadWebhook(401) otherwise."""
    if not header:
        raise BadWebhook(401, "missing edrv-signature header")
    header = header.strip()
    if header.lower().startswith("sha256="):
        given = header[7:].strip().lower()
        for name, payload in (("sha256 over body", body), ("sha256 over escaped body", _escaped(body))):
            if payload is not None and hmac.compare_digest(given, _hmac(secret, payload)):
                return name
        raise BadWebhook(401, "edrv-signature sha256 does not match")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key.strip(), []).append(value.strip().lower())
    if "t" not in parts or "v1" not in parts:
        raise BadWebhook(401, "edrv-signature is neither sha256=<hex> nor t=...,v1=...")
    t = parts["t"][0]
    try:
        ts = float(t)
    except ValueError:
        raise BadWebhook(401, "edrv-signature timestamp is not a number") from None
    seconds = ts / 1000.0 if ts > 1e11 else ts  # milliseconds since the epoch are 13 digits
    if abs(now - seconds) > MAX_SKEW_S:
        raise BadWebhook(401, f"edrv-signature timestamp is stale ({now - seconds:.0f} s off)")
    for name, payload in ((f"v1 over t.body ({'ms' if ts > 1e11 else 's'})", t.encode() + b"." + body),
                          ("v1 over body", body)):
        expected = _hmac(secret, payload)
        if any(hmac.compare_digest(sig, expected) for sig in parts["v1"]):
            return name
    raise BadWebhook(401, "edrv-signature v1 does not match")


def too_old_to_tell(variant: str | None, created_at: datetime | None, now: datetime, dedup_s: float) -> None:
    """A webhook signed over its body alone can be replayed; within dedup_s its _id still marks it as seen,
    beyond that nothing could tell a replay apart: refused (401). Without createdAt only the _id guards."""
    if variant not in BODY_ONLY or created_at is None:
        return
    age_s = (now - created_at).total_seconds()
    if age_s > dedup_s:
        raise BadWebhook(401, f"signed without a timestamp and created {age_s / 86400:.1f} days ago, beyond the "
                              f"{dedup_s / 86400:g} days in which a replay would be recognised")


# A JSON-escaped NUL (an odd number of backslashes before u0000): PostgreSQL text cannot hold it, and no
# real eDRV id or status contains one.
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def parse(body: bytes) -> Envelope:
    if _ESCAPED_NUL.search(body):
        raise BadWebhook(400, "body contains a NUL character")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadWebhook(400, f"body is not JSON ({exc.__class__.__name__})") from None
    except RecursionError:  # a hostile body nested thousands deep
        raise BadWebhook(400, "body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadWebhook(400, "body is not a JSON object")
    wid, wtype, data = obj.get("_id"), obj.get("type"), obj.get("data")
    if isinstance(data, str):  # documented as "string" once; accept an embedded JSON document
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, RecursionError):
            raise BadWebhook(400, "data is a string but not JSON") from None
    if not isinstance(wid, str) or not wid or not isinstance(wtype, str) or not wtype:
        raise BadWebhook(400, "envelope lacks _id or type")
    if not isinstance(data, dict):
        raise BadWebhook(400, f"{wtype}: data is not an object")
    created = None
    if isinstance(obj.get("createdAt"), str):
        try:
            created = datetime.fromisoformat(obj["createdAt"].replace("Z", "+00:00"))
            created = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
        except ValueError:
            created = None
    return Envelope(wid, str(obj.get("object") or ""), wtype, data, created)


def action_status(webhook_type: str) -> str | None:
    """CONTRACT.md's action statuses for both namings: .accepted/.completed and .rejected/.failed."""
    suffix = webhook_type.rsplit(".", 1)[-1]
    return {"accepted": "accepted", "completed": "accepted", "rejected": "rejected", "failed": "rejected",
            "requested": "requested"}.get(suffix)
