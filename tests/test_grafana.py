"""The Grafana dashboard under docker/grafana/ and the monitoring services of compose.yaml.

Every metric a panel (or a dashboard variable) queries must be a series that a running server
exposes on ``/metrics``, by the name Prometheus stores it under (a Counter ``x`` as ``x_total``, a
Histogram as ``x_bucket``/``x_count``/``x_sum``). The provisioning files must point Grafana at the
dashboard folder and at the datasource uid the panels use, and compose must mount them. Where a
``prometheus`` binary is installed (Debian's ``prometheus`` package), it scrapes the test server and
runs every query of the dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, fake_engine_info, wait_for
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "teacher-farm.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "teacher-farm.yaml"
PROMETHEUS_CONFIG = GRAFANA / "prometheus.yml"

#: Series Prometheus makes itself for each target: never on /metrics.
PROMETHEUS_OWN = {"up"}
#: What the dashboard exists to show (the issue's list): each must be queried by some panel.
MUST_QUERY = {
    "teacher_farm_tokens_scored_total": "tokens/s",
    "teacher_farm_requests_in_flight": "requests in flight",
    "teacher_farm_queued_tokens": "queue",
    "teacher_farm_errors_total": "errors by kind",
    "teacher_farm_request_seconds_bucket": "latency quantiles",
    "teacher_farm_engine_up": "engine health",
}

# ----------------------------------------------------------------------------- reading PromQL

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_TOKENS = re.compile(
    r"(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<other>\S)"
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's ``$variables`` allowed).

    Strings, label matchers ``{...}``, ranges and subqueries ``[...]``, the label lists of ``by``,
    ``without``, ``on``, ``ignoring`` and ``group_*``, ``offset`` durations and ``@`` times are
    dropped; a name followed by ``(`` is a function or an aggregation, and keywords are no names.
    """
    assert "__name__" not in expr, f"select metrics by name, not by a __name__ matcher: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\S+|@\s*(?:start\(\)|end\(\)|\S+)", " ", text)
    names = set()
    for m in _TOKENS.finditer(text):
        name = m["name"]
        if name is None or name.lower() in _KEYWORDS or name.lower() in ("inf", "nan"):
            continue
        if text[m.end() :].lstrip().startswith("("):
            continue
        if m.start() > 0 and text[m.start() - 1] == "$":
            continue  # a Grafana variable outside a matcher
        names.add(name)
    return names


def variable_query(query: str) -> str:
    """A dashboard variable's query as PromQL: Grafana's ``label_values(selector, label)`` is its selector."""
    return re.sub(r"label_values\(\s*(.*?)\s*,\s*\w+\s*\)\s*$", r"\1", query.strip())


def test_metric_names_reads_promql_as_prometheus_does():
    cases = {
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", le!="+Inf"}[$__rate_interval])))': {
            "a_bucket"
        },
        "sum(rate(b_sum[5m])) / sum(rate(b_count[5m]))": {"b_sum", "b_count"},
        'c{x="y"} or on(instance) (up{x="y"} * 0)': {"c", "up"},
        "time() - d offset 1h": {"d"},
        "max_over_time(e[1h:5m]) > 1e3 and vllm:num_requests_running": {"e", "vllm:num_requests_running"},
        "sum without (pod) (f) unless ignoring(a, b) g * on(i) group_left(k) h": {"f", "g", "h"},
        'label_replace(i, "dst", "$1", "src", "(.*)") or vector(0)': {"i"},
        "sum by(kind) (increase(j_total[$__range]))": {"j_total"},
    }
    for expr, names in cases.items():
        assert metric_names(expr) == names, expr
    assert variable_query('label_values(k{job=~"$job"}, instance)') == 'k{job=~"$job"}'


# ----------------------------------------------------------------------------- the dashboard


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too; rows themselves are no panels."""
    out = []
    for p in board["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def queries(board: dict) -> dict[str, str]:
    """Every PromQL query of the dashboard, keyed by where it is (panel ids are unique, titles need not)."""
    found = {}
    for p in panels(board):
        for t in p["targets"]:
            found[f"panel {p['id']} {p['title']!r} target {t['refId']}"] = t["expr"]
    for v in board.get("templating", {}).get("list", []):
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            found[f"variable {v['name']!r}"] = variable_query(q)
    return found


def queried_metrics(board: dict) -> dict[str, set[str]]:
    """Metric name -> where it is queried."""
    where: dict[str, set[str]] = {}
    for place, expr in queries(board).items():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(place)
    return where


def datasource_uid() -> str:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    return sources[0]["uid"]


def test_every_panel_queries_the_provisioned_datasource():
    board, uid = dashboard(), datasource_uid()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels(board):
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == uid, p["title"]
            assert t["expr"].strip(), p["title"]
            assert metric_names(t["expr"]), f"panel {p['title']!r} queries no metric: {t['expr']}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['title']!r}: refIds repeat"
    for v in board["templating"]["list"]:
        assert v["datasource"]["uid"] == uid, v["name"]
    # Nothing is left out of what the other tests check.
    targets = sum(len(p["targets"]) for p in panels(board))
    assert len(queries(board)) == targets + len(board["templating"]["list"])


def test_the_dashboard_shows_what_the_issue_asks_for():
    where = queried_metrics(dashboard())
    missing = {name: what for name, what in MUST_QUERY.items() if name not in where}
    assert not missing, f"no panel queries {missing}"


def exposed_series(text: str) -> dict[str, float]:
    """Sample name -> value (the last one seen) of a Prometheus text exposition."""
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def scraped(server) -> dict[str, float]:
    """The running server's /metrics after it scored a request and answered an error."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=300) as http:
        r = http.post("/v1/topk", json={"k": 2, "inputs": [{"token_ids": [1, 2, 3, 4, 5]}]})
        assert r.status_code == 200, r.text
        assert http.post("/v1/topk", content=b"{not json").status_code == 400
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    return exposed_series(metrics.text)


@pytest.mark.engine
def test_every_queried_metric_is_on_the_servers_metrics(scraped):
    exposed = set(scraped)
    missing = []
    for name, places in sorted(queried_metrics(dashboard()).items()):
        if name in exposed or name in PROMETHEUS_OWN:
            continue
        near = sorted(e for e in exposed if e.startswith(name + "_") or name.startswith(e))
        hint = f" (the server has {', '.join(near)})" if near else ""
        missing.append(f"{name}{hint}, queried by {', '.join(sorted(places))}")
    assert not missing, "the dashboard queries series the server does not expose:\n" + "\n".join(missing)


@pytest.mark.engine
def test_the_running_servers_health_series(scraped):
    assert scraped["teacher_farm_engine_up"] == 1
    assert scraped["teacher_farm_requests_in_flight"] == 0  # both requests were answered
    assert scraped["teacher_farm_queued_tokens"] == 0
    assert scraped["teacher_farm_tokens_scored_total"] >= 5
    assert scraped["teacher_farm_request_seconds_count"] >= 1


# ----------------------------------------------------------------------------- the gauges, without an engine


class FakeLLM:
    errored = False


class FakeTeacher:
    """A loaded teacher whose scoring waits for ``release``; its engine can be made to die."""

    def __init__(self) -> None:

        self.llm = FakeLLM()
        self.info = fake_engine_info()
        self.release = threading.Event()

    def prepare(self, req):
        return [x.token_ids for x in req.inputs]

    async def score_request(self, req, token_ids):
        import asyncio

        await asyncio.to_thread(self.release.wait, 30)
        return []

    def shutdown(self) -> None:
        self.llm.errored = True


def gauge(client: TestClient, name: str) -> float:
    return exposed_series(client.get("/metrics").text)[name]


def test_engine_up_and_requests_in_flight_follow_the_server(monkeypatch):
    from teacher_farm.server import settings as settings_module
    from teacher_farm.server.app import create_app
    from teacher_farm.server.settings import ServerSettings

    monkeypatch.setattr(settings_module, "_settings", ServerSettings(api_key=None))
    fake, loaded = FakeTeacher(), threading.Event()

    def load():
        loaded.wait(30)
        return fake

    with TestClient(create_app(load)) as client:
        assert client.get("/health").status_code == 503
        assert gauge(client, "teacher_farm_engine_up") == 0  # loading
        loaded.set()
        wait_for(lambda: client.get("/health").status_code == 200, 10, "/health to answer 200", interval=0.05)
        assert gauge(client, "teacher_farm_engine_up") == 1

        answer: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answer.append(
                client.post("/v1/topk", json={"k": 2, "inputs": [{"token_ids": [1, 2, 3]}]})
            )
        )
        request.start()
        try:
            wait_for(
                lambda: gauge(client, "teacher_farm_requests_in_flight") == 1,
                10,
                "one request in flight",
                interval=0.05,
            )
            assert gauge(client, "teacher_farm_queued_tokens") == 3
        finally:
            fake.release.set()
            request.join(30)
        assert answer and answer[0].status_code == 200, answer
        assert gauge(client, "teacher_farm_requests_in_flight") == 0
        assert gauge(client, "teacher_farm_queued_tokens") == 0

        fake.llm.errored = True  # the engine died
        wait_for(
            lambda: gauge(client, "teacher_farm_engine_up") == 0, 10, "engine_up to fall to 0", interval=0.05
        )


# ----------------------------------------------------------------------------- provisioning and compose


def compose_services() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]


def mount(service: dict, source: Path) -> dict:
    """The bind mount of ``source`` (a path of this repository) in a compose service."""
    found = [
        v
        for v in service["volumes"]
        if v["type"] == "bind" and (DOCKER / v["source"]).resolve() == source.resolve()
    ]
    assert len(found) == 1, f"{source.relative_to(ROOT)} is not mounted once"
    assert found[0].get("read_only") is True, f"{source.relative_to(ROOT)} is mounted writable"
    return found[0]


def test_grafana_is_provisioned_with_the_dashboard_and_the_datasource():
    grafana = compose_services()["grafana"]
    provisioning = mount(grafana, GRAFANA / "provisioning")["target"]
    assert provisioning == "/etc/grafana/provisioning", "Grafana reads its provisioning from its conf dir"
    dashboards = mount(grafana, DASHBOARD.parent)["target"]

    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"] == dashboards, "not the folder compose mounts"

    env = dict(e.partition("=")[::2] for e in grafana["environment"])
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{dashboards}/{DASHBOARD.name}"

    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert source["uid"] == dashboard()["panels"][0]["datasource"]["uid"]
    url = httpx.URL(source["url"])
    prometheus = compose_services()["prometheus"]
    assert url.host == "prometheus" and url.port == 9090
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])
    assert "prometheus" in grafana["depends_on"]


def test_prometheus_scrapes_the_teacher_services():
    services = compose_services()
    prometheus = services["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mount(prometheus, PROMETHEUS_CONFIG)["target"] == config_path

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [dns] = job["dns_sd_configs"]
    teachers = {name for name, s in services.items() if "build" in s}  # the teacher-farm images
    assert set(dns["names"]) == teachers == {"teacher", "teacher-cpu"}
    for name in teachers:
        command = services[name]["command"]
        assert int(command[command.index("--port") + 1]) == dns["port"], f"{name} listens elsewhere"

    # The API key reaches the scrape: compose writes it into the file the scrape config names.
    key_file = job["authorization"]["credentials_file"]
    script = prometheus["entrypoint"][2]
    assert f"> {key_file}" in script and "TEACHER_FARM_API_KEY" in script
    assert 'exec /bin/prometheus "$$@"' in script, "the command's flags must reach Prometheus"
    assert "TEACHER_FARM_API_KEY" in prometheus["environment"]
    assert str(Path(key_file).parent) in prometheus["tmpfs"]


def test_monitoring_images_are_pinned_and_optional():
    services = compose_services()
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release tag, not {image!r}"
        assert services[name]["profiles"] == ["monitoring"]
        # Published on the host's loopback only: Grafana lets anonymous viewers in.
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name


# ----------------------------------------------------------------------------- with a real Prometheus


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Grafana sends it with every server selected."""
    for variable, value in {
        "$__rate_interval": "1m",
        "$__range": "1h",
        "$__interval": "15s",
        "$job": ".*",
        "$instance": ".*",
    }.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


@pytest.mark.engine
def test_every_query_runs_in_prometheus(server, scraped, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = config["scrape_configs"][0]
    # Compose's DNS is not here: the same job, pointed at the test server.
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    job["scrape_interval"] = "1s"
    (tmp_path / "api-key").write_text(API_KEY)
    job["authorization"]["credentials_file"] = str(tmp_path / "api-key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr

    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(promql: str) -> dict:
        r = httpx.get(f"{api}/query", params={"query": promql}, timeout=30)
        assert r.status_code == 200, f"{promql}: {r.text}"
        return r.json()["data"]

    def scraped_thrice() -> bool:
        try:
            result = query('count_over_time(up{job="teacher-farm"}[1m])')["result"]
        except (httpx.TransportError, AssertionError):
            return False
        return len(result) == 1 and float(result[0]["value"][1]) >= 3

    try:
        wait_for(scraped_thrice, 60, "Prometheus to scrape the server three times", interval=0.5)
        up = query('up{job="teacher-farm"}')["result"][0]["value"][1]
        assert up == "1", "the scrape fails (the API key?)"
        # A scored request between two scrapes, so that rates are not all zero.
        httpx.post(
            server.url + "/v1/topk",
            json={"k": 2, "inputs": [{"token_ids": [1, 2, 3]}]},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=300,
        ).raise_for_status()
        time.sleep(2.5)
        empty = []
        for place, expr in queries(dashboard()).items():
            if place.startswith("variable"):
                continue
            if not query(grafana_to_promql(expr))["result"]:
                empty.append(f"{place}: {expr}")
        assert not empty, "queries that return nothing:\n" + "\n".join(empty)
        tokens = next(e for e in queries(dashboard()).values() if "teacher_farm_tokens_scored_total" in e)
        assert float(query(grafana_to_promql(tokens))["result"][0]["value"][1]) > 0
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
