"""infra/ cannot run here (no Docker, no Kubernetes): check its files parse, hang together, and use the
Airflow settings that tests/integration/test_celery.py proved on a real Redis + PostgreSQL."""

from __future__ import annotations

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
    assert services["amaas-serve"]["healthcheck"]["test"][-1].endswith("/readyz")


def test_kubernetes_manifests_hang_together():
    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "amaas", doc["metadata"]
    secret_keys = set(by_kind["Secret"]["amaas-secrets"]["stringData"])
    workloads = {**by_kind["Deployment"], **by_kind["StatefulSet"]}
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]
    for name, workload in workloads.items():
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"][
            "labels"].items(), name
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["key"] in secret_keys, (name, ref)
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
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    serve_port = int(services["amaas-serve"]["ports"][0].split(":")[-1])  # the container's port
    assert targets == [f"amaas-serve:{serve_port}"]
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
