"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

The signature is ``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")), computed by the
``standardwebhooks`` package itself so sender and receivers agree byte for byte. During a secret
rotation several secrets are active: the header then carries one ``v1,...`` per secret, separated by
spaces, and a receiver that knows any one of them accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets as _secrets
from datetime import datetime, timezone

from standardwebhooks import Webhook

from sdfleet.errors import ConfigError

SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for 24 to 64 random bytes: a shorter key can be found from one delivery by trying.
MIN_SECRET_BYTES = 24


def new_secret(nbytes: int = 32) -> str:
    """A fresh signing secret, ``whsec_`` + base64 of ``nbytes`` random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def parse_secrets(text: str | None, *, name: str = "SDFLEET_WEBHOOK_SECRET") -> list[str]:
    """Split a space- or comma-separated list of ``whsec_`` secrets; ConfigError naming ``name`` if one is bad.

    The order is kept (the first one is the newest by convention); duplicates are dropped.
    """
    if not text:
        return []
    out: list[str] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        # Never echo the secret itself in the error: only where it sits in the list.
        if not _valid(item):
            raise ConfigError(f"{name}: item {len(out) + 1} is not whsec_<base64>; "
                              "generate one with 'sdfleet webhooks new-secret'")
        if secret_bytes(item) < MIN_SECRET_BYTES:
            raise ConfigError(f"{name}: item {len(out) + 1} is {secret_bytes(item)} bytes, fewer than the "
                              f"{MIN_SECRET_BYTES} Standard Webhooks asks for; generate one with "
                              "'sdfleet webhooks new-secret'")
        if item not in out:
            out.append(item)
    return out


def _valid(item: str) -> bool:
    if not item.startswith(SECRET_PREFIX):
        return False
    body = item[len(SECRET_PREFIX):]
    try:
        return bool(base64.b64decode(body + "=" * (-len(body) % 4), validate=True))
    except (binascii.Error, ValueError):
        return False


def secret_bytes(item: str) -> int:
    """How many key bytes a valid ``whsec_`` secret holds."""
    body = item[len(SECRET_PREFIX):]
    return len(base64.b64decode(body + "=" * (-len(body) % 4)))


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space separated."""
    when = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return " ".join(Webhook(s).sign(msg_id, when, body) for s in secrets)


def signed_headers(secrets: list[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """Every header of one delivery attempt (the timestamp is the attempt's, the id the event's)."""
    return {
        "content-type": "application/json",
        "user-agent": "sdfleet-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature_header(secrets, msg_id, int(timestamp), body),
    }
