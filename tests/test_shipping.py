"""What ships next to the code (issue 13, "Shipping"): the Kubernetes manifests
agree with the container config, the Dockerfile is pinned and layered, the
alert rules pass promtool, the dashboard and the alerts use real metric names,
the README's install leaves a fresh clone clean, and LICENSE and CHANGELOG.md
are there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docs" / "kubernetes"
PROMETHEUS = ROOT / "docs" / "prometheus"
DASHBOARD = ROOT / "docs" / "grafana" / "authproxy.json"
CONTAINER_CONFIG = ROOT / "deploy" / "proxy.container.yaml"
SECRETS_ROOT = "/run/secrets/"
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


# --- helpers -----------------------------------------------------------------


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _container() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CONTAINER_CONFIG.read_text())
    return config


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under docs/kubernetes, found {len(found)}"
    return found[0]


def _configmap_text() -> str:
    text: str = _one("ConfigMap")["data"]["proxy.yaml"]
    return text


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _proxy_container() -> dict[str, Any]:
    (container,) = [c for c in _pod()["containers"] if c["name"] == "authproxy"]
    return container


def _named_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in _proxy_container()["ports"] if p["name"] == port]
    return int(number)


def _file_keys(node: object, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``*_file`` key of a config, with its dotted path."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).endswith("_file") and isinstance(value, str):
                yield where, value
            else:
                yield from _file_keys(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _file_keys(value, f"{path}[{i}]")


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_default_config() -> str:
    env = " ".join(args for word, args in _instructions() if word == "ENV")
    match = re.search(r"AUTHPROXY_CONFIG=(\S+)", env)
    assert match, "the Dockerfile sets no AUTHPROXY_CONFIG"
    return match.group(1)


# --- Kubernetes manifests ------------------------------------------------------


def test_every_manifest_parses_and_the_set_is_complete() -> None:
    docs = _manifests()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "egress", doc["metadata"]
    kinds = {doc["kind"] for doc in docs}
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    readme = (K8S / "README.md").read_text()
    for path in K8S.glob("*.yaml"):
        assert path.name in readme, f"docs/kubernetes/README.md does not mention {path.name}"


def test_the_configmap_is_the_container_config_with_its_ports_and_token_file() -> None:
    container = _container()
    pods = yaml.safe_load(_configmap_text())
    assert pods["listen"] == container["listen"] == "0.0.0.0:8080"
    assert pods["admin"]["listen"] == container["admin"]["listen"] == "0.0.0.0:9090"
    assert pods["admin"]["auth_token_file"] == container["admin"]["auth_token_file"]
    assert container["admin"]["auth_token_file"].startswith(SECRETS_ROOT)
    assert pods["clients"].keys() == container["clients"].keys()
    assert [r["name"] for r in pods["routes"]] == [r["name"] for r in container["routes"]]


def test_container_ports_and_probes_are_the_configs() -> None:
    config = yaml.safe_load(_configmap_text())
    listen, admin = _port(config["listen"]), _port(config["admin"]["listen"])
    container = _proxy_container()
    assert {p["containerPort"] for p in container["ports"]} == {listen, admin}
    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _named_port(get["port"]) == admin, f"{probe} is not on the admin port"
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_mounted_files_are_where_the_config_reads_them() -> None:
    container = _proxy_container()
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    # The config: the ConfigMap as a directory at the path --config names,
    # which is also the image's default.
    config_path = PurePosixPath(container["args"][container["args"].index("--config") + 1])
    assert str(config_path) == _dockerfile_default_config()
    mount = mounts[str(config_path.parent)]
    assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config_path.name in _one("ConfigMap")["data"]

    # Every *_file key (the admin token among them) is a key of a Secret
    # mounted read-only with mode 0400.
    config = yaml.safe_load(_configmap_text())
    files = dict(_file_keys(config))
    assert files["admin.auth_token_file"] == config["admin"]["auth_token_file"]
    for key, value in files.items():
        path = PurePosixPath(value)
        mount = mounts.get(str(path.parent))
        assert mount is not None, f"{key}: nothing is mounted at {path.parent}"
        assert mount.get("readOnly") is True, key
        assert "subPath" not in mount, f"{key}: a subPath mount never sees a rotated secret"
        secret = volumes[mount["name"]]["secret"]
        assert secret["defaultMode"] == 0o400, f"{key}: Secret mode {secret['defaultMode']:o}"
        assert path.name in [item["path"] for item in secret["items"]], key

    # Every ${VAR} the config reads is in the container's environment.
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", _configmap_text()))
    assert wanted <= {e["name"] for e in container.get("env", [])}


def test_the_pods_run_as_the_images_non_root_user_on_a_read_only_root() -> None:
    pod, container = _pod(), _proxy_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001  # else uid 10001 cannot read a 0400 Secret
    user = [args for word, args in _instructions() if word == "USER"][-1]
    assert user.split(":")[0] == "10001"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    grace = yaml.safe_load(_configmap_text())["shutdown_grace"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(grace.rstrip("s")) + int(pre_stop[1])


def test_service_budget_and_policy_select_the_pods_and_let_only_apps_in() -> None:
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    config = yaml.safe_load(_configmap_text())
    listen, admin = _port(config["listen"]), _port(config["admin"]["listen"])

    service = _one("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert [_named_port(p["targetPort"]) for p in service["ports"]] == [listen]

    budget = _one("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in budget or "minAvailable" in budget

    policy = _one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without from lets everyone in"
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert by_port.keys() == {listen, admin}
    for peer in by_port[listen]:
        assert peer["podSelector"]["matchLabels"], "the apps' port is open to unlabelled pods"
    for peer in by_port[admin]:
        assert "podSelector" not in peer
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"
        }


def _check(text: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    """`authproxy check` on a config as the pod sees it: its /run/secrets files
    made (mode 0400) under tmp_path, its ${VARS} set."""
    secrets = tmp_path / name
    local = text.replace(SECRETS_ROOT, f"{secrets}/")
    for _, value in _file_keys(yaml.safe_load(local)):
        path = Path(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder-value\n")
        path.chmod(stat.S_IRUSR)
    config = tmp_path / f"{name}.yaml"
    config.write_text(local)
    env = dict(os.environ)
    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text):
        env[var] = "placeholder"
    return subprocess.run(  # noqa: S603 - our own interpreter and file
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("which", ["deploy/proxy.container.yaml", "the ConfigMap's proxy.yaml"])
def test_the_shipped_container_configs_pass_authproxy_check(which: str, tmp_path: Path) -> None:
    text = CONTAINER_CONFIG.read_text() if which.startswith("deploy") else _configmap_text()
    done = _check(text, tmp_path, "config")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


# --- Dockerfile ----------------------------------------------------------------


def test_the_base_image_is_pinned_by_digest_with_its_tag_in_a_comment() -> None:
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert froms
    comments = "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#")
    )
    for base in froms:
        match = re.fullmatch(r"(\S+?):(\S+)@sha256:[0-9a-f]{64}(\s+AS\s+\S+)?", base, re.I)
        assert match, f"FROM {base} is not pinned by digest"
        assert f"{match.group(1)}:{match.group(2)}" in comments, "the tag is not in a comment"


def test_dependencies_are_installed_in_a_layer_before_the_source() -> None:
    steps = _instructions()
    source = next(i for i, (w, a) in enumerate(steps) if w == "COPY" and a.split()[0] == "proxy")
    deps = [
        i
        for i, (w, a) in enumerate(steps[:source])
        if w == "RUN" and "pip install" in a and "-r " in a
    ]
    assert deps, "no pip install of the dependencies before COPY proxy"
    copied = [a for w, a in steps[: deps[0]] if w == "COPY"]
    assert all("proxy" not in a.split()[:-1] for a in copied)
    after = [a for w, a in steps[source:] if w == "RUN" and "pip install" in a]
    assert after and all("--no-deps" in a for a in after), "the source layer reinstalls deps"


def test_the_image_runs_the_container_config_and_checks_healthz() -> None:
    steps = _instructions()
    default = _dockerfile_default_config()
    copies = [a.split() for w, a in steps if w == "COPY"]
    assert ["deploy/proxy.container.yaml", default] in copies
    cmd = json.loads(next(a for w, a in reversed(steps) if w == "CMD"))
    assert cmd[cmd.index("--config") + 1] == default

    (health,) = [a for w, a in steps if w == "HEALTHCHECK"]
    env = " ".join(a for w, a in steps if w == "ENV")
    url = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", health + " " + env)
    assert url, "the HEALTHCHECK does not ask /healthz"
    assert "AUTHPROXY_HEALTHZ" not in health or "AUTHPROXY_HEALTHZ=" in env
    assert int(url.group(1)) == _port(_container()["admin"]["listen"])

    exposed = {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()}
    assert exposed == {_port(_container()["listen"]), _port(_container()["admin"]["listen"])}


def test_dockerignore_keeps_only_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore should exclude everything, then allow what is copied"
    for word, args in _instructions():
        if word == "COPY":
            for source in args.split()[:-1]:
                assert f"!{source}" in lines or f"!{source}/" in lines, source
                assert (ROOT / source).exists(), source


# --- Prometheus and Grafana ----------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("AUTHPROXY_REQUIRE_PROMTOOL") or os.environ.get("CI"):
            pytest.fail("promtool is required here (AUTHPROXY_REQUIRE_PROMTOOL) but not installed")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return found


def _promtool(promtool: str, *args: str) -> None:
    done = subprocess.run(  # noqa: S603 - promtool from PATH, our files
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules(promtool: str) -> None:
    _promtool(promtool, "check", "rules", str(PROMETHEUS / "alerts.yaml"))


def test_promtool_test_rules(promtool: str) -> None:
    _promtool(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yaml"))


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _real_series() -> set[str]:
    """The sample names proxy/metrics.py exposes."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def test_alerts_and_dashboard_use_only_real_metric_names() -> None:
    real = _real_series()
    used = {"alerts.yaml": " ".join(rule["expr"] for rule in _alerts())}
    used["authproxy.json"] = " ".join(_dashboard_exprs())
    for where, text in used.items():
        names = set(re.findall(r"\bauthproxy_[a-z_]+", text))
        assert names, where
        assert names <= real, f"{where}: not a metric of proxy/metrics.py: {names - real}"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yaml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_the_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job"}
    rules = [
        {
            "record": f"dashboard:query{i}",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*"),
        }
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool(promtool, "check", "rules", str(path))


# --- a fresh clone, LICENSE, CHANGELOG -------------------------------------------


def _readme_install_command() -> str:
    """The README's first shell command that installs, cut after its pip install
    (what follows it runs the demo)."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        if "pip install" in block:
            parts = block.strip().split(" && ")
            last = next(i for i, part in enumerate(parts) if "pip install" in part)
            return " && ".join(parts[: last + 1])
    raise AssertionError("no install command in README.md")


def test_the_readme_install_leaves_a_fresh_clone_clean(tmp_path: Path) -> None:
    """Of the committed tree (HEAD): a fresh `git clone`, the README's install
    command in it with the interpreter running these tests, then `git status`."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    clone = tmp_path / "clone"
    subprocess.run([git, "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)  # noqa: S603
    command = _readme_install_command()
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install"), command
    command = shlex.quote(sys.executable) + command.removeprefix("python3")
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    done = subprocess.run(  # noqa: S603 - the README's own command
        ["bash", "-c", command],  # noqa: S607
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = subprocess.run(  # noqa: S603
        [git, "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    )
    assert status.stdout == "", "the README's install leaves files git does not ignore"


def _pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_license_is_the_apache_2_0_text() -> None:
    assert _pyproject()["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in text and b"Version 2.0, January 2004" in text
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256, "not the standard text"


def test_changelog_has_an_entry_for_this_version() -> None:
    version = _pyproject()["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(version)}\]?(\s|$)", changelog, re.M), version
