"""The prod overlay's alerts (k8s/overlays/prod/alerts.yaml): every expression parses, names only
metrics that exist (the project's registry, or the RabbitMQ and kube-state-metrics names listed
here), filters on the overlay's namespace, and keeps its threshold in step with the settings it
watches; every alert says what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from shared.settings import Settings
from tests.unit.test_deploy_grafana import exposed_names
from tests.unit.test_deploy_k8s import K8S, render

# RabbitMQ's prometheus plugin, /metrics/per-object (the prod PodMonitor scrapes that path):
# one series per queue, labelled vhost and queue. /metrics/detailed would name the same
# `rabbitmq_detailed_queue_*`.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
}
# kube-state-metrics, per Deployment (labels namespace, deployment).
KUBE_STATE_METRICS = {
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
    "kube_deployment_status_replicas_unavailable",
}
FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp_max",
    "clamp_min", "count", "count_over_time", "delta", "deriv", "floor", "histogram_quantile",
    "increase", "irate", "label_replace", "max", "max_over_time", "min", "min_over_time",
    "predict_linear", "quantile", "rate", "resets", "round", "scalar", "sort", "sum",
    "sum_over_time", "time", "topk", "vector",
}  # fmt: skip
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?(?![A-Za-z_]))
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
    |(?P<punct>[(){}\[\],])""",
    re.VERBOSE,
)
_CLOSING = {")": "(", "}": "{", "]": "["}


@dataclass(frozen=True)
class Parsed:
    metrics: frozenset[str]
    functions: frozenset[str]
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value) of every selector
    kept_labels: frozenset[str] | None  # the outermost `by (...)`, if the expression has one


def parse(expr: str) -> Parsed:
    """Tokenise a PromQL expression whole, brackets balanced, every name placed: a metric, a
    function or aggregation, a label (in a selector or a by/on list), or a keyword."""
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        assert match, f"cannot read {expr[at:]!r}"
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match.group()))
        at = match.end()
    metrics: set[str] = set()
    functions: set[str] = set()
    matchers: list[tuple[str, str, str]] = []
    kept: frozenset[str] | None = None
    stack: list[str] = []
    label_list_depth: int | None = None
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "punct":
            if text in "({[":
                stack.append(text)
            elif text in ")}]":
                assert stack, f"unbalanced {text!r} in {expr}"
                assert stack.pop() == _CLOSING[text], f"unbalanced {text!r} in {expr}"
                if label_list_depth is not None and len(stack) < label_list_depth:
                    label_list_depth = None
            continue
        if kind != "ident":
            continue
        if stack and stack[-1] == "{":
            assert tokens[i + 1][0] == "op", f"label {text} without a matcher in {expr}"
            assert tokens[i + 2][0] == "string", f"label {text} matched to a non-string"
            matchers.append((text, tokens[i + 1][1], tokens[i + 2][1][1:-1]))
            continue
        if label_list_depth is not None:
            continue
        if text in LABEL_LISTS:
            assert following == "(", f"{text} without a label list in {expr}"
            label_list_depth = len(stack) + 1
            if text == "by" and kept is None:
                end = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
                kept = frozenset(t for k, t in tokens[i + 2 : end] if k == "ident")
            continue
        if text in KEYWORDS:
            continue
        if following == "(" or (text in FUNCTIONS and following in ("by", "without")):
            assert text in FUNCTIONS, f"unknown function {text} in {expr}"
            functions.add(text)
            continue
        metrics.add(text)
    assert not stack, f"unclosed {stack} in {expr}"
    return Parsed(frozenset(metrics), frozenset(functions), tuple(matchers), kept)


def alert_rules() -> list[dict]:
    docs = render(K8S / "overlays" / "prod")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert rules
    return rules


def prod_settings() -> Settings:
    config = next(
        d for d in render(K8S / "overlays" / "prod") if d["metadata"]["name"] == "followups-config"
    )["data"]
    return Settings(**{k.lower(): v for k, v in config.items()})


def threshold(expr: str) -> float:
    (value,) = re.findall(r"[<>]=?\s*([0-9.]+)\s*$", expr.strip())
    return float(value)


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return set(exposed_names()) | RABBITMQ_METRICS | KUBE_STATE_METRICS


def test_every_expression_parses_and_names_metrics_that_exist(known_metrics):
    seen: set[str] = set()
    for rule in alert_rules():
        parsed = parse(rule["expr"])
        assert parsed.metrics, rule["alert"]
        missing = parsed.metrics - known_metrics
        assert not missing, f"{rule['alert']} names metrics nobody exposes: {sorted(missing)}"
        seen |= parsed.metrics
    print(f"\n{len(alert_rules())} alerts over {sorted(seen)}")


def test_the_parser_finds_what_is_wrong():
    assert parse('sum by (le) (rate(a_bucket{x="1"}[5m])) > 0').metrics == {"a_bucket"}
    assert parse('time() - b{namespace="n"} > 90').kept_labels is None
    for broken in ("sum(rate(a[5m])", 'a{x="1"', "nosuchfunction(a)", "a $ b"):
        with pytest.raises(AssertionError):
            parse(broken)


def test_the_alerts_cover_what_the_readme_recommends():
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    watched = {name: parse(expr).metrics for name, expr in expressions.items()}
    assert "rabbitmq_queue_messages" in watched["FollowupsDeadLettersWaiting"]
    assert "followups_send_lateness_seconds_bucket" in watched["FollowupsSendsLate"]
    assert "followups_timer_lateness_seconds_bucket" in watched["FollowupsTimersNearTheMargin"]
    assert "followups_sweep_last_pass_timestamp_seconds" in watched["FollowupsSweepStale"]
    assert watched["FollowupsServiceNotReady"] <= KUBE_STATE_METRICS
    assert ".dlq" in expressions["FollowupsDeadLettersWaiting"]


def test_every_alert_says_what_to_do_and_filters_on_its_namespace():
    namespace = next(d for d in render(K8S / "overlays" / "prod") if d["kind"] == "Namespace")
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert re.fullmatch(r"\d+m", rule["for"]), name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert len(rule["annotations"]["runbook"].split()) >= 15, name
        parsed = parse(rule["expr"])
        assert ("namespace", "=", namespace["metadata"]["name"]) in parsed.matchers, name
        used = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
        if parsed.kept_labels is not None:
            assert used <= parsed.kept_labels, f"{name} shows labels its sum drops: {used}"


def test_thresholds_follow_the_settings_they_watch():
    settings = prod_settings()
    rules = {rule["alert"]: rule for rule in alert_rules()}
    margin = settings.dispatch_margin_ms / 1000
    near = rules["FollowupsTimersNearTheMargin"]
    assert threshold(near["expr"]) == pytest.approx(0.8 * margin)
    assert f"{settings.dispatch_margin_ms} ms" in near["annotations"]["summary"]
    stale = rules["FollowupsSweepStale"]
    assert threshold(stale["expr"]) == pytest.approx(3 * settings.sweep_interval_seconds)
