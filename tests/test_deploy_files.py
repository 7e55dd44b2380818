"""The container and cluster files (Dockerfile, deploy/compose.yaml, deploy/kubernetes/) name
only what dcapd has: setting names and environment variables of config.SETTINGS (with values
it accepts), ini keys, console scripts of setup.cfg, routes the app serves, one port and one
cache path throughout. No image can be built here, so this is what keeps them from rotting:
each negative case feeds a copy with one reference renamed and expects a finding."""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from falcon import testing

import dcapd
from dcapd import config as config_module
from dcapd.app import create_app
from dcapd.config import SETTINGS, ConfigError, Setting, load_config

yaml = pytest.importorskip("yaml")  # PyYAML: in the test extra

REPO = Path(__file__).resolve().parents[1]
K8S = "deploy/kubernetes"
FILES = (
    "Dockerfile",
    ".dockerignore",
    "deploy/compose.yaml",
    "deploy/nginx.conf",
    *(f"{K8S}/{name}" for name in ("configmap.yaml", "secret.yaml", "deployment.yaml")),
    *(f"{K8S}/{name}" for name in ("service.yaml", "pdb.yaml", "kustomization.yaml")),
)
# Environment variables that are not dcapd's to check (the base image's, pip's).
FOREIGN_ENV = re.compile(r"(PYTHON|PIP_)[A-Z_]*")


@dataclass
class Facts:
    """What dcapd has, that the files may name."""

    settings: tuple[Setting, ...]
    console_scripts: set[str]
    routes: set[str]  # of the probed paths: those the app serves (not 404)
    extra_env: set[str]  # environment variables dcapd reads outside SETTINGS

    @property
    def env_names(self) -> set[str]:
        return {s.env for s in self.settings} | self.extra_env

    @property
    def ini_keys(self) -> set[tuple[str, str]]:
        return {(s.section, s.key) for s in self.settings}


def console_scripts() -> set[str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {line.split("=")[0].strip() for line in lines}


def extra_env() -> set[str]:
    """DCAPD_* and PROMETHEUS_* names that dcapd's code reads itself (DCAPD_CONFIG ...)."""
    names = set()
    for path in (REPO / "dcapd").rglob("*.py"):
        names |= set(re.findall(r"\"((?:DCAPD|PROMETHEUS)_[A-Z_]+)\"", path.read_text()))
    return names


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Facts:
    cache = tmp_path_factory.mktemp("cache")
    app = create_app(load_config({"cache_dir": str(cache), "tls": "off"}, environ={}))
    client = testing.TestClient(app)
    probed = ("/healthz", "/readyz", "/metrics")
    routes = {path for path in probed if client.simulate_get(path).status_code != 404}
    app.services.close()
    assert routes == set(probed)
    return Facts(SETTINGS, console_scripts(), routes, extra_env())


def real_files() -> dict[str, str]:
    return {name: (REPO / name).read_text() for name in FILES}


# --- the checks: each returns its findings (empty: all good)


def check_env(facts: Facts, env: dict[str, str], where: str) -> list[str]:
    """Every dcapd variable exists, and dcapd accepts the values together."""
    problems = [
        f"{where}: unknown environment variable {name}"
        for name in env
        if name not in facts.env_names and not FOREIGN_ENV.fullmatch(name)
    ]
    if not problems:
        ours = {k: v for k, v in env.items() if k in {s.env for s in facts.settings}}
        try:
            load_config(environ=ours)
        except ConfigError as exc:
            problems.append(f"{where}: dcapd refuses {exc}")
    return problems


def env_value(facts: Facts, env: dict[str, str], name: str) -> str:
    """The value of setting ``name`` as these variables set it (else its default)."""
    setting = next(s for s in facts.settings if s.name == name)
    return env.get(setting.env, setting.default)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(text):
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def listen_port(value: str) -> int:
    return int(value.rpartition(":")[2])


def check_dockerfile(facts: Facts, files: dict[str, str]) -> list[str]:
    text = files["Dockerfile"]
    steps = dockerfile_instructions(text)
    first = {word: rest for word, rest in reversed(steps)}  # the first of each instruction
    last = dict(steps)
    env = dockerfile_env(text)
    problems = check_env(facts, env, "Dockerfile ENV")
    if not re.fullmatch(r"python:[0-9.]+-slim(-[a-z]+)?", first.get("FROM", "")):
        problems.append(f"Dockerfile: base is not an official slim Python: {first.get('FROM')}")
    user = last.get("USER", "root").split(":")[0]
    if not user.isdigit() or int(user) == 0:
        problems.append(f"Dockerfile: USER {user!r} is not a numeric non-root user")
    if not any(word == "RUN" and "pip install ." in rest for word, rest in steps):
        problems.append("Dockerfile: the project is not pip-installed")
    port = listen_port(env_value(facts, env, "listen"))
    if last.get("EXPOSE") != str(port):
        problems.append(f"Dockerfile: EXPOSE {last.get('EXPOSE')} but dcapd listens on {port}")
    if env_value(facts, env, "tls") != "off":
        problems.append("Dockerfile: TLS is not off (the ingress terminates it)")
    cache_dir = env_value(facts, env, "cache_dir")
    if last.get("VOLUME") != cache_dir:
        problems.append(f"Dockerfile: VOLUME {last.get('VOLUME')} is not the cache {cache_dir}")
    health = last.get("HEALTHCHECK", "")
    probe = re.search(r"://127\.0\.0\.1:(\d+)(/[a-z]+)", health)
    if not probe or probe.group(2) not in facts.routes or int(probe.group(1)) != port:
        problems.append(f"Dockerfile: HEALTHCHECK does not probe a route on {port}: {health}")
    entrypoint = json.loads(last.get("ENTRYPOINT", "[]") or "[]")
    if not entrypoint or entrypoint[0] not in facts.console_scripts:
        problems.append(f"Dockerfile: ENTRYPOINT {entrypoint} is not a console script")
    ignored = [ln for ln in files[".dockerignore"].splitlines() if ln and not ln.startswith("#")]
    for word, rest in steps:
        if word == "COPY":
            for source in rest.split()[:-1]:
                if not (REPO / source).exists():
                    problems.append(f"Dockerfile: COPY {source}: no such file")
                if any(fnmatch.fnmatch(source, pattern) for pattern in ignored):
                    problems.append(f"Dockerfile: COPY {source} is excluded by .dockerignore")
    return problems


def check_compose(facts: Facts, files: dict[str, str]) -> list[str]:
    compose = yaml.safe_load(files["deploy/compose.yaml"])
    services = compose["services"]
    problems = []
    nodes = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("dcapd")}
    if not nodes:
        return ["compose: no dcapd service"]
    image_env = dockerfile_env(files["Dockerfile"])
    ports = set()
    for name, service in nodes.items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        problems += check_env(facts, env, f"compose {name}")
        effective = {**image_env, **env}
        cache_dir = env_value(facts, effective, "cache_dir")
        targets = [v.split(":")[1] for v in service.get("volumes", [])]
        if cache_dir not in targets:
            problems.append(f"compose {name}: the cache {cache_dir} is not on a volume")
        if service["image"] != f"dcapd:{dcapd.__version__}":
            problems.append(f"compose {name}: image {service['image']} is not this version")
        ports.add(listen_port(env_value(facts, effective, "listen")))
    nginx = files["deploy/nginx.conf"]
    for host, port in re.findall(r"server\s+([\w.-]+):(\d+)", nginx):
        if host not in nodes or int(port) not in ports:
            problems.append(f"nginx.conf: upstream {host}:{port} is not a dcapd node and port")
    mounted = [v for s in services.values() for v in s.get("volumes", []) if v.startswith("./")]
    for volume in mounted:
        source = volume.split(":")[0]
        if source.endswith(".conf") and not (REPO / "deploy" / source).is_file():
            problems.append(f"compose: {source} does not exist")
    return problems


def manifests(files: dict[str, str]) -> dict[str, dict]:
    found = {}
    for name, text in files.items():
        if name.startswith(K8S) and name != f"{K8S}/kustomization.yaml":
            for document in yaml.safe_load_all(text):
                found[document["kind"]] = document
    return found


def check_kubernetes(facts: Facts, files: dict[str, str], tmp_path: Path) -> list[str]:
    docs = manifests(files)
    problems = []
    missing = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} - set(docs)
    if missing:
        return [f"kubernetes: no {', '.join(sorted(missing))}"]
    listed = yaml.safe_load(files[f"{K8S}/kustomization.yaml"])["resources"]
    for name in files:
        if name.startswith(K8S) and Path(name).name not in listed + ["kustomization.yaml"]:
            problems.append(f"kustomization: {name} is not listed")
    pod = docs["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    # The ini file: every key known, every value accepted, its paths where they are mounted.
    args = container.get("args", [])
    ini_path = args[args.index("--config") + 1] if "--config" in args else ""
    config_map = docs["ConfigMap"]
    config_volume = next((n for n, v in volumes.items() if "configMap" in v), "")
    ini_name = Path(ini_path).name
    if (
        volumes.get(config_volume, {}).get("configMap", {}).get("name")
        != config_map["metadata"]["name"]
        or mounts.get(config_volume) != str(Path(ini_path).parent)
        or ini_name not in config_map["data"]
    ):
        problems.append(f"kubernetes: --config {ini_path} is not the mounted ConfigMap's file")
        return problems
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(config_map["data"][ini_name])
    for section in parser.sections():
        for key, _ in parser.items(section):
            if (section, key) not in facts.ini_keys:
                problems.append(f"ConfigMap {ini_name}: unknown key [{section}] {key}")
    (tmp_path / ini_name).write_text(config_map["data"][ini_name])
    try:
        config = load_config(environ={}, ini_path=str(tmp_path / ini_name))
    except ConfigError as exc:
        return problems + [f"ConfigMap {ini_name}: dcapd refuses {exc}"]
    if config.tls != "off":
        problems.append("ConfigMap: TLS is not off (the Ingress terminates it)")
    cache_volume = next((n for n, path in mounts.items() if path == config.cache_dir), None)
    if cache_volume is None:
        problems.append(f"Deployment: the cache {config.cache_dir} is not a mounted volume")

    # The secret: known variables, and every secret setting there.
    secret = docs["Secret"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    problems += check_env(facts, dict.fromkeys(keys, ""), "Secret")
    for setting in facts.settings:
        if setting.secret and setting.env not in keys:
            problems.append(f"Secret: no {setting.env}")
    refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    if refs != [secret["metadata"]["name"]]:
        problems.append(f"Deployment: envFrom {refs} is not the Secret")

    # Probes, ports, metrics annotations: real routes on the port dcapd listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if config.listen_port not in ports.values():
        problems.append(f"Deployment: containerPort is not {config.listen_port}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("path") not in facts.routes:
            problems.append(f"Deployment: {probe} is not on {path}: {get.get('path')}")
        if ports.get(get.get("port"), get.get("port")) != config.listen_port:
            problems.append(f"Deployment: {probe} port {get.get('port')} is not dcapd's")
    notes = pod["metadata"].get("annotations", {})
    if (
        notes.get("prometheus.io/path") not in facts.routes
        or int(notes.get("prometheus.io/port", 0)) != config.listen_port
    ):
        problems.append("Deployment: prometheus.io annotations are not /metrics on dcapd's port")

    # Non-root, read-only root filesystem, resource requests, the image of this version.
    uid = spec["securityContext"].get("runAsUser")
    image_user = dict(dockerfile_instructions(files["Dockerfile"])).get("USER", "").split(":")[0]
    if not spec["securityContext"].get("runAsNonRoot") or str(uid) != image_user:
        problems.append(f"Deployment: not runAsNonRoot as the image's user {image_user}")
    if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        problems.append("Deployment: the root filesystem is writable")
    if not container.get("resources", {}).get("requests"):
        problems.append("Deployment: no resource requests")
    if container["image"] != f"dcapd:{dcapd.__version__}":
        problems.append(f"Deployment: image {container['image']} is not this version")
    command = container.get("command") or [None]
    if command[0] is not None and Path(command[0]).name not in facts.console_scripts:
        problems.append(f"Deployment: command {command} is not a console script")

    # The Service and the PDB select the pods; the Service targets dcapd's port.
    labels = pod["metadata"]["labels"]
    for kind, selector in (
        ("Service", docs["Service"]["spec"]["selector"]),
        ("PodDisruptionBudget", docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
    ):
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{kind}: selector {selector} does not select the dcapd pods")
    for port in docs["Service"]["spec"]["ports"]:
        if ports.get(port["targetPort"], port["targetPort"]) != config.listen_port:
            problems.append(f"Service: targetPort {port['targetPort']} is not dcapd's")
    return problems


def all_findings(facts: Facts, files: dict[str, str], tmp_path: Path) -> list[str]:
    return (
        check_dockerfile(facts, files)
        + check_compose(facts, files)
        + check_kubernetes(facts, files, tmp_path)
    )


# --- the tests


def test_the_deployment_files_name_only_what_dcapd_has(facts, tmp_path):
    assert all_findings(facts, real_files(), tmp_path) == []


MUTATIONS = [
    ("Dockerfile", "DCAPD_CACHE_DIR=", "DCAPD_CACHE_DIRECTORY="),
    ("Dockerfile", "DCAPD_TLS=off", "DCAPD_TLS=none"),
    ("Dockerfile", 'ENTRYPOINT ["dcapd"]', 'ENTRYPOINT ["dcapd-server"]'),
    ("Dockerfile", "EXPOSE 8081", "EXPOSE 8080"),
    ("Dockerfile", "/healthz", "/health"),
    ("Dockerfile", "USER 10001:10001", "USER root"),
    ("Dockerfile", "COPY dcapd ./dcapd", "COPY dcap ./dcapd"),
    ("deploy/compose.yaml", "DCAPD_LOG_FORMAT:", "DCAPD_LOGFORMAT:"),
    ("deploy/compose.yaml", "DCAPD_CACHE_MODE: LAZY", "DCAPD_CACHE_MODE: EAGER"),
    ("deploy/compose.yaml", "cache:/var/cache/dcapd", "cache:/var/cache/pccs"),
    ("deploy/nginx.conf", "server dcapd-2:8081", "server dcapd-3:8081"),
    (f"{K8S}/configmap.yaml", "early_margin_hours", "margin_hours"),
    (f"{K8S}/configmap.yaml", "[metrics]", "[prometheus]"),
    (f"{K8S}/configmap.yaml", "mode = LAZY", "mode = LAZILY"),
    (f"{K8S}/secret.yaml", "DCAPD_ADMIN_TOKEN_SHA512", "DCAPD_ADMIN_TOKEN"),
    (f"{K8S}/deployment.yaml", "path: /readyz", "path: /ready"),
    (f"{K8S}/deployment.yaml", "path: /metrics", "path: /prometheus"),
    (f"{K8S}/deployment.yaml", "mountPath: /var/cache/dcapd", "mountPath: /var/cache/pccs"),
    (f"{K8S}/deployment.yaml", '"/etc/dcapd/pccs.ini"', '"/etc/dcapd/dcapd.ini"'),
    (f"{K8S}/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
    (f"{K8S}/deployment.yaml", "runAsUser: 10001", "runAsUser: 10002"),
    (f"{K8S}/service.yaml", "targetPort: http", "targetPort: 8080"),
    (f"{K8S}/pdb.yaml", "app.kubernetes.io/name: dcapd", "app.kubernetes.io/name: pccs"),
]


@pytest.mark.parametrize(
    ("name", "old", "new"), MUTATIONS, ids=[f"{m[0]}:{m[2]}" for m in MUTATIONS]
)
def test_a_renamed_reference_is_found(facts, tmp_path, name, old, new):
    files = real_files()
    assert old in files[name], (name, old)
    files[name] = files[name].replace(old, new)
    assert all_findings(facts, files, tmp_path) != []


@pytest.mark.parametrize("renamed", ["cache_dir", "listen", "tls", "admin_token_sha512"])
def test_a_setting_renamed_in_dcapd_is_found(facts, tmp_path, monkeypatch, renamed):
    """The other way round: dcapd renames a setting's variable and ini key; the files,
    unchanged, now name something dcapd no longer has."""
    settings = tuple(
        dataclasses.replace(s, env=s.env + "_NEW", key=s.key + "_new") if s.name == renamed else s
        for s in SETTINGS
    )
    monkeypatch.setattr(config_module, "SETTINGS", settings)  # load_config reads it too
    changed = dataclasses.replace(facts, settings=settings)
    assert all_findings(changed, real_files(), tmp_path) != []


def test_the_compose_nodes_trust_nginx_and_only_nginx_for_the_client_address():
    """nginx sets X-Forwarded-For; the nodes keep it only from nginx's fixed address (else
    every access line names nginx, or any container could name any client)."""
    compose = yaml.safe_load((REPO / "deploy/compose.yaml").read_text())
    nginx_ip = compose["services"]["nginx"]["networks"]["pccs"]["ipv4_address"]
    assert "X-Forwarded-For $remote_addr" in (REPO / "deploy/nginx.conf").read_text()
    for node in ("dcapd-1", "dcapd-2"):
        environment = compose["services"][node]["environment"]
        trusted = load_config({}, environ=environment).trusted_proxies
        assert [str(n) for n in trusted] == [f"{nginx_ip}/32"], node
        assert compose["services"][node]["networks"] == ["pccs"]
