"""Where webhooks may go: http(s) only, and never to internal addresses unless allowed.

A webhook URL is chosen by whoever submits jobs, so without this check the sender could be pointed at
the cloud metadata service, Redis, or anything else on the private network (SSRF). The URL is checked
when it is submitted and again right before each send; at send time the connection is pinned to the
address that passed the check, so a DNS answer that changes in between (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from sdfleet.errors import WebhookError

SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to call the host (Host header, TLS SNI)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    path: str

    @property
    def pinned_url(self) -> str:
        """The URL with the host replaced by the checked address (the connection goes exactly there)."""
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): the last 32 bits are the IPv4 address reached.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a translation or tunnel form, if it is one.

    IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4 (2002:AABB:CCDD::/16), Teredo
    (2001::/32, client address inverted in the last 32 bits) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48).
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = int(ip)
    if any(ip in net for net in _NAT64) or (packed >> 32 == 0 and packed > 1):
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    return None


def refused_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is.

    An IPv6 address that embeds an IPv4 one is judged by both: 6to4 for 127.0.0.1 reaches 127.0.0.1.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            reason = refused_reason(inner)
            if reason:
                return f"{reason} (embedded in {ip})"
            if ip.ipv4_mapped is not None:
                return None
    for attr, what in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                       ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                       ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return what
    if not ip.is_global:
        return "not globally routable"
    return None


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an http(s) URL; WebhookError naming the problem otherwise."""
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        raise WebhookError(f"webhook URL {str(url)[:80]!r} is empty or contains whitespace; use http(s)://host/path")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookError(f"webhook URL {url[:80]!r} is malformed ({exc}); use http(s)://host/path") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookError(f"webhook URL {url[:80]!r}: scheme {scheme or '(none)'!r} is not allowed; "
                           "use an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookError(f"webhook URL {url[:80]!r} has no host; use http(s)://host/path")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check(ip: IPAddress, url: str, host: str) -> None:
    reason = refused_reason(ip)
    if reason:
        via = "" if host == str(ip) else f" ({host} resolves to {ip})"
        article = "an" if reason[0] in "aeiou" else "a"
        raise WebhookError(f"webhook URL {url[:80]!r} points to {article} {reason} address{via}; webhooks go only to "
                           "public addresses unless SDFLEET_WEBHOOK_ALLOW_PRIVATE=1")


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (socket.gaierror when it does not resolve)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        if addr not in seen:
            seen.append(addr)
    return seen


def check_url(url: str, *, allow_private: bool = False, resolve_host: bool = True) -> None:
    """Submit-time check: refuse what is known to be bad. A name that does not resolve now is let through
    (it is checked again, and must resolve, when the webhook is sent)."""
    scheme, host, port, _ = split_url(url)
    if allow_private:
        return
    ip = _literal(host)
    if ip is not None:
        _check(ip, url, host)
        return
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        raise WebhookError(f"webhook URL {url[:80]!r} points to a loopback address (localhost); webhooks go only "
                           "to public addresses unless SDFLEET_WEBHOOK_ALLOW_PRIVATE=1")
    if not resolve_host:
        return
    try:
        addresses = resolve(host, port)
    except (socket.gaierror, UnicodeError, OSError):
        return
    for addr in addresses:
        _check(ipaddress.ip_address(addr), url, host)


def target_for(url: str, *, allow_private: bool = False) -> Target:
    """Send-time check: resolve ``url`` and return the address to connect to.

    Every address the name resolves to must pass (an attacker's DNS could otherwise answer with one good
    and one internal address). Raises WebhookError for a refused URL, socket.gaierror when the name does
    not resolve (worth retrying later).
    """
    scheme, host, port, path = split_url(url)
    ip = _literal(host)
    addresses = [str(ip)] if ip is not None else resolve(host, port)
    if not addresses:
        raise socket.gaierror(f"{host} has no addresses")
    if not allow_private:
        for addr in addresses:
            _check(ipaddress.ip_address(addr), url, host)
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0], path=path)
