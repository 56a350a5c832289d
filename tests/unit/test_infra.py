"""The operations files under infra/: KubeRay manifests, the cluster-launcher YAML, the Dockerfile.

No cluster, network or Docker engine: every YAML is loaded and checked for the fields KubeRay
requires (and the values it would reject), the cluster-launcher YAML is validated against the
``ray-schema.json`` of the installed Ray (and Ray's own config checks), the Dockerfile is parsed,
and every script, path and ``atlas`` command these files reference must exist in the repository.
"""

import functools
import json
import posixpath
import re
import shlex
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
ENTRYPOINT_PREFIX = "python jobs/build_atlas.py --config "
GPU = "nvidia.com/gpu"
# Keys of a Ray runtime_env (the subset a RayJob here may use).
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "config", "container", "image_uri", "nsight", "py_executable"}
BUILD_CONFIG_KEYS = {"name", "store", "output", "model", "data", "train", "scaling", "run", "index"}
# The atlas store and artifact folders are local-filesystem only (hard links, atomic renames:
# atlas/store/versions.py, atlas/build.py); only Ray Train checkpoints may use object storage.
CHECKPOINT_URI_SCHEMES = ("s3://",)
SHARED_FS_TYPES = ("nfs", "nfs4", "efs", "lustre")


# ----------------------------------------------------------------------------------- loading
def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


@functools.cache
def _docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _k8s_docs(kind: str) -> list[tuple[Path, dict, tuple]]:
    """(file, document, all documents of that file) for every KubeRay/Kubernetes doc of ``kind``."""
    out = []
    for path in _yaml_files():
        if "kuberay" not in path.parts:
            continue
        docs = _docs(path)
        out += [(path, d, docs) for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    return out


@functools.cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pinned_ray_version() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml does not pin ray (ray[...]==X)")


def _quantity(value) -> float:
    """A Kubernetes quantity ("20Gi", "8G", "512Mi", 16000000000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value).strip())
    assert m and (m.group(2) in units or m.group(2) == ""), f"not a quantity: {value!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_every_yaml_loads():
    files = _yaml_files()
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-build-atlas.yaml", "cluster-launcher/aws.yaml"} <= names
    for path in files:
        docs = _docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if "kuberay" in path.parts:
                assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
                meta = doc.get("metadata") or {}
                assert meta.get("name") or meta.get("generateName"), f"{path}: {doc['kind']} without metadata.name"


# ------------------------------------------------------------------------------------ KubeRay
def _containers(template: dict) -> list:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _gpus(container: dict) -> tuple[int, int | None]:
    res = container.get("resources") or {}
    limit = int((res.get("limits") or {}).get(GPU, 0))
    request = (res.get("requests") or {}).get(GPU)
    return limit, None if request is None else int(request)


def _pod_problems(where: str, template: dict, params: dict, docs: tuple) -> list[str]:
    problems = []
    spec = (template or {}).get("spec") or {}
    containers = _containers(template)
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    for c in containers:
        if not c.get("name") or not c.get("image"):
            problems.append(f"{where}: every container needs name and image")
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        problems.append(f"{where}: rayStartParams must be a mapping of strings (KubeRay: map[string]string)")
        params = {}
    # Every volumeMount names a volume of the pod.
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for c in containers:
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{where}: volumeMount {m.get('name')!r} has no volume")
    # A claimed volume: the PersistentVolumeClaim is defined next to the pods, shareable by all of them.
    for name, volume in volumes.items():
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is None:
            continue
        pvc = _pvc(docs, claim)
        if pvc is None:
            problems.append(f"{where}: volume {name!r} claims {claim!r}, which is not defined in the same file")
        elif "ReadWriteMany" not in ((pvc.get("spec") or {}).get("accessModes") or []):
            problems.append(f"{where}: PersistentVolumeClaim {claim!r} is not ReadWriteMany (every Ray pod mounts it)")
    # The object store fits in /dev/shm when /dev/shm is a sized memory volume.
    if "object-store-memory" in params:
        shm = [m["name"] for m in containers[0].get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
        size = ((volumes.get(shm[0]) or {}).get("emptyDir") or {}).get("sizeLimit") if shm else None
        if size is not None and int(params["object-store-memory"]) > _quantity(size):
            problems.append(f"{where}: object-store-memory {params['object-store-memory']} exceeds /dev/shm {size}")
    # A service account the pods use is defined next to them.
    sa = spec.get("serviceAccountName")
    if sa and not any(d.get("kind") == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs):
        problems.append(f"{where}: serviceAccountName {sa!r} is not defined in the same file")
    # Extended resources: requests must equal limits.
    for c in containers:
        limit, request = _gpus(c)
        if request is not None and request != limit:
            problems.append(f"{where}: {GPU} requests ({request}) != limits ({limit})")
    return problems


def _cluster_spec_problems(where: str, spec: dict, docs: tuple, need_gpu: bool = True) -> list[str]:
    """What KubeRay (ray.io/v1 RayClusterSpec) requires, plus the project's rules."""
    if not isinstance(spec, dict):
        return [f"{where}: the cluster spec is missing"]
    problems = []
    if str(spec.get("rayVersion")) != _pinned_ray_version():
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != the pinned ray {_pinned_ray_version()}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}: token authentication is off (authOptions: {{mode: token}})")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or "rayStartParams" not in head or "template" not in head:
        return problems + [f"{where}: headGroupSpec needs rayStartParams and template"]
    problems += _pod_problems(f"{where}.headGroupSpec", head["template"], head["rayStartParams"], docs)
    if any(_gpus(c)[0] for c in _containers(head["template"])) or (head["rayStartParams"] or {}).get("num-gpus", "0") != "0":
        problems.append(f"{where}: the head must not take a GPU")
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if not all(names) or len(set(names)) != len(names):
        problems.append(f"{where}: every worker group needs a unique groupName: {names}")
    gpu_groups = []
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", 0)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (lo, hi, n)):
            problems.append(f"{w}: minReplicas/maxReplicas/replicas must be non-negative integers")
        elif not lo <= n <= hi:
            problems.append(f"{w}: needs minReplicas <= replicas <= maxReplicas, got {lo} <= {n} <= {hi}")
        if "rayStartParams" not in g or "template" not in g:
            problems.append(f"{w}: needs rayStartParams and template")
            continue
        problems += _pod_problems(w, g["template"], g["rayStartParams"], docs)
        if any(_gpus(c)[0] >= 1 for c in _containers(g["template"])):
            gpu_groups.append(g)
    if need_gpu and not gpu_groups:
        problems.append(f"{where}: no worker group requests {GPU}")
    # One image everywhere, tagged with the package version (the one infra/docker/Dockerfile builds).
    images = {c["image"] for t in [head["template"]] + [g.get("template") for g in groups] for c in _containers(t) if c.get("image")}
    version = _pyproject()["project"]["version"]
    if len(images) != 1 or not next(iter(images)).endswith(f"/atlas:{version}"):
        problems.append(f"{where}: expected one image .../atlas:{version} for head and workers, got {sorted(images)}")
    return problems


def _pvc(docs: tuple, name: str) -> dict | None:
    found = [d for d in docs if d.get("kind") == "PersistentVolumeClaim" and d["metadata"].get("name") == name]
    return found[0] if found else None


def _shared_mounts(template: dict, docs: tuple) -> set[tuple[str, str]]:
    """(mountPath, claim) of the pod's first container for volumes of ReadWriteMany claims in ``docs``."""
    volumes = {v.get("name"): v for v in ((template or {}).get("spec") or {}).get("volumes") or []}
    out = set()
    for m in (_containers(template) or [{}])[0].get("volumeMounts") or []:
        claim = ((volumes.get(m.get("name")) or {}).get("persistentVolumeClaim") or {}).get("claimName")
        pvc = _pvc(docs, claim) if claim else None
        if pvc and "ReadWriteMany" in ((pvc.get("spec") or {}).get("accessModes") or []) and not m.get("readOnly"):
            out.add((posixpath.normpath(m["mountPath"]), claim))
    return out


def _cluster_shared_mounts(spec: dict, docs: tuple) -> set[tuple[str, str]]:
    """The shared writable volumes mounted at the same path on the head and on every worker group."""
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs") or []]
    return set.intersection(*(_shared_mounts(t, docs) for t in templates))


def _on_shared_volume(path: str, mounts: set[tuple[str, str]]) -> bool:
    if "://" in path or not PurePosixPath(path).is_absolute():
        return False
    norm = PurePosixPath(posixpath.normpath(path))
    return any(norm.is_relative_to(mount_path) for mount_path, _ in mounts)


def _total_gpus(spec: dict) -> int:
    return sum(g["maxReplicas"] * max(_gpus(c)[0] for c in _containers(g["template"])) for g in spec.get("workerGroupSpecs") or [])


def test_raycluster_has_what_kuberay_requires():
    found = _k8s_docs("RayCluster")
    assert found, "no RayCluster under infra/kuberay"
    for path, doc, docs in found:
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["metadata"].get("name"), path
        problems = _cluster_spec_problems(f"{path.name}:{doc['metadata']['name']}", doc.get("spec"), docs)
        assert not problems, "\n".join(problems)
    # The long-lived cluster: a `gpu-workers` group with one GPU per pod, scaling from min to max.
    path, doc, _ = next(f for f in found if f[0].name == "raycluster.yaml")
    group = next((g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"), None)
    assert group is not None, "raycluster.yaml: no worker group named gpu-workers"
    assert _gpus(_containers(group["template"])[0])[0] == 1
    assert group["minReplicas"] < group["maxReplicas"], "gpu-workers should autoscale"
    assert "object-store-memory" in group["rayStartParams"]


def test_raycluster_mounts_a_shared_volume_everywhere():
    """`ray job submit` builds read the store and write artifacts on a volume every pod shares."""
    for path, doc, docs in _k8s_docs("RayCluster"):
        mounts = _cluster_shared_mounts(doc["spec"], docs)
        assert mounts, (
            f"{path.name}: no ReadWriteMany PersistentVolumeClaim (defined in the same file) is mounted "
            "read-write at the same path on the head and every worker group; the atlas store and "
            "artifacts need a shared POSIX filesystem")
        for _, claim in mounts:
            assert (_pvc(docs, claim)["spec"].get("resources") or {}).get("requests", {}).get("storage"), \
                f"{path.name}: PersistentVolumeClaim {claim!r} requests no storage"


def _rayjobs():
    found = _k8s_docs("RayJob")
    assert found, "no RayJob under infra/kuberay"
    return found


def test_rayjob_fields_and_cluster():
    for path, doc, docs in _rayjobs():
        assert doc["apiVersion"] == "ray.io/v1", path
        spec = doc["spec"]
        assert spec["entrypoint"].startswith(ENTRYPOINT_PREFIX), f"{path}: entrypoint {spec['entrypoint']!r}"
        assert spec.get("shutdownAfterJobFinishes") is True, f"{path}: shutdownAfterJobFinishes must be true"
        ttl = spec.get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl >= 0, f"{path}: ttlSecondsAfterFinished"
        problems = _cluster_spec_problems(f"{path.name}:rayClusterSpec", spec.get("rayClusterSpec"), docs)
        assert not problems, "\n".join(problems)
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        assert isinstance(runtime_env, dict), f"{path}: runtimeEnvYAML is not a mapping"
        assert set(runtime_env) <= RUNTIME_ENV_KEYS, f"{path}: unknown runtime_env keys {set(runtime_env) - RUNTIME_ENV_KEYS}"
        env_vars = runtime_env.get("env_vars") or {}
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), "env_vars must be strings"
        # A local working_dir is the image's code folder (the submitter pod uploads it).
        wd = runtime_env.get("working_dir")
        if wd and "://" not in wd:
            assert wd == _dockerfile_workdir(), f"{path}: working_dir {wd} is not the image's WORKDIR {_dockerfile_workdir()}"


def _config_arg(entrypoint: str) -> str:
    args = shlex.split(entrypoint)
    return args[args.index("--config") + 1]


def _mounted_config(spec: dict, docs: tuple, config_path: str) -> str:
    """The text of the build config an absolute --config path points to: a ConfigMap key mounted on the head."""
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    target = PurePosixPath(config_path)
    volumes = {v["name"]: v for v in head["spec"].get("volumes") or []}
    for mount in _containers(head)[0].get("volumeMounts") or []:
        if PurePosixPath(mount["mountPath"]) != target.parent:
            continue
        cm_name = (volumes.get(mount["name"], {}).get("configMap") or {}).get("name")
        cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
        assert cms, f"ConfigMap {cm_name!r} mounted at {mount['mountPath']} is not defined in the same file"
        data = cms[0].get("data") or {}
        assert target.name in data, f"ConfigMap {cm_name!r} has no key {target.name!r}"
        return data[target.name]
    raise AssertionError(f"--config {config_path}: nothing is mounted at {target.parent} on the head (where the driver runs)")


def _rayjob_build_config(path: Path, spec: dict, docs: tuple) -> dict:
    config_path = _config_arg(spec["entrypoint"])
    if PurePosixPath(config_path).is_absolute():
        text = _mounted_config(spec, docs, config_path)
    else:  # relative to the working_dir, i.e. the repository as copied into the image
        assert (REPO / config_path).is_file(), f"{path}: --config {config_path} does not exist in the repository"
        text = (REPO / config_path).read_text()
    return yaml.safe_load(text)


def test_rayjob_build_config_is_there_and_fits_the_cluster():
    for path, doc, docs in _rayjobs():
        spec = doc["spec"]
        config = _rayjob_build_config(path, spec, docs)
        assert isinstance(config, dict) and {"store", "output", "model"} <= set(config), "a build config needs store, output, model"
        assert set(config) <= BUILD_CONFIG_KEYS, f"unknown build-config keys {set(config) - BUILD_CONFIG_KEYS}"
        # The full check needs atlas.train.config (it imports Ray, torch and tiledbsoma: several
        # seconds); run it when the suite has already imported it.
        if "atlas.train.config" in sys.modules:
            built = sys.modules["atlas.train.config"].build_config_from_dict(config)
            num_workers, use_gpu = built.scaling.num_workers, built.scaling.use_gpu
        else:
            scaling = config.get("scaling") or {}
            num_workers, use_gpu = scaling.get("num_workers", 1), scaling.get("use_gpu")
        if use_gpu:
            gpus = _total_gpus(spec["rayClusterSpec"])
            assert num_workers <= gpus, f"{path}: scaling.num_workers={num_workers} but the cluster has {gpus} GPUs"


def test_rayjob_store_and_output_are_on_a_shared_volume():
    """store/output: absolute POSIX paths under a ReadWriteMany volume mounted on every pod, not s3://.

    The store publishes versions with hard links and an atomic rename of a JSON record, and the build
    renames the finished artifact folder into place: both need one POSIX filesystem seen by the
    driver (head) and by the Ray Data / Ray Train workers. Checkpoints (run.storage_path) are
    written by Ray Train through pyarrow and may be s3://.
    """
    for path, doc, docs in _rayjobs():
        spec = doc["spec"]
        config = _rayjob_build_config(path, spec, docs)
        mounts = _cluster_shared_mounts(spec["rayClusterSpec"], docs)
        assert mounts, (
            f"{path.name}: no ReadWriteMany PersistentVolumeClaim (defined in the same file) is mounted "
            "read-write at the same path on the head and every worker group")
        where = ", ".join(sorted(m for m, _ in mounts))
        for key in ("store", "output"):
            value = str(config[key])
            assert "://" not in value, f"{path.name}: {key}: {value} — object storage is not supported for the {key} yet"
            assert PurePosixPath(value).is_absolute(), f"{path.name}: {key}: {value} is not an absolute path"
            assert _on_shared_volume(value, mounts), f"{path.name}: {key}: {value} is not under the shared volume ({where})"
        storage = (config.get("run") or {}).get("storage_path")
        if storage is not None:
            assert str(storage).startswith(CHECKPOINT_URI_SCHEMES) or _on_shared_volume(str(storage), mounts), (
                f"{path.name}: run.storage_path {storage} is neither {'/'.join(CHECKPOINT_URI_SCHEMES)} nor under {where}")


def test_rayservice_if_any():
    """A RayService (serving) gets the same cluster checks; the GPU is optional there."""
    for path, doc, docs in _k8s_docs("RayService"):
        assert doc["apiVersion"] == "ray.io/v1", path
        problems = _cluster_spec_problems(f"{path.name}:rayClusterConfig", doc["spec"].get("rayClusterConfig"), docs, need_gpu=False)
        assert not problems, "\n".join(problems)
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        assert serve_config.get("applications"), f"{path}: serveConfigV2 has no applications"


# ------------------------------------------------------------------------- the Serve app config
SERVE_CONFIG = REPO / "serve" / "config.yaml"


def _rayservices() -> list[tuple[Path, dict, tuple]]:
    found = _k8s_docs("RayService")
    assert found, "no RayService under infra/kuberay (the mapping service)"
    return found


def _serve_configs() -> list[tuple[str, dict]]:
    """(where, parsed Serve config) of serve/config.yaml and of every RayService's serveConfigV2."""
    out = [("serve/config.yaml", yaml.safe_load(SERVE_CONFIG.read_text()))]
    out += [(f"{p.name}:serveConfigV2", yaml.safe_load(d["spec"]["serveConfigV2"])) for p, d, _ in _rayservices()]
    return out


def _builder(import_path: str):
    """The attribute an import_path names, imported the way Serve does (repository root on sys.path)."""
    import importlib

    module_name, _, attr = import_path.partition(":")
    assert module_name and attr, f"import_path {import_path!r} is not module:attribute"
    module_file = REPO / (module_name.replace(".", "/") + ".py")
    assert module_file.is_file(), f"import_path {import_path!r}: {module_file.relative_to(REPO)} is not in the repository"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return getattr(importlib.import_module(module_name), attr)


def test_serve_configs_validate_against_serve_and_the_builder():
    """Each config is a valid Serve config, its import_path names the real builder, and its args:
    are accepted by the builder's argument class (what Serve validates before building)."""
    import inspect

    from ray.serve.schema import ServeDeploySchema

    for where, config in _serve_configs():
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            builder = _builder(app["import_path"])
            assert callable(builder), f"{where}: {app['import_path']} is not callable"
            (param,) = inspect.signature(builder).parameters.values()
            assert inspect.isclass(param.annotation), f"{where}: the builder's argument must be annotated with its class"
            args = param.annotation.model_validate(app.get("args") or {})  # unknown keys are refused
            assert args.artifact, where
            env = (app.get("runtime_env") or {})
            assert set(env) <= RUNTIME_ENV_KEYS, f"{where}: unknown runtime_env keys {set(env) - RUNTIME_ENV_KEYS}"


def test_serve_config_yaml_is_for_a_local_checkout():
    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    assert app["import_path"] == "serve.app:build_app"
    for key in ("artifact", "token_file"):  # relative paths: `serve run` from the repository root
        assert not PurePosixPath(app["args"][key]).is_absolute(), f"serve/config.yaml: {key} should be relative"


def _mounts_everywhere(spec: dict) -> dict[str, dict]:
    """mountPath → volume of the mounts that the head and every worker group share."""
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs") or []]
    per_pod = []
    for t in templates:
        volumes = {v["name"]: v for v in (t.get("spec") or {}).get("volumes") or []}
        mounts = {}
        for c in _containers(t):
            for m in c.get("volumeMounts") or []:
                volume = {k: v for k, v in volumes[m["name"]].items() if k != "name"}
                mounts[posixpath.normpath(m["mountPath"])] = volume
        per_pod.append(mounts)
    common = set.intersection(*(set(m) for m in per_pod))
    return {path: per_pod[0][path] for path in common if all(p[path] == per_pod[0][path] for p in per_pod)}


def _under(path: str, mounts: dict[str, dict], kind: str) -> bool:
    norm = PurePosixPath(posixpath.normpath(path))
    return any(norm.is_relative_to(mp) and kind in volume for mp, volume in mounts.items())


def test_rayservice_serves_the_artifact_with_a_token_from_a_secret():
    for path, doc, docs in _rayservices():
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        cluster = doc["spec"]["rayClusterConfig"]
        mounts = _mounts_everywhere(cluster)
        for app in config["applications"]:
            assert app["import_path"] == "serve.app:build_app", f"{path.name}: {app['import_path']}"
            # serve/ lives in the image's WORKDIR: on PYTHONPATH for the build task and the replicas.
            env_vars = ((app.get("runtime_env") or {}).get("env_vars") or {})
            assert _dockerfile_workdir() in env_vars.get("PYTHONPATH", "").split(":"), \
                f"{path.name}: PYTHONPATH must include the image's WORKDIR {_dockerfile_workdir()} (serve/ is there)"
            args = app["args"]
            assert _under(args["artifact"], mounts, "persistentVolumeClaim"), \
                f"{path.name}: artifact {args['artifact']} is not on a volume every pod mounts"
            claim = [v["persistentVolumeClaim"]["claimName"] for mp, v in mounts.items()
                     if "persistentVolumeClaim" in v and PurePosixPath(args["artifact"]).is_relative_to(mp)][0]
            assert _pvc(docs, claim), f"{path.name}: claim {claim} is not defined in the same file"
            assert args.get("token_file"), f"{path.name}: the service needs a bearer token (token_file)"
            assert _under(args["token_file"], mounts, "secret"), \
                f"{path.name}: token_file {args['token_file']} is not in a Secret mounted on every pod"
            assert not any(d.get("kind") == "Secret" for d in docs), f"{path.name}: keep the token Secret out of git"
            # An encoder that asks for a GPU needs a worker group that has one.
            gpus = float(((args.get("encoder") or {}).get("ray_actor_options") or {}).get("num_gpus", 0))
            if gpus:
                assert _total_gpus(cluster) >= gpus, f"{path.name}: the encoder wants a GPU, no worker group has one"


# ------------------------------------------------------------------------- cluster launcher
def _launcher_files() -> list[Path]:
    files = [p for p in _yaml_files() if "cluster-launcher" in p.parts]
    assert files, "no cluster-launcher YAML under infra/"
    return files


def test_cluster_launcher_validates_against_ray_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for path in _launcher_files():
        (config,) = _docs(path)
        jsonschema.validate(config, schema)


def test_cluster_launcher_passes_rays_own_checks():
    """What `ray up` checks before touching the cloud: defaults merged, then validated."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    for path in _launcher_files():
        (config,) = _docs(path)
        validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_nodes_and_commands():
    for path in _launcher_files():
        (config,) = _docs(path)
        types = config["available_node_types"]
        head = config["head_node_type"]
        assert head in types, f"{path}: head_node_type {head!r} is not a node type"
        assert types[head]["resources"].get("GPU", 0) == 0, f"{path}: the head should not have a GPU"
        gpu_types = [t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
        assert gpu_types, f"{path}: no worker node type with resources GPU >= 1"
        for t in gpu_types:
            assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], f"{path}: autoscaling bounds"
        head_cmds = " ; ".join(config["head_start_ray_commands"])
        worker_cmds = " ; ".join(config["worker_start_ray_commands"])
        assert "ray start --head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
        assert "ray start --address=$RAY_HEAD_IP:6379" in worker_cmds
        for cmds in (head_cmds, worker_cmds):
            assert "RAY_AUTH_MODE=token" in cmds, f"{path}: nodes must start with token authentication"
        setup = " ; ".join(config.get("setup_commands", []))
        assert re.search(r"pip install [^;]*-c constraints\.txt[^;]*\.\[gpu\]", setup), f"{path}: install .[gpu] with constraints.txt"
        assert "download.pytorch.org/whl/cu12" in setup, f"{path}: torch's CUDA build"
        # The atlas store and artifacts need a filesystem every node shares: commands that run on
        # every node (initialization_commands, setup_commands) mount one.
        every_node = [c for key in ("initialization_commands", "setup_commands") for c in config.get(key) or []]
        mounts = [m for c in every_node for m in re.findall(r"\bmount\s+-t\s+(\S+)[^;|&]*\s(/\S+)\s*$", c)]
        assert any(fs in SHARED_FS_TYPES for fs, _ in mounts), \
            f"{path}: no node mounts a shared filesystem ({'/'.join(SHARED_FS_TYPES)}) in initialization/setup commands"
        # Local sides of file_mounts that point into the checkout exist (run from the repo root).
        for remote, local in (config.get("file_mounts") or {}).items():
            if not local.startswith(("~", "/")):
                assert (REPO / local).exists(), f"{path}: file_mounts {remote}: {local} does not exist"


# -------------------------------------------------------------------------------- Dockerfile
@functools.cache
def _dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) with continuations joined and ARG defaults substituted."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    args: dict[str, str] = {}
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and "=" in rest:
            key, value = rest.strip().split("=", 1)
            args[key] = value.strip().strip('"')
        for key, value in args.items():
            rest = rest.replace("${" + key + "}", value).replace("$" + key, value)
        out.append((instr, rest.strip()))
    return tuple(out)


def _instructions(name: str) -> list[str]:
    return [rest for instr, rest in _dockerfile() if instr == name]


def _dockerfile_workdir() -> str:
    return _instructions("WORKDIR")[-1]


def _copy_sources() -> list[str]:
    sources = []
    for rest in _instructions("COPY") + _instructions("ADD"):
        tokens = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(t.startswith("--from") for t in tokens):
            continue  # from another image, not from the build context
        sources += [t for t in tokens if not t.startswith("--")][:-1]
    return sources


def test_dockerfile_base_python_torch_and_gpu_extra():
    (base,) = _instructions("FROM")[:1]
    image = base.split()[0]
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-(cudnn-)?(runtime|devel)-ubuntu[\d.]+|rayproject/ray:[\w.]+-py311-cu12\d*", image), image
    text = "\n".join(f"{i} {r}" for i, r in _dockerfile())
    assert "3.11" in text or "py311" in image, "Python 3.11"
    runs = [r.replace('"', "").replace("'", "") for r in _instructions("RUN")]
    assert any(re.search(r"pip install .*torch.*--index-url https://download\.pytorch\.org/whl/cu12", r) for r in runs), "torch CUDA build"
    assert any(re.search(r"pip install [^&;]*-c constraints\.txt [^&;]*\.\[gpu\]", r) for r in runs), "the gpu extra with constraints.txt"
    assert "gpu" in _pyproject()["project"]["optional-dependencies"]
    sources = _copy_sources()
    assert "constraints.txt" in sources
    # setuptools needs the readme that pyproject.toml names to build the package.
    assert _pyproject()["project"].get("readme", "README.md") in sources
    users = _instructions("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must not run as root"
    assert not _instructions("HEALTHCHECK"), "KubeRay probes the pods; no HEALTHCHECK"


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if fnmatch(path, pat) or (pat.startswith("**/") and fnmatch(path, pat[3:])):
            ignored = not negate
    return ignored


def _has_files(folder: Path) -> bool:
    """A folder with at least one file (git keeps no empty folders: an empty one is not in a clone)."""
    return folder.is_dir() and any(f.is_file() and "__pycache__" not in f.parts for f in folder.rglob("*"))


def test_dockerfile_copies_exist_and_are_not_ignored():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for src in _copy_sources():
        assert not src.startswith(("/", "..")), f"COPY {src}: outside the build context (the repo root)"
        assert (REPO / src).exists(), f"COPY {src}: missing from the repository (build context = repo root)"
        if (REPO / src).is_dir():
            assert _has_files(REPO / src), f"COPY {src}: an empty folder, absent from a fresh clone"
        assert not _ignored(src.strip("/"), patterns), f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    for must in ("atlas/", "jobs/"):
        assert must in _copy_sources(), f"the image must contain {must}"
    # The Ray Serve app comes later: once serve/ holds files, the image must copy it too.
    if _has_files(REPO / "serve"):
        assert "serve/" in _copy_sources(), "serve/ exists: the image must contain it (COPY serve/ serve/)"


# ------------------------------------------------------------- every referenced thing exists
_PYTHON_SCRIPT = re.compile(r"\bpython(?:3(?:\.\d+)?)?\s+([^\s'\"`-][^\s'\"`;|&]*\.py)\b")
_REPO_PATH = re.compile(r"(?<![\w./~$@:-])((?:atlas|jobs|serve|infra|tests|benchmarks)/[\w./-]*\w)")
_ATLAS_CMD = re.compile(r"(?:^|[;&|(]\s*|\$\(\s*)atlas\s+([a-z][\w-]*)")


def _infra_texts() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(INFRA.rglob("*")) if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ""} | {".dockerignore"}}


def _command_lines() -> list[str]:
    """Shell commands: YAML command lists and entrypoints, Dockerfile RUNs, README code blocks."""
    cmds: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"entrypoint", "command", "args"} or key.endswith("_commands"):
                    cmds.extend([value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)])
                else:
                    walk(value)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in _yaml_files():
        for doc in _docs(path):
            walk(doc)
    cmds += _instructions("RUN")
    for path in INFRA.rglob("*.md"):
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(), flags=re.S):
            cmds += block.replace("\\\n", " ").splitlines()
    return cmds


def test_referenced_scripts_and_paths_exist():
    missing = []
    for path, text in _infra_texts().items():
        for ref in set(_PYTHON_SCRIPT.findall(text)) | set(_REPO_PATH.findall(text)):
            if not (REPO / ref).exists():
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert not missing, "referenced but not in the repository:\n" + "\n".join(sorted(missing))


def test_entrypoints_are_the_jobs_scripts():
    """Every `python X.py` in a command runs a script of the repository (jobs/ for Ray jobs)."""
    scripts = {m for cmd in _command_lines() for m in _PYTHON_SCRIPT.findall(cmd)}
    assert "jobs/build_atlas.py" in scripts
    for script in scripts:
        assert (REPO / script).is_file(), f"`python {script}` is referenced but {script} does not exist"


def test_referenced_atlas_commands_exist():
    used = {m for cmd in _command_lines() for m in _ATLAS_CMD.findall(cmd)}
    if not used:
        return
    import typer.main

    from atlas.cli import app

    known = set(typer.main.get_command(app).commands)
    assert used <= known, f"`atlas` commands used in infra/ but not in atlas.cli: {sorted(used - known)}"
