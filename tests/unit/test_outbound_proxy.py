"""Which proxy the webhook and OpenAI calls go through: HTTPS_PROXY/HTTP_PROXY by the target's
scheme, NO_PROXY exemptions as curl reads them, and proxy URLs refused without being echoed."""

from __future__ import annotations

import pytest

from shared.errors import ConfigurationError
from shared.outbound_proxy import configured_proxy, exempt, proxy_for
from shared.settings import Settings

PROXY = "http://proxy.internal:3128"


def via(url: str, no_proxy: str = "", **proxies: str | None) -> str | None:
    return proxy_for(
        url,
        https_proxy=proxies.get("https", PROXY),
        http_proxy=proxies.get("http"),
        no_proxy=no_proxy,
    )


def test_an_https_target_goes_through_https_proxy():
    assert via("https://n8n.example.com/webhook/sms") == PROXY


def test_a_plain_http_target_uses_http_proxy_and_not_https_proxy():
    assert via("http://localhost:5678/webhook/sms") is None
    assert via("http://localhost:5678/webhook/sms", http="http://dev-proxy:8080") == (
        "http://dev-proxy:8080"
    )


def test_no_proxy_variable_means_a_direct_connection():
    assert via("https://n8n.example.com/x", https=None) is None
    assert via("https://n8n.example.com/x", https="  ") is None


@pytest.mark.parametrize(
    "no_proxy",
    [
        "n8n.example.com",
        "example.com",
        ".example.com",
        "*.example.com",
        "other.org, example.com",
        "*",
        "N8N.EXAMPLE.COM",
        "example.com:443",
    ],
)
def test_no_proxy_exempts_the_host_and_its_domain(no_proxy):
    assert via("https://n8n.example.com/x", no_proxy) is None


@pytest.mark.parametrize(
    "no_proxy", ["ample.com", "n8n.example.com.evil", "example.com:8443", "other.org", ""]
)
def test_no_proxy_does_not_exempt_other_hosts_or_ports(no_proxy):
    assert via("https://n8n.example.com/x", no_proxy) == PROXY


@pytest.mark.parametrize(
    ("host", "no_proxy", "expected"),
    [
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.3", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("2001:db8::5", "2001:db8::/32", True),
        ("[2001:db8::5]", "[2001:db8::5]:443", True),
        ("2001:db8::5", "[2001:db8::5]:80", False),
    ],
)
def test_no_proxy_takes_addresses_and_networks(host, no_proxy, expected):
    assert exempt(host, 443, no_proxy) is expected


def test_a_socks_proxy_is_refused_without_echoing_its_password():
    with pytest.raises(ConfigurationError) as refused:
        via("https://n8n.example.com/x", https="socks5://user:s3cret@proxy:1080")
    assert "SOCKS" in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_a_proxy_without_a_host_is_refused():
    with pytest.raises(ConfigurationError, match="HTTPS_PROXY has no host"):
        via("https://n8n.example.com/x", https="http://")


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "https_proxy"])
def test_the_settings_read_the_usual_variables_in_either_case(monkeypatch, name):
    monkeypatch.setenv(name, PROXY)
    monkeypatch.setenv("NO_PROXY", "internal.example")
    settings = Settings()
    assert configured_proxy(settings, "https://n8n.example.com/x") == PROXY
    assert configured_proxy(settings, "https://api.internal.example/v1") is None
    assert PROXY not in repr(settings)
