"""The webhook target and signing secret are checked at start; no test here needs outside DNS."""

from __future__ import annotations

import base64

import pytest

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import ConsoleSink, WebhookGateway
from shared.errors import ConfigurationError
from shared.settings import Settings
from shared.webhook_target import check_signing_secret, check_webhook_target

GOOD_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def never_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"no DNS lookup expected for {host}:{port}")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://127.0.0.1/webhook", "loopback"),
        ("https://127.8.9.10/webhook", "loopback"),
        ("https://10.0.0.5/webhook", "private"),
        ("https://172.16.0.1/webhook", "private"),
        ("https://172.31.255.254/webhook", "private"),
        ("https://192.168.1.20:8443/webhook", "private"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://169.254.10.1/webhook", "link-local"),
        ("https://100.64.0.1/webhook", "carrier-grade NAT"),
        ("https://0.0.0.0/webhook", "unspecified"),
        ("https://224.0.0.1/webhook", "multicast"),
        ("https://[::1]/webhook", "loopback"),
        ("https://[::]/webhook", "unspecified"),
        ("https://[fe80::1]/webhook", "link-local"),
        ("https://[fc00::1]/webhook", "private"),
        ("https://[fd12:3456::1]/webhook", "private"),
        ("https://[fd00:ec2::254]/webhook", "metadata"),
        ("https://[::ffff:10.0.0.1]/webhook", "private"),
        ("https://[::ffff:169.254.169.254]/webhook", "metadata"),
        ("https://[2002:a9fe:a9fe::1]/webhook", "metadata"),
        ("https://[ff02::1]/webhook", "multicast"),
    ],
)
def test_non_public_addresses_are_refused(url, says):
    with pytest.raises(ConfigurationError, match=says) as refused:
        check_webhook_target(url, allow_insecure=False, resolve=never_resolve)
    assert "WEBHOOK_ALLOW_INSECURE" in str(refused.value)


def test_a_host_name_is_judged_by_what_it_resolves_to():
    with pytest.raises(ConfigurationError, match=r"'localhost' is .*loopback"):
        check_webhook_target("https://localhost/webhook", allow_insecure=False)


def test_one_private_answer_among_public_ones_is_enough_to_refuse():
    def split_horizon(host: str, port: int) -> list[str]:
        assert (host, port) == ("n8n.example.com", 443)
        return ["93.184.216.34", "10.1.2.3"]

    with pytest.raises(ConfigurationError, match=r"10\.1\.2\.3, a private address"):
        check_webhook_target(
            "https://n8n.example.com/webhook/sms", allow_insecure=False, resolve=split_horizon
        )


def test_plain_http_needs_the_development_flag():
    with pytest.raises(ConfigurationError, match=r"must use https.*WEBHOOK_ALLOW_INSECURE=true"):
        check_webhook_target("http://93.184.216.34/webhook", allow_insecure=False)
    check_webhook_target("http://93.184.216.34/webhook", allow_insecure=True)


@pytest.mark.parametrize(
    "url",
    [
        "https://ops:s3cr3t@93.184.216.34/webhook",
        "https://t0ken@93.184.216.34/webhook",
        "http://ops:s3cr3t@127.0.0.1:5678/webhook",
    ],
)
def test_credentials_in_the_url_are_refused_and_never_echoed(url):
    for allow_insecure in (False, True):
        with pytest.raises(ConfigurationError, match="credentials") as refused:
            check_webhook_target(url, allow_insecure=allow_insecure, resolve=never_resolve)
        assert "s3cr3t" not in str(refused.value)
        assert "t0ken" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://93.184.216.34/webhook", "https://"),
        ("file:///etc/passwd", "https://"),
        ("https:///webhook", "no host"),
        ("https://93.184.216.34:99999/webhook", "not a valid URL"),
    ],
)
def test_malformed_targets_are_refused(url, says):
    with pytest.raises(ConfigurationError, match=says):
        check_webhook_target(url, allow_insecure=True, resolve=never_resolve)


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.216.34/webhook/sms",
        "https://93.184.216.34:8443/webhook/sms?tenant=a",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/webhook/sms",
    ],
)
def test_a_public_https_target_is_accepted(url):
    check_webhook_target(url, allow_insecure=False, resolve=never_resolve)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5678/webhook/sms",
        "http://localhost:5678/webhook/sms",
        "https://10.0.0.5/webhook",
    ],
)
def test_the_development_flag_allows_a_local_n8n(url):
    check_webhook_target(url, allow_insecure=True, resolve=never_resolve)


def test_the_dispatcher_will_not_start_with_a_refused_target():
    refused = Settings(n8n_outbound_webhook_url="http://127.0.0.1:5678/webhook/sms")
    with pytest.raises(ConfigurationError, match="https"):
        make_gateway(refused)
    metadata = Settings(
        n8n_outbound_webhook_url="https://169.254.169.254/latest", webhook_allow_insecure=False
    )
    with pytest.raises(ConfigurationError, match="metadata"):
        make_gateway(metadata)
    assert isinstance(make_gateway(Settings(n8n_outbound_webhook_url=None)), ConsoleSink)


async def test_the_dispatcher_starts_with_a_local_target_in_development():
    gateway = make_gateway(
        Settings(
            n8n_outbound_webhook_url="http://127.0.0.1:5678/webhook/sms",
            webhook_allow_insecure=True,
            webhook_signing_secret=GOOD_SECRET,
        )
    )
    assert isinstance(gateway, WebhookGateway)
    await gateway.aclose()


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("correct horse battery staple", "prefix is missing"),
        (base64.b64encode(bytes(32)).decode(), "prefix is missing"),
        ("whsec_not base64!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "decodes to 65 bytes"),
        ("whsec_", "decodes to 0 bytes"),
    ],
)
def test_unusable_signing_secrets_are_refused_without_echoing_them(secret, says):
    with pytest.raises(ConfigurationError, match=says) as refused:
        check_signing_secret(secret)
    assert "whsec_$(openssl rand -base64 32)" in str(refused.value)
    if len(secret) > len("whsec_"):
        assert secret not in str(refused.value)


def test_a_standard_webhooks_secret_is_accepted():
    check_signing_secret(GOOD_SECRET)
    check_signing_secret(GOOD_SECRET.rstrip("="))
    check_signing_secret(GOOD_SECRET + "\n")
