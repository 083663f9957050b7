"""Where SMS may go and how they are signed: checked when the dispatcher starts, and the
target's addresses again on every new connection.

A wrong N8N_OUTBOUND_WEBHOOK_URL would hand contractors' phone numbers and messages to whatever
answers there, so a target that is not a public https endpoint stops the service, unless
WEBHOOK_ALLOW_INSECURE=true says this is local development (a local n8n on localhost:5678). A
name that resolves elsewhere later (DNS rebinding to a private address) is refused when the
connection is made: `CheckedResolver` resolves the host itself, checks what it got with the
same rules and connects to the address it checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc

from shared.errors import ConfigurationError
from shared.logging import get_logger

log = get_logger("followups.webhook_target")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Iterable[str]]
AsyncResolver = Callable[[str, int], Awaitable[list[str]]]

SECRET_PREFIX = "whsec_"  # noqa: S105 (a format marker, not a secret)
# Standard Webhooks asks for keys of 24 to 64 random bytes.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64

_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
CONNECT_TIMEOUT_SECONDS = 5.0
_LOCAL_ONLY = "set WEBHOOK_ALLOW_INSECURE=true only for a local development target"


def resolve_host(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigurationError(
            f"N8N_OUTBOUND_WEBHOOK_URL: host {host!r} does not resolve ({exc}); "
            "check the host name and this machine's DNS"
        ) from None
    return [str(info[4][0]) for info in infos]


def refusal(address: IPAddress) -> str | None:
    """Why an SMS must not go to this address, or None when it is publicly routable."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 reaches the IPv4 host: judge that one.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return refusal(embedded)
    checks = (
        (address in _METADATA, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in _CGNAT, "a carrier-grade NAT address (100.64.0.0/10)"),
        (address.is_private, "a private address"),
        (address.is_reserved or not address.is_global, "a reserved, non-public address"),
    )
    return next((reason for refused, reason in checks if refused), None)


def _addresses(host: str, port: int, resolve: Resolver) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found = [ipaddress.ip_address(address) for address in resolve(host, port)]
    if not found:
        raise ConfigurationError(f"N8N_OUTBOUND_WEBHOOK_URL: host {host!r} has no address")
    return found


def check_webhook_target(
    url: str, *, allow_insecure: bool, proxied: bool = False, resolve: Resolver = resolve_host
) -> None:
    """Raise ConfigurationError, saying what to fix, unless `url` is a fit SMS webhook target.

    Every address the host resolves to must be public: one private answer is enough for a
    request to land inside the network. Behind a proxy (`proxied`) the host may resolve only
    there, so a name this machine cannot resolve is left to the proxy. The URL itself is never
    echoed (it may hold a token).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"N8N_OUTBOUND_WEBHOOK_URL is not a valid URL ({exc})") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            "N8N_OUTBOUND_WEBHOOK_URL must not carry credentials (user:password@host); remove "
            "them and let the receiver verify WEBHOOK_SIGNING_SECRET signatures instead"
        )
    if parts.scheme not in ("https", "http"):
        raise ConfigurationError(
            f"N8N_OUTBOUND_WEBHOOK_URL must start with https:// (got scheme {parts.scheme!r})"
        )
    host = parts.hostname
    if not host:
        raise ConfigurationError("N8N_OUTBOUND_WEBHOOK_URL has no host; write https://host/path")
    if allow_insecure:
        return
    if parts.scheme == "http":
        raise ConfigurationError(
            "N8N_OUTBOUND_WEBHOOK_URL must use https: SMS carry phone numbers; " + _LOCAL_ONLY
        )
    try:
        addresses = _addresses(host, port or 443, resolve)
    except ConfigurationError:
        if not proxied:
            raise
        log.warning("webhook host does not resolve here; the proxy will resolve it")
        return
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise ConfigurationError(
                f"N8N_OUTBOUND_WEBHOOK_URL: host {host!r} is {address}, {reason}; "
                f"use a public https endpoint, or {_LOCAL_ONLY}"
            )


def check_signing_secret(secret: str) -> None:
    """The secret must be `whsec_` and base64 of 24-64 random bytes, as Standard Webhooks asks;
    anything else would sign with a key the receiver cannot reproduce, or a weak one."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    how = (
        f"WEBHOOK_SIGNING_SECRET must be {SECRET_PREFIX} followed by the base64 of "
        f"{MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} random bytes, "
        f"for example {SECRET_PREFIX}$(openssl rand -base64 32)"
    )
    if not secret.strip().startswith(SECRET_PREFIX):
        raise ConfigurationError(f"{how}; the {SECRET_PREFIX} prefix is missing")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ConfigurationError(f"{how}; the part after {SECRET_PREFIX} is not base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ConfigurationError(f"{how}; this one decodes to {len(key)} bytes")


async def resolve_async(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class WebhookHostRefused(OSError):
    """The webhook host resolves to an address SMS must not go to (or to none)."""


class CheckedResolver(aiohttp.abc.AbstractResolver):
    """The resolver of the webhook's connection pool, asked for each new connection (the pool
    keeps no DNS cache). It resolves the host, refuses it unless every address is public (the
    rules of `check_webhook_target`; with `allow_insecure` any address goes) and hands the pool
    only the addresses it checked, so a second lookup can't answer differently. TLS still names
    the host (SNI and certificate), and so does the Host header. An address written in the URL
    is judged once at start: it cannot change."""

    def __init__(self, *, allow_insecure: bool, resolve: AsyncResolver = resolve_async) -> None:
        self._allow_insecure = allow_insecure
        self._resolve = resolve

    async def checked(self, host: str, port: int) -> list[IPAddress]:
        try:
            addresses = [ipaddress.ip_address(a) for a in await self._resolve(host, port)]
        except (OSError, UnicodeError, ValueError) as exc:
            raise WebhookHostRefused(f"webhook host does not resolve ({exc})") from None
        if not addresses:
            raise WebhookHostRefused("webhook host has no address")
        if not self._allow_insecure:
            for address in addresses:
                reason = refusal(address)
                if reason is not None:
                    log.error("webhook host now resolves to a refused address", reason=reason)
                    raise WebhookHostRefused(f"webhook host resolves to {reason}")
        return addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in await self.checked(host.rstrip("."), port)
        ]

    async def close(self) -> None:
        return None


def webhook_session(
    *,
    allow_insecure: bool,
    max_connections: int,
    proxy: str | None,
    timeout_seconds: float,
    resolver: CheckedResolver | None = None,
) -> aiohttp.ClientSession:
    """The webhook's connection pool (call it inside the event loop): direct, with every
    connection's addresses checked, or through `proxy`. Through a proxy, the proxy resolves the
    webhook host and connects to it, so the per-connection check cannot see those addresses: the
    start-up check still judges what the host resolves to here, and the proxy's own egress rules
    guard the rest.

    aiohttp rather than httpx: its C HTTP parser costs a tenth of the CPU per call of httpx's
    transport, and the call is on every send's critical path. Waiting for a free connection and
    each read are bounded by `timeout_seconds`, the connect by CONNECT_TIMEOUT_SECONDS, the whole
    call by twice `timeout_seconds` (so a server trickling its answer cannot hold a call for
    longer than the claim's lease)."""
    if proxy is None:
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            use_dns_cache=False,
            resolver=resolver or CheckedResolver(allow_insecure=allow_insecure),
        )
    else:
        connector = aiohttp.TCPConnector(limit=max_connections)
    return aiohttp.ClientSession(
        connector=connector,
        proxy=proxy,
        timeout=aiohttp.ClientTimeout(
            total=timeout_seconds * 2,
            connect=timeout_seconds,
            sock_connect=CONNECT_TIMEOUT_SECONDS,
            sock_read=timeout_seconds,
        ),
        # The outcome depends on the status alone: a compressed body is never inflated.
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
