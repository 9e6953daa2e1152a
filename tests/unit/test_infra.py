"""infra/ cannot run here (no Docker, no Kubernetes): check its files parse, hang together, and use the
Airflow settings that tests/integration/test_celery.py proved on a real Redis + PostgreSQL."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import BIN, REPO
from tests.integration.test_celery import celery_settings

INFRA = REPO / "infra"
PROVEN = celery_settings("postgresql+psycopg://u:p@h/db", "redis://h:6379/0", "http://h:8080/execution/", "s")


def test_compose_services_use_the_proven_celery_settings():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "airflow-api-server", "airflow-scheduler",
            "airflow-dag-processor", "airflow-worker", "dask-scheduler", "dask-worker", "amaas-serve"} <= set(services)
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"):
        env = services[name]["environment"]
        assert set(PROVEN) <= set(env), (name, set(PROVEN) - set(env))
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    commands = {name: s["command"][:3] for name, s in services.items() if isinstance(s.get("command"), list)}
    assert commands["airflow-worker"] == ["airflow", "celery", "worker"]
    for program in ("airflow", "dask"):  # the commands the services run exist in the project's environment
        assert (BIN / program).is_file(), program
    assert "/readyz'" in services["amaas-serve"]["healthcheck"]["test"][-1]


def test_kubernetes_manifests_hang_together():
    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "amaas", doc["metadata"]
    secret_keys = {name: set(secret["stringData"]) for name, secret in by_kind["Secret"].items()}
    workloads = {**by_kind["Deployment"], **by_kind["StatefulSet"]}
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]
    for name, workload in workloads.items():
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"][
            "labels"].items(), name
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["key"] in secret_keys.get(ref["name"], set()), (name, ref)
            for source in container.get("envFrom", []):
                assert "secretRef" not in source or source["secretRef"]["name"] in secret_keys, (name, source)
    for name, service in by_kind["Service"].items():  # every Service selects a workload that exists
        assert any(service["spec"]["selector"].items() <= lab.items() for lab in labels), name
    airflow_env = {e["name"] for e in workloads["airflow-worker"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = by_kind["ConfigMap"]["amaas-config"]["data"]
    assert set(PROVEN) <= airflow_env | set(config), set(PROVEN) - airflow_env - set(config)
    serve = workloads["amaas-serve"]["spec"]
    assert serve["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert serve["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    scraped = serve["template"]["metadata"]["annotations"]  # Prometheus scrapes each pod's /metrics
    assert scraped["prometheus.io/scrape"] == "true" and scraped["prometheus.io/path"] == "/metrics"
    assert int(scraped["prometheus.io/port"]) == serve["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]


def _serve_port(service: dict) -> int:
    """The port `amaas serve --port P` listens on in a service's command."""
    command = service["command"]
    return int(command[command.index("--port") + 1])


def _haproxy_directives(text: str) -> list[list[str]]:
    return [line.split("#")[0].split() for line in text.splitlines() if line.split("#")[0].strip()]


def test_compose_serving_fleet_scales_behind_haproxy_on_the_shared_state():
    """`--scale amaas-serve=N`: the replicas publish no port (N would collide), take the state URLs from .env, and
    haproxy finds each one through Docker's DNS and checks /readyz."""
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    serve, haproxy = services["amaas-serve"], services["haproxy"]
    assert "ports" not in serve and "container_name" not in serve
    assert serve["command"][:2] == ["amaas", "serve"] and "--host" in serve["command"]
    fleet_env = ("AMAAS_STATE_URL", "AMAAS_REDIS_URL", "AMAAS_ARTIFACTS_URL")
    example = (INFRA / ".env.example").read_text()
    for name in fleet_env:
        assert serve["environment"][name] == "${" + name + "}", name
        assert f"\n{name}=" in "\n" + example, name
    assert "postgresql" in example.split("AMAAS_STATE_URL=")[1].split("\n")[0]
    assert example.split("AMAAS_REDIS_URL=")[1].startswith("redis://")
    assert serve["working_dir"] in serve["tmpfs"]  # an empty folder of its own, shared with no replica
    assert {"postgres", "redis"} <= set(serve["depends_on"])

    name, _, tag = haproxy["image"].rpartition(":")
    assert name == "haproxy" and tag.startswith("2.6.") and tag.split(".")[2].isdigit(), haproxy["image"]
    assert _host_ports(haproxy) == [("0.0.0.0", 3000)]  # noqa: S104 (the model API's published port)
    source, target = haproxy["volumes"][0].split(":")[:2]
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"  # where the official image reads it
    directives = _haproxy_directives((INFRA / source).read_text())
    found = {tuple(d[:2]): d for d in directives}
    template = next(d for d in directives if d[0] == "server-template")
    assert template[3] == f"amaas-serve:{_serve_port(serve)}"
    assert next(d for d in directives if d[0] == "nameserver")[2].startswith("127.0.0.11:")  # Docker's DNS
    default_server = next(d for d in directives if d[0] == "default-server")
    assert {"check", "resolvers"} <= set(default_server)
    assert found[("option", "httpchk")][2:] == ["GET", "/readyz"]
    assert found[("http-check", "expect")][2:] == ["status", "200"]
    retry_on = next(d for d in directives if d[0] == "retry-on")[1:]
    assert set(retry_on) == {"conn-failure", "503"}  # a request a dead replica held may be logged: not resent
    frontend_port = int(next(d for d in directives if d[0] == "bind")[1].rsplit(":", 1)[1])
    assert frontend_port == 3000


def test_haproxy_accepts_the_compose_configuration():
    from tests.conftest import server_binary

    binary = server_binary("haproxy", "haproxy", also="/usr/sbin/haproxy")
    checked = subprocess.run([binary, "-c", "-f", str(INFRA / "haproxy" / "haproxy.cfg")], capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kubernetes_serving_fleet_takes_the_state_from_a_secret_and_autoscales():
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "40-serving.yaml").read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by_kind[("Deployment", "amaas-serve")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret_name = container["envFrom"][0]["secretRef"]["name"]
    secret = by_kind[("Secret", secret_name)]["stringData"]
    assert {"AMAAS_STATE_URL", "AMAAS_REDIS_URL", "AMAAS_ARTIFACTS_URL"} <= set(secret)
    assert secret["AMAAS_STATE_URL"].startswith("postgresql") and secret["AMAAS_REDIS_URL"].startswith("redis://")
    assert container["command"][:2] == ["amaas", "serve"]
    port = int(container["command"][container["command"].index("--port") + 1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["workingDir"] in mounts  # an emptyDir: the replica's own empty folder

    hpa = by_kind[("HorizontalPodAutoscaler", "amaas-serve")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "amaas-serve"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    # requests in flight per pod: the gauge the Grafana dashboard reads (tests/integration/test_grafana.py)
    assert metrics["Pods"]["pods"]["metric"]["name"] == "bentoml_service_request_in_progress"
    dashboard = (INFRA / "grafana" / "dashboards" / "amaas-serving.json").read_text()
    assert "bentoml_service_request_in_progress" in dashboard


def _host_ports(service: dict) -> list[tuple[str, int]]:
    """(host address, host port) of each published port ("8080:8080", "127.0.0.1:9090:9090")."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) in (2, 3), spec  # a bare container port would publish on a random host port
        out.append((parts[0] if len(parts) == 3 else "0.0.0.0", int(parts[-2])))  # noqa: S104 (compose's default)
    return out


def test_compose_monitoring_is_provisioned_from_files_that_exist():
    """Prometheus scrapes the serving container, Grafana gets the datasource and dashboard from infra/grafana/."""
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount: relative to the compose file's folder
                assert (INFRA / source).exists(), (name, source)
                mounts.setdefault(name, {})[target] = source
            else:
                assert source in compose["volumes"], (name, source)
    published = [port for service in services.values() for port in _host_ports(service)]
    assert len({port for _, port in published}) == len(published), published  # no host port taken twice
    assert _host_ports(services["prometheus"]) == [("127.0.0.1", 9090)]  # no login: loopback only
    assert "${GRAFANA_ADMIN_PASSWORD}" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert "GRAFANA_ADMIN_PASSWORD=" in (INFRA / ".env.example").read_text()

    scrape = yaml.safe_load((INFRA / mounts["prometheus"]["/etc/prometheus/prometheus.yml"]).read_text())
    # every replica of amaas-serve (Docker's DNS answers one address each), on the port its command serves
    discovered = [(c["names"], c["port"]) for job in scrape["scrape_configs"] for c in job["dns_sd_configs"]]
    assert discovered == [(["amaas-serve"], _serve_port(services["amaas-serve"]))]
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"

    grafana = mounts["grafana"]
    provisioning = INFRA / grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards" / "amaas.yaml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert (INFRA / grafana[folder] / "amaas-serving.json").is_file()  # the provider reads the mounted folder
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/amaas-serving.json"
