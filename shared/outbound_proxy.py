"""Which HTTP proxy, if any, the SMS webhook is reached through: HTTPS_PROXY for an https
target, HTTP_PROXY for a development http one, unless NO_PROXY names the host.

The variables are read as settings (environment or `.env`), as curl and most HTTP clients read
them: upper or lower case, NO_PROXY a comma-separated list of host names (a name also covers its
subdomains; a leading dot or `*.` means the same), IP addresses, CIDR networks, each with an
optional `:port`, or `*` for every host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import ConfigurationError
from shared.settings import Settings

_PROXY_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class _Exemption:
    host: str
    port: int | None

    def covers(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return host == self.host or host.endswith("." + self.host)


def _exemption(entry: str) -> _Exemption:
    text = entry.strip().lower().removeprefix("*").lstrip(".") or "*"
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
        return _Exemption(address, int(port) if port.isdigit() else None)
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return _Exemption(host, int(port))
    return _Exemption(text, None)


def exempt(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY says `host:port` is reached directly."""
    entries = (_exemption(entry) for entry in no_proxy.split(",") if entry.strip())
    name = host.lower().strip("[]").rstrip(".")
    return any(entry.covers(name, port) for entry in entries)


def proxy_for(
    url: str, *, https_proxy: str | None, http_proxy: str | None, no_proxy: str
) -> str | None:
    """The proxy URL to reach `url` through, or None to connect directly.

    Raises ConfigurationError, without echoing the proxy URL (it may carry a password), when the
    chosen proxy is not an http(s) URL with a host: a SOCKS proxy needs a package this service
    does not ship."""
    parts = urlsplit(url)
    chosen = https_proxy if parts.scheme == "https" else http_proxy
    if not chosen or not chosen.strip():
        return None
    host = parts.hostname or ""
    if exempt(host, parts.port or (443 if parts.scheme == "https" else 80), no_proxy):
        return None
    name = "HTTPS_PROXY" if parts.scheme == "https" else "HTTP_PROXY"
    proxy = urlsplit(chosen.strip())
    if proxy.scheme not in _PROXY_SCHEMES:
        raise ConfigurationError(
            f"{name} must be an http:// or https:// proxy URL (got scheme {proxy.scheme!r}); "
            "SOCKS proxies are not supported"
        )
    if not proxy.hostname:
        raise ConfigurationError(f"{name} has no host; write http://proxy.example:3128")
    return chosen.strip()


def configured_proxy(settings: Settings, url: str) -> str | None:
    """`proxy_for(url)` with the proxy variables of `settings`."""
    return proxy_for(
        url,
        https_proxy=settings.https_proxy.get_secret_value() if settings.https_proxy else None,
        http_proxy=settings.http_proxy.get_secret_value() if settings.http_proxy else None,
        no_proxy=settings.no_proxy,
    )
