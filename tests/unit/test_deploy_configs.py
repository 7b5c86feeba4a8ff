"""The local observability stack: docker-compose.yml and the configs in deploy/.

No Docker engine, collector, Tempo or Grafana runs here, so every file is checked by parsing:

- docker-compose.yml against the Compose Specification's JSON schema (the copy that
  check-jsonschema ships), after the same `${VAR:-default}` interpolation Compose does, then for
  what the stack needs: services, pinned images, healthchecks, dependency conditions, ports on
  loopback only, declared volumes, mounted files that exist, and a gateway environment that uses
  the gateway's real variable names and that the gateway's own Settings accept;
- the collector, Tempo, Prometheus and Grafana provisioning files against JSON schemas written
  here for the parts we use (unknown keys are refused: they are typos more often than features),
  then for their wiring: pipelines reference defined components, hosts are compose services,
  ports match what the other side listens on, datasource uids match;
- every PromQL expression of the dashboard with a real PromQL parser (promql-parser): metric
  names are exactly the gateway's, label names and values exist, counters only under rate(),
  histogram_quantile keeps `le`, latency panels show exemplars.

`dashboard_metric_names(path)` is public: another test compares it with what `/metrics` serves.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import jsonschema
import promql_parser
import pytest
import yaml

from qna_gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
SETTINGS_SOURCE = ROOT / "src" / "qna_gateway" / "settings.py"
DEPLOY = ROOT / "deploy"
COLLECTOR_CONFIG = DEPLOY / "otel-collector.yaml"
TEMPO_CONFIG = DEPLOY / "tempo.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
GRAFANA_PROVISIONING = GRAFANA / "provisioning"
DATASOURCES = GRAFANA_PROVISIONING / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = GRAFANA_PROVISIONING / "dashboards" / "dashboards.yaml"
DASHBOARDS = GRAFANA / "dashboards"
DASHBOARD = DASHBOARDS / "qna-gateway.json"

# -- the gateway's contract (DESIGN.md, Observability) ----------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    kind: Literal["counter", "gauge", "histogram"]
    # label name -> the values it takes, or None when they are open (route templates, codes)
    labels: Mapping[str, frozenset[str] | None]


def _values(*values: str) -> frozenset[str]:
    return frozenset(values)


GATEWAY_METRICS: Final[Mapping[str, MetricSpec]] = {
    "http_requests_total": MetricSpec(
        "counter", {"method": None, "endpoint": None, "status": None}
    ),
    "http_request_duration_seconds": MetricSpec("histogram", {"method": None, "endpoint": None}),
    "chat_sessions_total": MetricSpec("counter", {}),
    "messages_total": MetricSpec("counter", {"role": None}),
    "llm_calls_total": MetricSpec("counter", {"status": _values("success", "error")}),
    "llm_early_starts_total": MetricSpec("counter", {"outcome": _values("used", "abandoned")}),
    "llm_call_duration_seconds": MetricSpec("histogram", {}),
    "knowledge_base_searches_total": MetricSpec("counter", {}),
    "sse_open_streams": MetricSpec("gauge", {}),
    "llm_time_to_first_token_seconds": MetricSpec("histogram", {}),
    "llm_tokens_relayed_total": MetricSpec("counter", {}),
    "sse_resumes_total": MetricSpec("counter", {}),
    "sse_disconnects_total": MetricSpec("counter", {"reason": None}),
    "turns_total": MetricSpec(
        "counter", {"status": _values("completed", "failed", "cancelled", "interrupted")}
    ),
    "db_pool_connections": MetricSpec(
        "gauge", {"state": _values("size", "idle", "waiting", "max")}
    ),
    "db_statements_total": MetricSpec("counter", {"kind": None}),
    "db_event_listener_up": MetricSpec("gauge", {}),
}
HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")
# Labels every scraped series has besides its own: Prometheus adds job and instance, and
# deploy/prometheus.yml adds `service` to the gateway's target.
TARGET_LABELS: Final = frozenset({"job", "instance", "service"})
# The label of the exemplars the gateway attaches to its histograms.
EXEMPLAR_TRACE_LABEL: Final = "trace_id"

# Listening on every interface is what a server inside a container must do.
ALL_INTERFACES: Final = "0.0.0.0"  # noqa: S104
# The gateway's environment in docker-compose.yml: these names, and only names the gateway reads.
GATEWAY_ENV_REQUIRED: Final = {
    "DATABASE_URL": "postgresql://qna:qna@postgres:5432/qna",
    "QNA_HOST": ALL_INTERFACES,
    "QNA_LOG_FORMAT": "json",
    "OTEL_SERVICE_NAME": "qna-gateway",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
}
# Passed through from the shell that runs `docker compose up`; unset means extractive mode.
GATEWAY_ENV_PASS_THROUGH: Final = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "QNA_MODEL")
# The standard OpenTelemetry SDK variables the gateway's tracing honours.
OTEL_VARIABLES: Final = frozenset(
    {
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_EXPORTER_OTLP_INSECURE",
    }
)

REQUIRED_SERVICES: Final = (
    "gateway",
    "postgres",
    "otel-collector",
    "tempo",
    "prometheus",
    "grafana",
)
# What each service must publish on the host (container ports).
PUBLISHED_PORTS: Final = {
    "gateway": {8000},
    "otel-collector": {4317, 4318},
    "tempo": {3200},
    "prometheus": {9090},
    "grafana": {3000},
}
LOCAL_DEV_SECRET_VALUES: Final = frozenset({"qna"})
SECRET_LOOKING_NAME: Final = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|DATABASE_URL", re.I)

# -- small typed helpers -------------------------------------------------------------------------


def as_map(value: object, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what}: expected a mapping, got {type(value).__name__}"
    assert all(isinstance(key, str) for key in value), f"{what}: keys must be strings"
    return value


def as_list(value: object, what: str) -> list[Any]:
    assert isinstance(value, list), f"{what}: expected a list, got {type(value).__name__}"
    return value


def as_str(value: object, what: str) -> str:
    assert isinstance(value, str), f"{what}: expected a string, got {type(value).__name__}"
    return value


def load_yaml(path: Path) -> dict[str, Any]:
    return as_map(yaml.safe_load(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT)))


def load_json(path: Path | str) -> dict[str, Any]:
    return as_map(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return sorted(
        f"{'/'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    )


def walk_strings(value: object, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string value in a parsed document, with its path."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_strings(item, f"{where}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_strings(item, f"{where}/{index}")


def host_port(address: str) -> tuple[str, int]:
    """`host:port` (no scheme) or a URL: its host and port."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    assert parts.hostname is not None, f"{address}: no host"
    assert parts.port is not None, f"{address}: no port"
    return parts.hostname, parts.port


GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|ms|s|m|h))+")


def go_duration(text: str) -> timedelta:
    """A Go duration (Compose, the collector, Tempo): `1m30s`, `500ms`, `72h`."""
    assert GO_DURATION.fullmatch(text), f"{text!r} is not a duration"
    seconds = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = sum(
        float(number) * seconds[unit]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    )
    return timedelta(seconds=total)


PROMETHEUS_DURATION = r"^(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?$"


def prometheus_duration(text: str) -> timedelta:
    assert text, "an empty duration"
    assert re.fullmatch(PROMETHEUS_DURATION, text), f"{text!r} is not a duration"
    return promql_parser.parse_duration(text)


# -- Compose: interpolation, ports, volumes ------------------------------------------------------

INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR:+alternative}, and $$ for a literal $."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            raise ValueError(f"invalid interpolation in {text!r}")
        name = match["braced"] or match["named"]
        value = environ.get(name)
        op, arg = match["op"], match["arg"] or ""
        if op is None:
            return value or ""
        if op in (":-", "-"):
            use_default = not value if op == ":-" else value is None
            return arg if use_default else str(value)
        if op in (":?", "?"):
            if (not value) if op == ":?" else value is None:
                raise ValueError(f"{name}: {arg}")
            return str(value)
        present = bool(value) if op == ":+" else value is not None
        return arg if present else ""

    return INTERPOLATION.sub(replace, text)


def interpolate_all(value: object, environ: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, environ)
    if isinstance(value, dict):
        return {key: interpolate_all(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_all(item, environ) for item in value]
    return value


@functools.cache
def compose_raw() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def compose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with this host environment (default: empty)."""
    return as_map(interpolate_all(compose_raw(), environ or {}), "compose")


def services() -> dict[str, dict[str, Any]]:
    return {
        name: as_map(service, f"services.{name}")
        for name, service in as_map(compose()["services"], "services").items()
    }


def service(name: str) -> dict[str, Any]:
    found = services().get(name)
    assert found is not None, f"docker-compose.yml has no service {name!r}"
    return found


@dataclass(frozen=True)
class PortMapping:
    host_ip: str | None
    published: int | None
    target: int


def port_mappings(svc: Mapping[str, Any]) -> list[PortMapping]:
    mappings: list[PortMapping] = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            mappings.append(
                PortMapping(
                    entry.get("host_ip"),
                    None if published is None else int(published),
                    int(entry["target"]),
                )
            )
            continue
        spec = str(entry).split("/")[0]
        if spec.startswith("["):  # [::1]:8000:8000
            host_ip, _, rest = spec[1:].partition("]:")
            published_text, _, target_text = rest.partition(":")
            mappings.append(PortMapping(host_ip, int(published_text), int(target_text)))
            continue
        parts = spec.split(":")
        assert all("-" not in part for part in parts), f"{entry}: use single ports, not ranges"
        if len(parts) == 1:
            mappings.append(PortMapping(None, None, int(parts[0])))
        elif len(parts) == 2:
            mappings.append(PortMapping(None, int(parts[0]), int(parts[1])))
        else:
            host_ip = ":".join(parts[:-2])
            published = int(parts[-2]) if parts[-2] else None
            mappings.append(PortMapping(host_ip, published, int(parts[-1])))
    return mappings


def container_ports(name: str) -> set[int]:
    svc = service(name)
    return {mapping.target for mapping in port_mappings(svc)} | {
        int(port) for port in svc.get("expose", [])
    }


@dataclass(frozen=True)
class Mount:
    kind: Literal["bind", "volume", "tmpfs"]
    source: str
    target: str
    read_only: bool

    @property
    def host_path(self) -> Path:
        assert self.kind == "bind"
        return (COMPOSE_FILE.parent / self.source).resolve()


def mounts(svc: Mapping[str, Any]) -> list[Mount]:
    found: list[Mount] = []
    for entry in svc.get("volumes", []):
        kind: Literal["bind", "volume", "tmpfs"]
        if isinstance(entry, dict):
            kinds: dict[str, Literal["bind", "volume", "tmpfs"]] = {
                "bind": "bind",
                "volume": "volume",
                "tmpfs": "tmpfs",
            }
            assert entry["type"] in kinds, entry
            source, target = str(entry.get("source", "")), str(entry["target"])
            found.append(Mount(kinds[entry["type"]], source, target, bool(entry.get("read_only"))))
            continue
        source, _, rest = str(entry).partition(":")
        target, _, mode = rest.partition(":")
        assert target, f"{entry}: an anonymous volume; name it"
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        found.append(Mount(kind, source, target, "ro" in mode.split(",")))
    return found


def mount_for(name: str, container_path: str) -> tuple[Mount, str]:
    """The mount of `name` that holds `container_path`, and the path's rest inside it."""
    best: tuple[Mount, str] | None = None
    for mount in mounts(service(name)):
        if container_path == mount.target or container_path.startswith(mount.target + "/"):
            rest = container_path[len(mount.target) :].lstrip("/")
            if best is None or len(mount.target) > len(best[0].target):
                best = (mount, rest)
    assert best is not None, f"{name}: nothing is mounted at {container_path}"
    return best


def host_file(name: str, container_path: str) -> Path:
    """The file on this disk that `name` sees at `container_path` through a bind mount."""
    mount, rest = mount_for(name, container_path)
    assert mount.kind == "bind", f"{name}: {container_path} is not bind-mounted from the repository"
    return mount.host_path / rest if rest else mount.host_path


def command_flag(name: str, flag: str) -> str:
    """The value of `--flag=value` / `-flag=value` / `--flag value` in a service's command."""
    command = service(name).get("command", [])
    args = shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    raise AssertionError(f"{name}: its command has no {flag}")


def command_args(name: str) -> list[str]:
    command = service(name).get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def environment(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        pairs = (str(item).partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in as_map(env, "env").items()}


def image_reference(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV of the Dockerfile (what the container starts with)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    stages = re.split(r"(?im)^FROM\s", text)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if re.match(r"(?i)^ENV\s", line.strip()):
            for word in shlex.split(line.strip()[3:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def gateway_settings(host_environ: Mapping[str, str] | None = None) -> Settings:
    """The gateway's Settings inside the compose container: image ENV, then compose environment."""
    container_env = dockerfile_env() | environment(compose(host_environ)["services"]["gateway"])
    return Settings.from_env(container_env, env_file=None)


@functools.cache
def project_version() -> str:
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return str(pyproject["project"]["version"])


# -- PromQL: parse (Grafana variables substituted), walk, check -----------------------------------

GRAFANA_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}|\$(?P<named>\w+)|\[\[(?P<old>\w+)(?::[^\]]*)?\]\]"
)
GRAFANA_DURATION_VARIABLES: Final = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__interval_ms": "60000",
    "__range_ms": "3600000",
    "__range_s": "3600",
}


def substitute_grafana_variables(expr: str) -> str:
    """What Grafana sends: built-in intervals become durations; dashboard variables (they only
    belong inside label values) a plain regex-safe word."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["named"] or match["old"]
        return GRAFANA_DURATION_VARIABLES.get(name, "grafana_variable")

    return GRAFANA_VARIABLE.sub(replace, expr)


def parse_promql(expr: str) -> promql_parser.Expr:
    return promql_parser.parse(substitute_grafana_variables(expr))


def children(node: promql_parser.Expr) -> list[promql_parser.Expr]:
    if isinstance(node, promql_parser.AggregateExpr):
        params = [node.param] if isinstance(node.param, promql_parser.Expr) else []
        return [node.expr, *params]
    if isinstance(node, promql_parser.UnaryExpr | promql_parser.ParenExpr):
        return [node.expr]
    if isinstance(node, promql_parser.SubqueryExpr):
        return [node.expr]
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.Call):
        return [arg for arg in node.args if isinstance(arg, promql_parser.Expr)]
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    return []


def nodes(node: promql_parser.Expr) -> Iterator[promql_parser.Expr]:
    yield node
    for child in children(node):
        yield from nodes(child)


def selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    return [found for found in nodes(node) if isinstance(found, promql_parser.VectorSelector)]


def selector_metric(selector: promql_parser.VectorSelector) -> str | None:
    if selector.name:
        return selector.name
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return matcher.value
    return None


def split_histogram_suffix(series: str) -> tuple[str, str]:
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)], suffix
    return series, ""


def metric_names(expr: str) -> set[str]:
    """The metrics an expression reads, histogram series reduced to their histogram's name."""
    names: set[str] = set()
    for selector in selectors(parse_promql(expr)):
        series = selector_metric(selector)
        assert series is not None, f"{expr}: a selector without a metric name"
        names.add(split_histogram_suffix(series)[0])
    return names


def series_labels(series: str) -> set[str] | None:
    """The labels a gateway series can carry, or None for a series the gateway does not export."""
    base, suffix = split_histogram_suffix(series)
    spec = GATEWAY_METRICS.get(base)
    if spec is None:
        return None
    return set(spec.labels) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())


def available_labels(node: promql_parser.Expr) -> set[str]:
    labels: set[str] = set()
    for selector in selectors(node):
        series = selector_metric(selector)
        labels |= (series_labels(series) if series else None) or set()
    return labels


RATE_FUNCTIONS: Final = frozenset({"rate", "irate", "increase"})


def _selector_problems(
    selector: promql_parser.VectorSelector, rated: bool, *, check_rates: bool
) -> list[str]:
    series = selector_metric(selector)
    if series is None:
        return [f"{selector}: a selector without a metric name"]
    base, suffix = split_histogram_suffix(series)
    spec = GATEWAY_METRICS.get(base)
    if spec is None:
        return [f"{series}: not a metric the gateway exports"]
    problems: list[str] = []
    if suffix and spec.kind != "histogram":
        problems.append(f"{series}: {base} is a {spec.kind}, it has no {suffix} series")
    if not suffix and spec.kind == "histogram":
        problems.append(f"{series}: a histogram; read {series}_bucket, _sum or _count")
    counter_like = spec.kind == "counter" or bool(suffix)
    if check_rates and counter_like and not rated:
        problems.append(f"{series}: a counter read without rate()/irate()/increase()")
    if check_rates and spec.kind == "gauge" and rated:
        problems.append(f"{series}: rate() of a gauge")
    allowed = series_labels(series) or set()
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__":
            continue
        if matcher.name not in allowed:
            problems.append(f"{series}: no label {matcher.name!r} (it has {sorted(allowed)})")
            continue
        values = spec.labels.get(matcher.name)
        if values is None:
            continue
        wanted: list[str] = []
        if matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
            wanted = [matcher.value]
        elif re.fullmatch(r"[\w|]+", matcher.value):
            wanted = matcher.value.split("|")
        problems.extend(
            f"{series}: {matcher.name}={value!r} never occurs (values: {sorted(values)})"
            for value in wanted
            if value not in values
        )
    return problems


def promql_problems(expr: str, *, selector_only: bool = False) -> list[str]:
    """What is wrong with a dashboard expression, as readable sentences (none: it is fine).

    `selector_only`: a template variable's series selector (`label_values(selector, label)`),
    where a counter is rightly read as it is."""
    try:
        tree = parse_promql(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    problems: list[str] = []

    def visit(node: promql_parser.Expr, rated: bool) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            problems.extend(_selector_problems(node, rated, check_rates=not selector_only))
            return
        if isinstance(node, promql_parser.Call) and node.func.name in RATE_FUNCTIONS:
            for child in children(node):
                visit(child, True)
            return
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            problems.extend(_quantile_problems(node))
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels = set(node.modifier.labels)
            unknown = labels - available_labels(node.expr)
            if node.modifier.type == promql_parser.AggModifierType.By and unknown:
                problems.append(f"{node.op}: grouped by labels its series lack: {sorted(unknown)}")
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            on = set(matching.labels) if matching is not None else set()
            for side in (node.lhs, node.rhs):
                if on - available_labels(side):
                    problems.append(f"on/ignoring labels {sorted(on)} missing from {side}")
        keep = isinstance(
            node,
            promql_parser.MatrixSelector | promql_parser.SubqueryExpr | promql_parser.ParenExpr,
        )
        for child in children(node):
            visit(child, rated and keep)

    visit(tree, False)
    return problems


def _quantile_problems(call: promql_parser.Call) -> list[str]:
    problems: list[str] = []
    quantile, inner = call.args[0], call.args[1]
    if not isinstance(quantile, promql_parser.NumberLiteral) or not 0 < quantile.val <= 1:
        problems.append("histogram_quantile: the quantile must be a number in (0, 1]")
    while isinstance(inner, promql_parser.ParenExpr):
        inner = inner.expr
    buckets = [
        selector
        for selector in selectors(inner)
        if (selector_metric(selector) or "").endswith("_bucket")
    ]
    if not buckets:
        problems.append("histogram_quantile over no _bucket series")
    if isinstance(inner, promql_parser.AggregateExpr) and inner.modifier is not None:
        grouped = "le" in inner.modifier.labels
        by = inner.modifier.type == promql_parser.AggModifierType.By
        if grouped != by:
            problems.append("histogram_quantile: the aggregation must keep the le label")
    elif isinstance(inner, promql_parser.AggregateExpr):
        problems.append("histogram_quantile: the aggregation must keep the le label")
    return problems


# -- the dashboard ---------------------------------------------------------------------------------


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, the ones inside (collapsed) rows included."""
    found: list[dict[str, Any]] = []
    for panel in as_list(dashboard.get("panels", []), "panels"):
        panel = as_map(panel, "panel")
        found.append(panel)
        found.extend(as_map(inner, "panel") for inner in panel.get("panels", []))
    return found


@dataclass(frozen=True)
class PromQuery:
    where: str
    expr: str
    exemplar: bool
    # a template variable's `label_values` selector: counters are read as they are
    variable: bool = False


def variable_promql(query: str) -> tuple[str, bool] | None:
    """The PromQL inside a Prometheus template-variable query, if it has any, and whether it is
    a bare series selector (`label_values(selector, label)`) rather than a whole expression."""
    if match := re.fullmatch(r"\s*label_values\((?P<selector>.+),\s*\w+\s*\)\s*", query, re.S):
        return match["selector"], True
    if match := re.fullmatch(r"\s*query_result\((?P<expr>.+)\)\s*", query, re.S):
        return match["expr"], False
    return None


def dashboard_promql(dashboard: Mapping[str, Any]) -> list[PromQuery]:
    """Every PromQL expression of a dashboard: panel targets and template-variable queries."""
    queries: list[PromQuery] = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            target = as_map(target, "target")
            if "expr" in target:
                where = f"panel {panel.get('title')!r} target {target.get('refId')}"
                expr = as_str(target["expr"], where)
                queries.append(PromQuery(where, expr, bool(target.get("exemplar"))))
    templating = as_map(dashboard.get("templating", {"list": []}), "templating")
    for variable in as_list(templating.get("list", []), "templating.list"):
        variable = as_map(variable, "variable")
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        found = variable_promql(str(text or variable.get("definition", "")))
        if found is not None:
            where = f"variable {variable.get('name')!r}"
            queries.append(PromQuery(where, found[0], exemplar=False, variable=found[1]))
    return queries


def dashboard_metric_names(path: Path | str) -> set[str]:
    """Every metric a Grafana dashboard's PromQL reads (panels and template variables).

    Names are as exported: counters keep `_total`, a histogram's `_bucket`/`_sum`/`_count`
    series count as the histogram itself (`http_request_duration_seconds`). Label names in
    `by (...)` or matchers, function names and Grafana variables are not metrics: the expressions
    are parsed by a PromQL parser, not scanned.
    """
    names: set[str] = set()
    for query in dashboard_promql(load_json(path)):
        names |= metric_names(query.expr)
    return names


@functools.cache
def dashboard() -> dict[str, Any]:
    return load_json(DASHBOARD)


# -- configs ---------------------------------------------------------------------------------------


@functools.cache
def collector() -> dict[str, Any]:
    return load_yaml(COLLECTOR_CONFIG)


@functools.cache
def tempo() -> dict[str, Any]:
    return load_yaml(TEMPO_CONFIG)


@functools.cache
def prometheus() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_CONFIG)


@functools.cache
def datasources() -> dict[str, dict[str, Any]]:
    """Provisioned datasources by uid."""
    document = load_yaml(DATASOURCES)
    return {
        str(source["uid"]): as_map(source, "datasource")
        for source in as_list(document["datasources"], "datasources")
    }


def datasource_of_type(kind: str) -> dict[str, Any]:
    found = [source for source in datasources().values() if source["type"] == kind]
    assert len(found) == 1, f"expected one {kind} datasource, found {len(found)}"
    return found[0]


def gateway_scrape_config() -> dict[str, Any]:
    for job in prometheus()["scrape_configs"]:
        targets = [t for group in job.get("static_configs", []) for t in group.get("targets", [])]
        if any(host_port(target)[0] == "gateway" for target in targets):
            return as_map(job, "scrape config")
    raise AssertionError("prometheus.yml scrapes no gateway target")


# -- JSON schemas for the parts of each config we use ---------------------------------------------
# Written in YAML for reading's sake. `additionalProperties: false` where we know the whole set of
# keys we use: an unknown key there is far more often a typo than a feature (add it if it is not).

HOST_PORT = r"^[A-Za-z0-9.\-]+:\d{1,5}$"
GO_DURATION_PATTERN = r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$"


def yaml_schema(text: str, *, root: bool = True, **substitutions: object) -> dict[str, Any]:
    """A JSON schema written in YAML; each `<NAME>` placeholder becomes the given value."""
    for name, value in substitutions.items():
        text = text.replace(f"<{name}>", json.dumps(value))
    schema = as_map(yaml.safe_load(text), "schema")
    if root:
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


OTLP_RECEIVER_SCHEMA = """
type: object
additionalProperties: false
required: [protocols]
properties:
  protocols:
    type: object
    additionalProperties: false
    minProperties: 1
    properties:
      grpc: {type: object, required: [endpoint], properties: {endpoint: {pattern: <HOST_PORT>}}}
      http: {type: object, required: [endpoint], properties: {endpoint: {pattern: <HOST_PORT>}}}
"""

COLLECTOR_SCHEMA: Final = yaml_schema(
    """
$defs:
  components:
    type: object
    propertyNames: {pattern: '^[a-z][a-z0-9_]*(/[^/\\s]+)?$'}
    additionalProperties: {type: [object, "null"]}
  names: {type: array, items: {type: string, minLength: 1}, uniqueItems: true}
type: object
additionalProperties: false
required: [receivers, exporters, service]
properties:
  receivers: {$ref: '#/$defs/components'}
  processors: {$ref: '#/$defs/components'}
  exporters: {$ref: '#/$defs/components'}
  extensions: {$ref: '#/$defs/components'}
  connectors: {$ref: '#/$defs/components'}
  service:
    type: object
    additionalProperties: false
    required: [pipelines]
    properties:
      extensions: {$ref: '#/$defs/names'}
      telemetry: {type: object}
      pipelines:
        type: object
        minProperties: 1
        propertyNames: {pattern: '^(traces|metrics|logs|profiles)(/[^/\\s]+)?$'}
        additionalProperties:
          type: object
          additionalProperties: false
          required: [receivers, exporters]
          properties:
            receivers: {$ref: '#/$defs/names', minItems: 1}
            processors: {$ref: '#/$defs/names'}
            exporters: {$ref: '#/$defs/names', minItems: 1}
"""
)

# The settings of the collector components we use, by type (the part of an id before "/").
COLLECTOR_COMPONENT_SCHEMAS: Final = {
    "otlp": yaml_schema(OTLP_RECEIVER_SCHEMA, HOST_PORT=HOST_PORT),
    "otlp_grpc": yaml_schema(
        """
type: object
required: [endpoint]
properties:
  endpoint: {type: string, pattern: <HOST_PORT>}
  tls: {type: object, additionalProperties: false, properties: {insecure: {type: boolean}}}
""",
        HOST_PORT=HOST_PORT,
    ),
    "batch": yaml_schema(
        """
type: [object, "null"]
additionalProperties: false
properties:
  timeout: {type: string, pattern: <DURATION>}
  send_batch_size: {type: integer, minimum: 1}
  send_batch_max_size: {type: integer, minimum: 0}
""",
        DURATION=GO_DURATION_PATTERN,
    ),
    "memory_limiter": yaml_schema(
        """
type: object
additionalProperties: false
required: [check_interval]
properties:
  check_interval: {type: string, pattern: <DURATION>}
  limit_percentage: {type: integer, minimum: 1, maximum: 100}
  spike_limit_percentage: {type: integer, minimum: 1, maximum: 100}
  limit_mib: {type: integer, minimum: 1}
  spike_limit_mib: {type: integer, minimum: 1}
""",
        DURATION=GO_DURATION_PATTERN,
    ),
    "debug": yaml_schema(
        """
type: [object, "null"]
additionalProperties: false
properties: {verbosity: {enum: [basic, normal, detailed]}}
"""
    ),
    "health_check": yaml_schema(
        """
type: [object, "null"]
additionalProperties: false
properties: {endpoint: {type: string, pattern: <HOST_PORT>}}
""",
        HOST_PORT=HOST_PORT,
    ),
}

TEMPO_SCHEMA: Final = yaml_schema(
    """
$defs:
  duration: {type: string, pattern: <DURATION>}
  path: {type: object, required: [path], properties: {path: {type: string, pattern: ^/}}}
  otlp_receiver: <OTLP>
type: object
additionalProperties: false
required: [server, distributor, storage]
properties:
  stream_over_http_enabled: {type: boolean}
  multitenancy_enabled: {type: boolean}
  target: {type: string}
  usage_report: {type: object, properties: {reporting_enabled: {type: boolean}}}
  server:
    type: object
    required: [http_listen_port]
    properties:
      http_listen_port: {type: integer, minimum: 1, maximum: 65535}
      grpc_listen_port: {type: integer, minimum: 1, maximum: 65535}
      log_level: {enum: [debug, info, warn, error]}
  distributor:
    type: object
    required: [receivers]
    properties:
      receivers:
        type: object
        additionalProperties: false
        required: [otlp]
        properties: {otlp: {$ref: '#/$defs/otlp_receiver'}}
  ingester:
    type: object
    properties:
      max_block_duration: {$ref: '#/$defs/duration'}
      trace_idle_period: {$ref: '#/$defs/duration'}
  compactor:
    type: object
    properties:
      compaction: {type: object, properties: {block_retention: {$ref: '#/$defs/duration'}}}
  metrics_generator:
    type: object
    properties:
      registry: {type: object}
      processor: {type: object}
      traces_storage: {$ref: '#/$defs/path'}
      storage:
        $ref: '#/$defs/path'
        properties:
          remote_write:
            type: array
            minItems: 1
            items:
              type: object
              required: [url]
              properties:
                url: {type: string, pattern: '^https?://'}
                send_exemplars: {type: boolean}
  storage:
    type: object
    additionalProperties: false
    required: [trace]
    properties:
      trace:
        type: object
        required: [backend, wal]
        properties:
          backend: {enum: [local, s3, gcs, azure]}
          wal: {$ref: '#/$defs/path'}
          local: {$ref: '#/$defs/path'}
        if: {properties: {backend: {const: local}}}
        then: {required: [local]}
  overrides:
    type: object
    properties:
      defaults:
        type: object
        properties:
          metrics_generator:
            type: object
            properties:
              processors:
                type: array
                uniqueItems: true
                items: {enum: [service-graphs, span-metrics, local-blocks]}
  query_frontend: {type: object}
  querier: {type: object}
  memberlist: {type: object}
  cache: {type: object}
""",
    DURATION=GO_DURATION_PATTERN,
    OTLP=yaml_schema(OTLP_RECEIVER_SCHEMA, root=False, HOST_PORT=HOST_PORT),
)

PROMETHEUS_SCHEMA: Final = yaml_schema(
    """
$defs:
  duration: {type: string, minLength: 2, pattern: <DURATION>}
  labels:
    type: object
    propertyNames: {pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$'}
    additionalProperties: {type: string}
type: object
additionalProperties: false
required: [scrape_configs]
properties:
  global:
    type: object
    additionalProperties: false
    properties:
      scrape_interval: {$ref: '#/$defs/duration'}
      scrape_timeout: {$ref: '#/$defs/duration'}
      evaluation_interval: {$ref: '#/$defs/duration'}
      external_labels: {$ref: '#/$defs/labels'}
  storage:
    type: object
    additionalProperties: false
    properties:
      exemplars:
        type: object
        additionalProperties: false
        properties: {max_exemplars: {type: integer, minimum: 0}}
  scrape_configs:
    type: array
    minItems: 1
    items:
      type: object
      additionalProperties: false
      required: [job_name, static_configs]
      properties:
        job_name: {type: string, minLength: 1}
        scrape_interval: {$ref: '#/$defs/duration'}
        scrape_timeout: {$ref: '#/$defs/duration'}
        metrics_path: {type: string, pattern: ^/}
        scheme: {enum: [http, https]}
        honor_labels: {type: boolean}
        scrape_protocols:
          type: array
          minItems: 1
          uniqueItems: true
          items:
            enum: [PrometheusProto, OpenMetricsText0.0.1, OpenMetricsText1.0.0,
                   PrometheusText0.0.4, PrometheusText1.0.0]
        static_configs:
          type: array
          minItems: 1
          items:
            type: object
            additionalProperties: false
            required: [targets]
            properties:
              targets: {type: array, minItems: 1, items: {type: string, pattern: <HOST_PORT>}}
              labels: {$ref: '#/$defs/labels'}
""",
    DURATION=PROMETHEUS_DURATION,
    HOST_PORT=HOST_PORT,
)

GRAFANA_DATASOURCES_SCHEMA: Final = yaml_schema(
    """
type: object
additionalProperties: false
required: [apiVersion, datasources]
properties:
  apiVersion: {const: 1}
  deleteDatasources: {type: array}
  datasources:
    type: array
    minItems: 1
    items:
      type: object
      additionalProperties: false
      required: [name, uid, type, access, url]
      properties:
        name: {type: string, minLength: 1}
        uid: {type: string, pattern: '^[a-zA-Z0-9_-]{1,40}$'}
        type: {enum: [prometheus, tempo]}
        access: {const: proxy}
        url: {type: string, pattern: '^https?://'}
        orgId: {type: integer}
        isDefault: {type: boolean}
        editable: {type: boolean}
        version: {type: integer}
        basicAuth: {type: boolean}
        jsonData: {type: object}
      allOf:
        - if: {properties: {type: {const: prometheus}}}
          then:
            properties:
              jsonData:
                required: [exemplarTraceIdDestinations]
                properties:
                  httpMethod: {enum: [GET, POST]}
                  timeInterval: {type: string}
                  prometheusType: {const: Prometheus}
                  prometheusVersion: {type: string, pattern: '^\\d+\\.\\d+\\.\\d+$'}
                  exemplarTraceIdDestinations:
                    type: array
                    minItems: 1
                    items:
                      type: object
                      additionalProperties: false
                      required: [name, datasourceUid]
                      properties:
                        name: {type: string}
                        datasourceUid: {type: string}
                        urlDisplayLabel: {type: string}
        - if: {properties: {type: {const: tempo}}}
          then:
            properties:
              jsonData:
                required: [serviceMap, tracesToMetrics]
                properties:
                  nodeGraph: {type: object, properties: {enabled: {type: boolean}}}
                  serviceMap:
                    type: object
                    additionalProperties: false
                    required: [datasourceUid]
                    properties: {datasourceUid: {type: string}}
                  tracesToMetrics:
                    type: object
                    required: [datasourceUid]
                    properties:
                      datasourceUid: {type: string}
                      queries:
                        type: array
                        items:
                          type: object
                          additionalProperties: false
                          required: [name, query]
                          properties: {name: {type: string}, query: {type: string}}
"""
)

GRAFANA_PROVIDERS_SCHEMA: Final = yaml_schema(
    """
type: object
additionalProperties: false
required: [apiVersion, providers]
properties:
  apiVersion: {const: 1}
  providers:
    type: array
    minItems: 1
    items:
      type: object
      additionalProperties: false
      required: [name, type, options]
      properties:
        name: {type: string, minLength: 1}
        orgId: {type: integer}
        folder: {type: string}
        folderUid: {type: string}
        type: {const: file}
        disableDeletion: {type: boolean}
        allowUiUpdates: {type: boolean}
        updateIntervalSeconds: {type: integer, minimum: 1}
        options:
          type: object
          additionalProperties: false
          required: [path]
          properties:
            path: {type: string, pattern: ^/}
            foldersFromFilesStructure: {type: boolean}
"""
)

DASHBOARD_SCHEMA: Final = yaml_schema(
    """
$defs:
  datasource:
    type: object
    additionalProperties: false
    required: [type, uid]
    properties: {type: {type: string}, uid: {type: string, minLength: 1}}
  gridPos:
    type: object
    additionalProperties: false
    required: [h, w, x, y]
    properties:
      h: {type: integer, minimum: 1}
      w: {type: integer, minimum: 1, maximum: 24}
      x: {type: integer, minimum: 0, maximum: 23}
      y: {type: integer, minimum: 0}
  target:
    type: object
    required: [refId, datasource]
    properties:
      refId: {type: string, pattern: '^[A-Z]$'}
      datasource: {$ref: '#/$defs/datasource'}
      expr: {type: string, minLength: 1}
      query: {type: string, minLength: 1}
      legendFormat: {type: string}
      exemplar: {type: boolean}
      range: {type: boolean}
      instant: {type: boolean}
      queryType: {type: string}
      limit: {type: integer, minimum: 1}
    oneOf: [{required: [expr]}, {required: [query]}]
  panel:
    type: object
    required: [id, type, title, gridPos]
    properties:
      id: {type: integer, minimum: 1}
      type: {enum: [row, timeseries, stat, gauge, bargauge, table, barchart, heatmap, histogram,
                    piechart, state-timeline, text, traces, nodeGraph]}
      title: {type: string, minLength: 1}
      description: {type: string}
      gridPos: {$ref: '#/$defs/gridPos'}
      datasource: {$ref: '#/$defs/datasource'}
      targets: {type: array, items: {$ref: '#/$defs/target'}}
      panels: {type: array, items: {$ref: '#/$defs/panel'}}
      collapsed: {type: boolean}
      fieldConfig:
        type: object
        required: [defaults, overrides]
        properties: {defaults: {type: object}, overrides: {type: array}}
      options: {type: object}
    if: {properties: {type: {const: row}}}
    then: {required: [panels, collapsed], not: {required: [targets]}}
    else:
      required: [datasource, targets, fieldConfig, options]
      properties: {targets: {minItems: 1}}
  variable:
    type: object
    required: [name, type]
    properties:
      name: {type: string, pattern: '^\\w+$'}
      type: {enum: [query, custom, interval, datasource, constant]}
      datasource: {$ref: '#/$defs/datasource'}
      multi: {type: boolean}
      includeAll: {type: boolean}
type: object
required: [uid, title, schemaVersion, panels, time, templating]
properties:
  id: {type: [integer, "null"]}
  uid: {type: string, pattern: '^[a-zA-Z0-9_-]{1,40}$'}
  title: {type: string, minLength: 1}
  tags: {type: array, items: {type: string}}
  schemaVersion: {type: integer, minimum: 36, maximum: 42}
  refresh: {type: string, pattern: <DURATION>}
  editable: {type: boolean}
  time:
    type: object
    required: [from, to]
    properties: {from: {type: string}, to: {type: string}}
  templating:
    type: object
    required: [list]
    properties: {list: {type: array, items: {$ref: '#/$defs/variable'}}}
  panels: {type: array, minItems: 1, items: {$ref: '#/$defs/panel'}}
""",
    DURATION=PROMETHEUS_DURATION,
)


def compose_spec_schema() -> dict[str, Any]:
    """The Compose Specification's schema, as vendored by check-jsonschema."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return as_map(json.loads(vendor.joinpath("compose-spec.json").read_text("utf-8")), "schema")


# == tests: docker-compose.yml ====================================================================


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = compose_spec_schema()
    assert schema["title"] == "Compose Specification"
    for environ in ({}, {"OPENAI_API_KEY": "sk-local", "OPENAI_BASE_URL": "http://x:1/v1"}):
        assert schema_errors(compose(environ), schema) == []


def test_compose_interpolation_is_well_formed() -> None:
    for where, text in walk_strings(compose_raw()):
        try:
            interpolate(text, {})
        except ValueError as exc:  # a stray "$": Compose refuses the file
            pytest.fail(f"{where}: {exc}")
    # and the interpolation here behaves like Compose's
    assert interpolate("${A:-x}-${B-y}-$$-${C:+z}", {"A": "", "C": "1"}) == "x-y-$-z"
    with pytest.raises(ValueError, match="needed"):
        interpolate("${A:?needed}", {})


def test_compose_has_every_service_of_the_stack() -> None:
    missing = set(REQUIRED_SERVICES) - set(services())
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_images_are_pinned_and_the_gateway_is_built_from_the_repository() -> None:
    for name, svc in services().items():
        assert "image" in svc, f"{name}: name its image (with a tag)"
        _, tag, digest = image_reference(as_str(svc["image"], f"{name}.image"))
        assert tag or digest, f"{name}: {svc['image']} has no tag"
        assert tag != "latest", f"{name}: {svc['image']} is not pinned"
        if "build" not in svc:
            assert tag is None or re.search(r"\d", tag), f"{name}: {tag} is not a version"
    gateway = service("gateway")
    build = gateway["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context).resolve() == ROOT
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert image_reference(gateway["image"]) == ("qna-gateway", project_version(), None)
    postgres_name, postgres_tag, _ = image_reference(service("postgres")["image"])
    assert postgres_name == "postgres"
    assert postgres_tag is not None
    assert postgres_tag.split(".")[0] == "16"


def test_gateway_and_postgres_have_healthchecks_that_gate_start_up() -> None:
    settings = gateway_settings()
    for name in ("gateway", "postgres", *(n for n, s in services().items() if "healthcheck" in s)):
        check = as_map(service(name).get("healthcheck"), f"{name}.healthcheck")
        assert not check.get("disable", False), f"{name}: healthcheck disabled"
        test = as_list(check["test"], f"{name}.healthcheck.test")
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: test must start with CMD or CMD-SHELL"
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert go_duration(str(check[key])) > timedelta(0)
        assert go_duration(check["timeout"]) < go_duration(check["interval"]) + timedelta(seconds=1)
    gateway_check = " ".join(service("gateway")["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.port}/ready" in gateway_check, gateway_check
    assert "pg_isready" in " ".join(service("postgres")["healthcheck"]["test"])


def test_dependencies_exist_use_conditions_and_have_no_cycle() -> None:
    all_services = services()
    graph: dict[str, set[str]] = {}
    for name, svc in all_services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on in long form, with conditions"
        graph[name] = set(depends)
        for dependency, spec in depends.items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            condition = as_map(spec, f"{name}.depends_on.{dependency}")["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dependency], (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )
    assert service("gateway")["depends_on"]["postgres"]["condition"] == "service_healthy"

    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in visiting, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        visiting.add(name)
        for dependency in graph[name]:
            visit(dependency, (*path, name))
        visiting.remove(name)
        done.add(name)

    for name in graph:
        visit(name, ())


def test_services_restart_and_the_gateway_stops_gracefully() -> None:
    for name, svc in services().items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
    settings = gateway_settings()
    grace = go_duration(service("gateway")["stop_grace_period"])
    assert grace > timedelta(seconds=settings.drain_seconds), (
        "stop_grace_period must leave the gateway time to drain (QNA_DRAIN_SECONDS)"
    )


def test_ports_are_published_on_loopback_only() -> None:
    published_on_host: dict[int, str] = {}
    for name, svc in services().items():
        for mapping in port_mappings(svc):
            assert mapping.host_ip == "127.0.0.1", (
                f"{name}: publish {mapping.target} on 127.0.0.1 only (Grafana is anonymous Admin)"
            )
            assert mapping.published is not None, (
                f"{name}: publish {mapping.target} on a fixed port"
            )
            other = published_on_host.get(mapping.published)
            assert other is None, f"{name} and {other} both publish {mapping.published}"
            published_on_host[mapping.published] = name
    for name, ports in PUBLISHED_PORTS.items():
        assert ports <= container_ports(name), f"{name} must publish {sorted(ports)}"
    assert gateway_settings().port in container_ports("gateway")


def test_volumes_are_declared_used_and_bind_mounts_exist() -> None:
    declared = set(as_map(compose().get("volumes") or {}, "volumes"))
    used: set[str] = set()
    for name, svc in services().items():
        for mount in mounts(svc):
            if mount.kind == "volume":
                assert mount.source in declared, f"{name}: volume {mount.source} is not declared"
                used.add(mount.source)
            elif mount.kind == "bind":
                assert mount.host_path.exists(), f"{name}: {mount.source} does not exist"
                assert mount.host_path.is_relative_to(ROOT), f"{name}: mounts outside the repo"
                assert mount.read_only, f"{name}: mount {mount.source} read-only (:ro)"
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"
    assert mount_for("postgres", "/var/lib/postgresql/data")[0].kind == "volume"
    for config in (COLLECTOR_CONFIG, TEMPO_CONFIG, PROMETHEUS_CONFIG, DATASOURCES, DASHBOARD):
        holders = [
            name
            for name, svc in services().items()
            for mount in mounts(svc)
            if mount.kind == "bind" and config.is_relative_to(mount.host_path)
        ]
        assert holders, f"{config.relative_to(ROOT)} is mounted by no service"


def test_config_files_are_the_ones_the_services_read() -> None:
    assert host_file("otel-collector", command_flag("otel-collector", "--config")) == (
        COLLECTOR_CONFIG
    )
    assert host_file("tempo", command_flag("tempo", "-config.file")) == TEMPO_CONFIG
    assert host_file("prometheus", command_flag("prometheus", "--config.file")) == (
        PROMETHEUS_CONFIG
    )
    assert host_file("grafana", "/etc/grafana/provisioning") == GRAFANA_PROVISIONING
    home = environment(service("grafana"))["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_file("grafana", home) == DASHBOARD
    # Tempo and Prometheus keep their data in named volumes.
    tsdb = command_flag("prometheus", "--storage.tsdb.path")
    assert mount_for("prometheus", tsdb)[0].kind == "volume"
    trace_storage = tempo()["storage"]["trace"]
    for path in (trace_storage["wal"]["path"], trace_storage["local"]["path"]):
        assert mount_for("tempo", path)[0].kind == "volume", path


def test_prometheus_keeps_exemplars_and_accepts_tempo_remote_write() -> None:
    args = command_args("prometheus")
    features = {
        feature
        for arg in args
        if arg.startswith("--enable-feature=")
        for feature in arg.split("=", 1)[1].split(",")
    }
    assert "exemplar-storage" in features
    assert "--web.enable-remote-write-receiver" in args


def test_grafana_is_anonymous_admin_for_local_use() -> None:
    env = environment(service("grafana"))
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Admin"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert PUBLISHED_PORTS["grafana"] <= container_ports("grafana")


def test_gateway_environment_uses_the_gateway_real_variable_names() -> None:
    env = environment(service("gateway"))
    read_by_settings = set(re.findall(r"\(\s*\"([A-Z][A-Z0-9_]+)\"", SETTINGS_SOURCE.read_text()))
    assert {"DATABASE_URL", "OPENAI_API_KEY", "QNA_LOG_FORMAT"} <= read_by_settings
    unknown = {name for name in env if name not in read_by_settings | OTEL_VARIABLES}
    assert not unknown, f"the gateway reads no {sorted(unknown)}"
    for name, value in GATEWAY_ENV_REQUIRED.items():
        assert env.get(name) == value, f"gateway {name}={env.get(name)!r}, expected {value!r}"
    raw_env = environment(compose_raw()["services"]["gateway"])
    for name in GATEWAY_ENV_PASS_THROUGH:
        assert raw_env.get(name) == f"${{{name}:-}}", f"{name} passes through from the host"


def test_gateway_environment_is_wired_to_the_other_services() -> None:
    env = environment(service("gateway"))
    database = urlsplit(env["DATABASE_URL"])
    postgres_env = environment(service("postgres"))
    assert database.hostname == "postgres"
    assert (database.port or 5432) == 5432
    assert database.username == postgres_env["POSTGRES_USER"]
    assert database.password == postgres_env["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otel-collector"
    protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    receiver = "http" if protocol == "http/protobuf" else "grpc"
    receiver_endpoint = collector()["receivers"]["otlp"]["protocols"][receiver]["endpoint"]
    assert port == host_port(receiver_endpoint)[1], (
        "the gateway exports where the collector listens"
    )


def test_gateway_settings_accept_the_compose_environment() -> None:
    extractive = gateway_settings({})
    assert not extractive.llm_configured, "with nothing set on the host: extractive mode"
    assert extractive.database_url is not None
    assert urlsplit(extractive.database_url.reveal()).hostname == "postgres"
    assert extractive.log_format == "json"
    assert extractive.host == ALL_INTERFACES
    with_llm = gateway_settings(
        {"OPENAI_API_KEY": "sk-local-test", "QNA_MODEL": "gpt-4o-mini", "OPENAI_BASE_URL": ""}
    )
    assert with_llm.llm_configured
    assert with_llm.openai_api_key is not None
    assert with_llm.openai_api_key.reveal() == "sk-local-test"


def test_no_secret_is_written_in_the_compose_file() -> None:
    for name, svc in as_map(compose_raw()["services"], "services").items():
        for key, value in environment(svc).items():
            if not SECRET_LOOKING_NAME.search(key) or value == f"${{{key}:-}}":
                continue
            if "://" in value:
                password = urlsplit(value).password
                assert password is None or password in LOCAL_DEV_SECRET_VALUES, f"{name}.{key}"
            else:
                assert value in LOCAL_DEV_SECRET_VALUES, f"{name}.{key} holds a real-looking secret"


# == tests: OpenTelemetry Collector ===============================================================


def test_collector_config_matches_its_schema() -> None:
    config = collector()
    assert schema_errors(config, COLLECTOR_SCHEMA) == []
    for section in ("receivers", "processors", "exporters", "extensions"):
        for component, settings in (config.get(section) or {}).items():
            kind = component.split("/")[0]
            assert kind in COLLECTOR_COMPONENT_SCHEMAS, f"{section}.{component}: not described here"
            assert schema_errors(settings, COLLECTOR_COMPONENT_SCHEMAS[kind]) == [], component


def test_collector_pipelines_reference_defined_components() -> None:
    config = collector()
    pipelines = as_map(config["service"]["pipelines"], "pipelines")
    connectors = set(config.get("connectors") or {})
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline_name, pipeline in pipelines.items():
        for section in used:
            defined = set(config.get(section) or {})
            if section != "processors":
                defined |= connectors
            for component in pipeline.get(section, []):
                assert component in defined, f"{pipeline_name}: {section} {component} undefined"
                used[section].add(component)
        processors = pipeline.get("processors", [])
        if "memory_limiter" in processors:
            assert processors[0] == "memory_limiter", "memory_limiter comes first"
    for section, names in used.items():
        unused = set(config.get(section) or {}) - names
        assert not unused, f"{section} defined but in no pipeline: {sorted(unused)}"
    extensions = set(config["service"].get("extensions", []))
    assert extensions <= set(config.get("extensions") or {})
    assert set(config.get("extensions") or {}) <= extensions, "an extension is not enabled"


def test_collector_receives_otlp_and_exports_traces_to_tempo() -> None:
    config = collector()
    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    assert "batch" in traces.get("processors", [])
    protocols = config["receivers"]["otlp"]["protocols"]
    for protocol, port in (("grpc", 4317), ("http", 4318)):
        host, listen = host_port(protocols[protocol]["endpoint"])
        assert (host, listen) == (ALL_INTERFACES, port), f"otlp {protocol}: listen on all, {port}"
        assert port in container_ports("otel-collector")
    health = config["extensions"]["health_check"]["endpoint"]
    assert host_port(health)[1] in container_ports("otel-collector")

    exporters = traces["exporters"]
    assert any(exporter.split("/")[0] == "debug" for exporter in exporters)
    to_tempo = [e for e in exporters if e.split("/")[0] in ("otlp_grpc", "otlp")]
    assert len(to_tempo) == 1, "one OTLP gRPC exporter, to Tempo"
    exporter = config["exporters"][to_tempo[0]]
    host, port = host_port(exporter["endpoint"])
    tempo_grpc = tempo()["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host == "tempo"
    assert host in services()
    assert port == host_port(tempo_grpc)[1]
    assert exporter["tls"]["insecure"] is True, "Tempo's receiver is plaintext inside compose"


# == tests: Tempo =================================================================================


def test_tempo_config_matches_its_schema_and_stores_locally() -> None:
    config = tempo()
    assert schema_errors(config, TEMPO_SCHEMA) == []
    assert config["storage"]["trace"]["backend"] == "local"
    assert config["usage_report"]["reporting_enabled"] is False
    for protocol in ("grpc", "http"):
        endpoint = config["distributor"]["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
        assert host_port(endpoint)[0] == ALL_INTERFACES, f"Tempo's {protocol} receiver: all"
    assert config["server"]["http_listen_port"] in container_ports("tempo")
    for path in (
        config["metrics_generator"]["storage"]["path"],
        config["metrics_generator"]["traces_storage"]["path"],
    ):
        assert mount_for("tempo", path)[0].kind == "volume", path
    assert go_duration(config["compactor"]["compaction"]["block_retention"]) >= timedelta(hours=1)


def test_tempo_metrics_generator_feeds_prometheus() -> None:
    config = tempo()
    processors = config["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert {"service-graphs", "span-metrics"} <= set(processors), "Grafana's service map needs both"
    (remote_write,) = config["metrics_generator"]["storage"]["remote_write"]
    url = urlsplit(remote_write["url"])
    assert url.hostname == "prometheus"
    assert url.port in container_ports("prometheus")
    assert url.path == "/api/v1/write"
    assert "--web.enable-remote-write-receiver" in command_args("prometheus")


# == tests: Prometheus ============================================================================


def test_prometheus_config_matches_its_schema() -> None:
    config = prometheus()
    assert schema_errors(config, PROMETHEUS_SCHEMA) == []
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), "job names are unique"
    global_interval = prometheus_duration(config["global"]["scrape_interval"])
    global_timeout = prometheus_duration(config["global"].get("scrape_timeout", "10s"))
    for job in config["scrape_configs"]:
        interval = global_interval
        if "scrape_interval" in job:
            interval = prometheus_duration(job["scrape_interval"])
        timeout = min(global_timeout, interval)
        if "scrape_timeout" in job:
            timeout = prometheus_duration(job["scrape_timeout"])
        assert timeout <= interval, f"{job['job_name']}: scrape_timeout > scrape_interval"


def test_prometheus_scrapes_the_gateway_every_5s_with_openmetrics() -> None:
    job = gateway_scrape_config()
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"gateway:{gateway_settings().port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    assert prometheus_duration(job["scrape_interval"]) == timedelta(seconds=5)
    # Exemplars exist only in the OpenMetrics exposition: ask for it first.
    assert job["scrape_protocols"][0].startswith("OpenMetricsText")
    labels = {k for group in job["static_configs"] for k in group.get("labels", {})}
    assert labels <= TARGET_LABELS


def test_every_scrape_target_is_a_compose_service_port() -> None:
    for job in prometheus()["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, port = host_port(target)
                if host == "localhost":
                    assert port in container_ports("prometheus"), target
                    continue
                assert host in services(), f"{job['job_name']}: {host} is no compose service"
                listening = container_ports(host)
                if host == "tempo":
                    listening.add(tempo()["server"]["http_listen_port"])
                assert port in listening, f"{target}: {host} does not listen on {port}"


# == tests: Grafana provisioning ==================================================================


def test_grafana_datasources_match_their_schema_and_the_stack() -> None:
    document = load_yaml(DATASOURCES)
    assert schema_errors(document, GRAFANA_DATASOURCES_SCHEMA) == []
    sources = as_list(document["datasources"], "datasources")
    assert len({s["uid"] for s in sources}) == len(sources), "uids are unique"
    assert len({s["name"] for s in sources}) == len(sources), "names are unique"
    assert sum(bool(s.get("isDefault")) for s in sources) == 1, "exactly one default"
    for source in sources:
        host, port = host_port(source["url"])
        assert host in services(), f"{source['name']}: {host} is no compose service"
        assert port in container_ports(host), f"{source['name']}: {host} does not listen on {port}"
    prom = datasource_of_type("prometheus")
    assert prom["jsonData"]["timeInterval"] == gateway_scrape_config()["scrape_interval"]
    _, prometheus_tag, _ = image_reference(service("prometheus")["image"])
    assert prom["jsonData"]["prometheusVersion"] == (prometheus_tag or "").lstrip("v")
    assert host_port(datasource_of_type("tempo")["url"])[1] == tempo()["server"]["http_listen_port"]


def test_grafana_links_exemplars_to_tempo_and_traces_to_prometheus() -> None:
    prom, tempo_source = datasource_of_type("prometheus"), datasource_of_type("tempo")
    destinations = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert {(d["name"], d["datasourceUid"]) for d in destinations} == {
        (EXEMPLAR_TRACE_LABEL, tempo_source["uid"])
    }
    assert tempo_source["jsonData"]["serviceMap"]["datasourceUid"] == prom["uid"]
    traces_to_metrics = tempo_source["jsonData"]["tracesToMetrics"]
    assert traces_to_metrics["datasourceUid"] == prom["uid"]
    for query in traces_to_metrics.get("queries", []):
        # In provisioning files Grafana expands $NAME: the queries write $$__tags for $__tags.
        promql = query["query"].replace("$$", "$").replace("$__tags", 'service="qna-gateway"')
        parse_promql(promql)


def test_grafana_provisioning_has_no_accidental_variable_expansion() -> None:
    for path in (DATASOURCES, DASHBOARD_PROVIDERS):
        for where, text in walk_strings(load_yaml(path)):
            assert "$" not in text.replace("$$", ""), (
                f"{path.name}{where}: Grafana would expand $ from its environment; write $$"
            )


def test_grafana_dashboard_provider_loads_the_dashboards_folder() -> None:
    document = load_yaml(DASHBOARD_PROVIDERS)
    assert schema_errors(document, GRAFANA_PROVIDERS_SCHEMA) == []
    for provider in document["providers"]:
        assert host_file("grafana", provider["options"]["path"]) == DASHBOARDS
    assert sorted(DASHBOARDS.glob("*.json")) == [DASHBOARD]


# == tests: the dashboard =========================================================================


def test_dashboard_matches_its_schema() -> None:
    board = dashboard()
    assert schema_errors(board, DASHBOARD_SCHEMA) == []
    assert 38 <= board["schemaVersion"] <= 41


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard_panels(dashboard())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than the dashboard"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    titles = [panel["title"] for panel in panels if panel["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles are unique"


def test_dashboard_datasources_are_the_provisioned_ones() -> None:
    sources = datasources()
    board = dashboard()
    refs: list[tuple[str, Mapping[str, Any]]] = []
    for panel in dashboard_panels(board):
        if panel["type"] == "row":
            continue
        refs.append((panel["title"], panel["datasource"]))
        for target in panel["targets"]:
            refs.append((f"{panel['title']}/{target['refId']}", target["datasource"]))
            assert target["datasource"] == panel["datasource"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: duplicate refIds"
    for variable in board["templating"]["list"]:
        if "datasource" in variable:
            refs.append((f"variable {variable['name']}", variable["datasource"]))
    for where, ref in refs:
        assert ref["uid"] in sources, f"{where}: no provisioned datasource {ref['uid']!r}"
        assert sources[ref["uid"]]["type"] == ref["type"], f"{where}: datasource type differs"


def test_every_target_has_an_expression_in_its_datasource_language() -> None:
    for panel in dashboard_panels(dashboard()):
        for target in panel.get("targets", []):
            kind = target["datasource"]["type"]
            where = f"{panel['title']}/{target['refId']}"
            if kind == "prometheus":
                assert target.get("expr", "").strip(), f"{where}: no PromQL"
                assert "query" not in target, where
            else:
                assert kind == "tempo", where
                query = target.get("query", "")
                assert target.get("queryType") == "traceql", where
                assert query.count("{") == query.count("}") > 0, f"{where}: not TraceQL"
                service_name = environment(service("gateway"))["OTEL_SERVICE_NAME"]
                assert f'resource.service.name = "{service_name}"' in query, where


def test_dashboard_promql_is_valid_and_uses_real_metrics_and_labels() -> None:
    problems = [
        f"{query.where}: {problem}"
        for query in dashboard_promql(dashboard())
        for problem in promql_problems(query.expr, selector_only=query.variable)
    ]
    assert not problems, "\n".join(problems)


def test_dashboard_reads_every_gateway_metric_and_nothing_else() -> None:
    names = dashboard_metric_names(DASHBOARD)
    assert names <= set(GATEWAY_METRICS), f"not exported: {sorted(names - set(GATEWAY_METRICS))}"
    assert names == set(GATEWAY_METRICS), f"no panel: {sorted(set(GATEWAY_METRICS) - names)}"


def _quantile_targets(query: PromQuery) -> list[tuple[float, str]]:
    found: list[tuple[float, str]] = []
    for node in nodes(parse_promql(query.expr)):
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            quantile = node.args[0]
            assert isinstance(quantile, promql_parser.NumberLiteral)
            found.extend(
                (quantile.val, split_histogram_suffix(name)[0])
                for selector in selectors(node.args[1])
                if (name := selector_metric(selector))
            )
    return found


def test_latency_panels_show_p50_p95_p99_with_exemplars() -> None:
    quantiles: dict[str, set[float]] = {}
    for query in dashboard_promql(dashboard()):
        for quantile, histogram in _quantile_targets(query):
            quantiles.setdefault(histogram, set()).add(quantile)
            assert query.exemplar, f"{query.where}: latency targets show exemplars (trace links)"
    histograms = {name for name, spec in GATEWAY_METRICS.items() if spec.kind == "histogram"}
    assert set(quantiles) == histograms
    for histogram, found in quantiles.items():
        assert {0.5, 0.95, 0.99} <= found, f"{histogram}: p50, p95 and p99"


def test_dashboard_shows_errors_by_class_pool_limits_and_traces() -> None:
    status_regexes: set[str] = set()
    pool_states: set[str] = set()
    for query in dashboard_promql(dashboard()):
        for selector in selectors(parse_promql(query.expr)):
            for matcher in selector.matchers.matchers:
                if selector_metric(selector) == "http_requests_total" and matcher.name == "status":
                    status_regexes.add(matcher.value)
                if selector_metric(selector) == "db_pool_connections" and matcher.name == "state":
                    pool_states.update(matcher.value.split("|"))
    assert {"5..", "4.."} <= status_regexes, "error rate shows 5xx and 4xx"
    assert {"size", "idle", "waiting", "max"} <= pool_states, "pool usage against its maximum"
    tempo_panels = [
        panel
        for panel in dashboard_panels(dashboard())
        if panel.get("datasource", {}).get("type") == "tempo"
    ]
    assert tempo_panels, "a panel lists the gateway's traces"


# == tests: the checks themselves ================================================================


def test_dashboard_metric_names_parses_instead_of_scanning(tmp_path: Path) -> None:
    prom = {"type": "prometheus", "uid": "prometheus"}
    board = {
        "panels": [
            {
                "id": 1,
                "type": "row",
                "collapsed": True,
                "panels": [
                    {
                        "id": 2,
                        "type": "timeseries",
                        "targets": [
                            {
                                "refId": "A",
                                "datasource": prom,
                                "expr": "histogram_quantile(0.9, sum by (le, endpoint) "
                                '(rate(http_request_duration_seconds_bucket{endpoint=~"$endpoint"}'
                                "[$__rate_interval])))",
                            }
                        ],
                    }
                ],
            },
            {
                "id": 3,
                "type": "timeseries",
                "targets": [
                    {"refId": "A", "datasource": prom, "expr": '{__name__="sse_open_streams"}'},
                    {
                        "refId": "B",
                        "datasource": prom,
                        "expr": 'sum by (status) (rate(llm_calls_total{status="error"}[5m]))'
                        " / on (status) group_left sum by (status) (rate(turns_total[5m]))",
                    },
                    {"refId": "C", "datasource": {"type": "tempo", "uid": "t"}, "query": "{}"},
                ],
            },
        ],
        "templating": {
            "list": [
                {
                    "name": "state",
                    "type": "query",
                    "query": {"query": "label_values(db_pool_connections, state)"},
                }
            ]
        },
    }
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(board), encoding="utf-8")
    assert dashboard_metric_names(path) == {
        "http_request_duration_seconds",
        "sse_open_streams",
        "llm_calls_total",
        "turns_total",
        "db_pool_connections",
    }


BAD_EXPRESSIONS: Final = [
    ("sum(rate(sse_open_streams[5m]))", "rate() of a gauge"),
    ("sum(http_requests_total)", "without rate()"),
    (
        "histogram_quantile(0.9, sum by (endpoint) "
        "(rate(http_request_duration_seconds_bucket[5m])))",
        "keep the le label",
    ),
    ("histogram_quantile(1.5, sum by (le) (rate(llm_call_duration_seconds_bucket[5m])))", "(0, 1]"),
    ('sum(rate(http_requests_total{route="/v1/chats"}[5m]))', "no label 'route'"),
    ('sum(rate(llm_calls_total{status="failed"}[5m]))', "'failed' never occurs"),
    ('sum(db_pool_connections{state=~"used|max"})', "'used' never occurs"),
    ("sum(rate(llm_call_duration_seconds[5m]))", "a histogram"),
    ("sum(rate(chat_sessions_total_count[5m]))", "no _count series"),
    ("sum(rate(requests_total[5m]))", "not a metric the gateway exports"),
    # Prometheus regexes are RE2: no lookaround (the parser refuses them as Prometheus does).
    ('sum(rate(http_requests_total{endpoint=~"(?!/health).*"}[5m]))', "illegal regex"),
    ("sum by (reason) (rate(turns_total[5m]))", "grouped by labels its series lack"),
    ("sum(rate(http_requests_total[5m])", "does not parse"),
]


@pytest.mark.parametrize(("expr", "problem"), BAD_EXPRESSIONS)
def test_promql_checks_catch_mistakes(expr: str, problem: str) -> None:
    problems = promql_problems(expr)
    assert any(problem in found for found in problems), problems


def test_promql_checks_accept_sound_expressions() -> None:
    sound = [
        "sum by (method, endpoint) "
        '(rate(http_requests_total{endpoint=~"$endpoint"}[$__rate_interval]))',
        "sum(rate(llm_call_duration_seconds_sum[5m]))"
        " / sum(rate(llm_call_duration_seconds_count[5m]))",
        'max_over_time(sum(db_pool_connections{state="waiting"})[10m:1m])',
        "sum(increase(sse_disconnects_total[1h])) by (reason)",
    ]
    for expr in sound:
        assert promql_problems(expr) == [], expr
