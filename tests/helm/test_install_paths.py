"""README's install paths, read from README itself: what each tells the user to create by
hand never collides with what the chart renders on that path, and the path is complete.

Each path is a `### ` heading in README's "Run on a GPU cluster" section with one ```bash
block. From the block the test collects, in order, the objects made by hand (`kubectl
apply -f k8s/...`, `kubectl create secret|serviceaccount|namespace ...`) and the `helm
install|upgrade` command with its release, namespace, values files and --set items; it
renders the chart with exactly those (real helm, as tests/helm does) and checks:

- no (kind, namespace, name) is both made by hand and rendered by the chart: Helm refuses
  to install over an object it does not own (issue 14: k8s/rbac.yaml before helm install);
- the namespace exists before anything is put in it;
- every Secret the pods need (jobspec.required_secrets), the ServiceAccounts they run as,
  the cache PVC and the PriorityClass they name, from the pipeline config the path runs
  (the chart's ConfigMap, or the laptop path's --config), are made on the path or
  rendered by the chart;
- every file the path names exists.

The kind e2e workflow is read the same way: it installs the chart by README's order.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from trackb_core.k8s.jobspec import secret_names
from trackb_core.k8s.settings import KubernetesConfig

from . import ROOT, run_helm

README = ROOT / "README.md"
SECTION = "## Run on a GPU cluster"
E2E_WORKFLOW = ROOT / ".github" / "workflows" / "e2e-kind.yml"
SAMPLE_SHA = "0123456789abcdef0123456789abcdef01234567"
SAMPLE_OUTPUT = "0abc123"  # what a $(...) in a path prints, e.g. git rev-parse --short HEAD

# Kinds without a namespace (the ones a path or the chart could create).
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding",
                  "StorageClass", "RuntimeClass", "CustomResourceDefinition"}
# `kubectl create <what> NAME`: the kind it makes.
CREATE_KINDS = {"secret": "Secret", "serviceaccount": "ServiceAccount", "sa": "ServiceAccount",
                "configmap": "ConfigMap", "cm": "ConfigMap", "namespace": "Namespace",
                "ns": "Namespace", "role": "Role", "rolebinding": "RoleBinding",
                "priorityclass": "PriorityClass", "pc": "PriorityClass"}
# helm install/upgrade flags: those taking a value, and the switches that change nothing
# helm template renders.
HELM_VALUE_FLAGS = {"-f", "--values", "--set", "--set-string", "--set-json", "-n",
                    "--namespace", "--version", "--timeout"}
HELM_SWITCHES = {"--install", "--create-namespace", "--wait", "--wait-for-jobs", "--atomic",
                 "--rollback-on-failure", "--dry-run"}


@dataclass(frozen=True)
class Key:
    """What Kubernetes (and Helm's ownership check) identifies an object by."""

    kind: str
    namespace: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"


def key_of(obj: dict, default_namespace: str) -> Key:
    namespace = None if obj["kind"] in CLUSTER_SCOPED else (
        obj["metadata"].get("namespace") or default_namespace)
    return Key(obj["kind"], namespace, obj["metadata"]["name"])


@dataclass
class HelmInstall:
    release: str
    chart: Path
    namespace: str
    values: list[Path]
    sets: list[tuple[str, str]]  # (flag, item)
    create_namespace: bool


@dataclass
class InstallPath:
    """One install path: what it makes by hand, in order, and its helm or laptop launch."""

    title: str
    by_hand: list[tuple[Key, str]] = field(default_factory=list)  # (object, source)
    helm: HelmInstall | None = None
    cluster_config: Path | None = None  # make launch-all / trackb run-all --backend k8s
    launch_sets: list[str] = field(default_factory=list)  # run-all's --set items
    pushed: dict[str, str] | None = None  # `make push` variables (REGISTRY, IMAGE_TAG)
    files: list[Path] = field(default_factory=list)  # every repository file it names
    problems: list[str] = field(default_factory=list)  # order errors found while reading


def logical_lines(script: str) -> list[str]:
    """Shell lines with ``\\``-continuations joined (a heredoc body is skipped)."""
    lines, pending, heredoc = [], "", None
    for raw in script.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = pending + raw
        pending = ""
        found = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if found:
            heredoc = found.group(1)
        lines.append(line)
    return lines


def expand(token: str, env: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` replaced from ``env`` (the path's own assignments)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: env.get(m.group(1) or m.group(2), m.group(0)), token)


def commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """Each simple command of the script as words, comments dropped, variables that the
    script (or ``env``) assigns expanded; assignments update ``env``."""
    out = []
    for line in logical_lines(script):
        # A command substitution runs at paste time; here it is a sample word.
        line = re.sub(r"\$\([^()]*\)", SAMPLE_OUTPUT, line)
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: not a command this test reads
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|", "&"):
                if command:
                    out.append(command)
                command = []
            elif not command and re.fullmatch(r"\w+=.*", word):
                name, _, value = word.partition("=")
                env[name] = expand(value, env)
            else:
                command.append(expand(word, env))
    return out


def option_values(words: list[str], *flags: str) -> list[str]:
    """Values of ``-f X`` / ``-f=X`` / ``--flag X`` / ``--flag=X`` for any of ``flags``."""
    found = []
    for i, word in enumerate(words):
        for flag in flags:
            if word == flag and i + 1 < len(words):
                found.append(words[i + 1])
            elif word.startswith(flag + "="):
                found.append(word[len(flag) + 1:])
    return found


def without_namespace(words: list[str]) -> list[str]:
    """``words`` less every ``-n X`` / ``--namespace X`` / ``--namespace=X``."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("-n", "--namespace"):
            skip = True
        elif not word.startswith(("-n=", "--namespace=")):
            out.append(word)
    return out


def read_path(title: str, script: str, env: dict[str, str] | None = None) -> InstallPath:
    """The install path a shell script describes (see the module docstring)."""
    path = InstallPath(title)
    env = dict(env or {})
    namespaces: set[str] = {"default"}

    def need_namespace(ns: str, what: str) -> None:
        if ns not in namespaces:
            path.problems.append(f"{what} uses namespace {ns!r} before it is created")

    for words in commands(script, env):
        if words[:1] == ["kubectl"]:
            # `kubectl -n NS create ...` and `kubectl create ... -n NS` alike.
            ns = (option_values(words, "-n", "--namespace") or ["default"])[0]
            words = without_namespace(words)
        if words[:2] == ["kubectl", "apply"]:
            for name in option_values(words, "-f", "--filename"):
                file = ROOT / name
                if not name.startswith("k8s/"):
                    continue
                path.files.append(file)
                for obj in (yaml.safe_load_all(file.read_text()) if file.exists() else []):
                    if obj:
                        key = key_of(obj, ns)
                        if key.namespace:
                            need_namespace(key.namespace, f"kubectl apply -f {name}")
                        path.by_hand.append((key, f"kubectl apply -f {name}"))
                        if key.kind == "Namespace":
                            namespaces.add(key.name)
        elif words[:2] == ["kubectl", "create"] and len(words) > 2 and words[2] in CREATE_KINDS:
            kind = CREATE_KINDS[words[2]]
            rest = [w for w in words[3:] if w not in ("generic", "docker-registry", "tls")]
            name = next(w for w in rest if not w.startswith("-"))
            key = Key(kind, None if kind in CLUSTER_SCOPED else ns, name)
            if key.namespace:
                need_namespace(ns, " ".join(words[:4]))
            path.by_hand.append((key, " ".join(words[:4])))
            if kind == "Namespace":
                namespaces.add(name)
        elif words[:1] == ["helm"] and len(words) > 1 and words[1] in ("install", "upgrade"):
            path.helm = read_helm(words, path)
            if not path.helm.create_namespace:
                need_namespace(path.helm.namespace, f"helm {words[1]}")
        elif words[:2] == ["make", "push"]:
            path.pushed = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        elif words[:2] == ["make", "launch-all"]:
            configs = [w.split("=", 1)[1] for w in words if w.startswith("CLUSTER_CONFIG=")]
            path.cluster_config = ROOT / (configs or ["jobs/configs/cluster-gpu.yaml"])[0]
            path.files.append(path.cluster_config)
        elif (words[0].endswith("trackb") and words[1:2] == ["run-all"]
              and option_values(words, "--backend") == ["k8s"]):
            path.cluster_config = ROOT / option_values(words, "--config")[0]
            path.files.append(path.cluster_config)
            path.launch_sets = option_values(words, "--set")
    return path


def read_helm(words: list[str], path: InstallPath) -> HelmInstall:
    """``helm install|upgrade`` as helm template needs it. Fails on a flag it does not
    know, so that README cannot grow an option this test silently ignores."""
    positional, values, sets = [], [], []
    namespace, create_namespace = "default", False
    i = 2
    while i < len(words):
        word = words[i]
        flag, has_eq, inline = word.partition("=")
        if flag in HELM_VALUE_FLAGS:
            value = inline if has_eq else words[i + 1]
            i += 1 if has_eq else 2
            if flag in ("-f", "--values"):
                values.append(ROOT / value)
                path.files.append(ROOT / value)
            elif flag in ("-n", "--namespace"):
                namespace = value
            elif flag.startswith("--set"):
                sets.append((flag, value))
            continue
        if word in HELM_SWITCHES:
            create_namespace |= word == "--create-namespace"
        elif word.startswith("-"):
            pytest.fail(f"{path.title}: helm flag {word} is unknown to this test: add it to "
                        "HELM_VALUE_FLAGS or HELM_SWITCHES")
        else:
            positional.append(word)
        i += 1
    assert len(positional) == 2, f"{path.title}: helm {words[1]} needs RELEASE CHART: {words}"
    chart = ROOT / positional[1]
    path.files.append(chart)
    return HelmInstall(positional[0], chart, namespace, values, sets, create_namespace)


def rendered(helm: HelmInstall) -> list[dict]:
    """What the chart renders for this install (helm template with its exact options)."""
    args = ["template", helm.release, str(helm.chart), "--namespace", helm.namespace]
    for file in helm.values:
        args += ["--values", str(file)]
    for flag, item in helm.sets:
        args += [flag, item]
    result = run_helm(*args)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pipeline_kubernetes(objects: list[dict]) -> KubernetesConfig:
    """The Job builder's settings in the chart's pipeline ConfigMap (what the launcher runs)."""
    maps = [o for o in objects if o["kind"] == "ConfigMap"
            and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "pipeline"]
    assert len(maps) == 1, "the chart renders one pipeline ConfigMap"
    pipeline = yaml.safe_load(maps[0]["data"]["pipeline.yaml"])
    return KubernetesConfig.model_validate(pipeline.get("kubernetes") or {})


def collisions(path: InstallPath) -> list[str]:
    """Objects both made by hand and rendered by the chart, as one line each."""
    if path.helm is None:
        return []
    chart = {key_of(o, path.helm.namespace) for o in rendered(path.helm)}
    return [f"{key} ({source}) is also rendered by the chart"
            for key, source in path.by_hand if key in chart]


# ---- README -------------------------------------------------------------------------------

def readme_paths(text: str) -> dict[str, str]:
    """``{heading: bash block}`` for each `### ` subsection of the cluster section that
    holds an install (kubectl apply/create, helm install, make launch-all)."""
    assert SECTION in text, f"README has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    paths = {}
    for chunk in section.split("\n### ")[1:]:
        title, _, body = chunk.partition("\n")
        blocks = re.findall(r"^```bash\n(.*?)^```", body, flags=re.S | re.M)
        installs = [b for b in blocks if re.search(
            r"kubectl (apply|create)|helm (install|upgrade)|make launch-all|run-all", b)]
        if installs:
            assert len(blocks) == 1, f"README {title!r}: one bash block per path, not {len(blocks)}"
            paths[title.strip()] = installs[0]
    return paths


PATHS = readme_paths(README.read_text())


def test_readme_has_one_path_per_platform():
    titles = " | ".join(PATHS)
    for platform in ("GKE", "EKS", "GPU Operator", "Laptop"):
        assert platform in titles, f"README's cluster section has no {platform} path: {titles}"
    assert sum(1 for p in PATHS.values() if "helm install" in p) >= 3


@pytest.fixture(scope="module", params=sorted(PATHS), ids=lambda t: re.sub(r"\W+", "-", t))
def readme_path(request) -> InstallPath:
    return read_path(request.param, PATHS[request.param])


def test_every_file_a_path_names_exists(readme_path):
    missing = [str(f.relative_to(ROOT)) for f in readme_path.files if not f.exists()]
    assert not missing, f"README {readme_path.title!r} names missing files: {missing}"


def test_each_namespace_exists_before_anything_goes_into_it(readme_path):
    assert not readme_path.problems, f"README {readme_path.title!r}: {readme_path.problems}"


def test_nothing_applied_by_hand_is_also_rendered_by_the_chart(readme_path):
    assert not collisions(readme_path), f"README {readme_path.title!r}: Helm would refuse " \
        f"the install: {collisions(readme_path)}"


def launched_settings(path: InstallPath) -> KubernetesConfig:
    """The Job builder's settings of a run-all path: its --config's `kubernetes:` with the
    command's `--set kubernetes.*` items applied (as run-all applies them)."""
    assert path.cluster_config is not None, \
        f"{path.title!r} neither installs the chart nor runs run-all"
    data = yaml.safe_load(path.cluster_config.read_text()).get("kubernetes") or {}
    for item in path.launch_sets:
        dotted, _, value = item.partition("=")
        keys = dotted.split(".")
        if keys[0] == "kubernetes":
            node = data
            for key in keys[1:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = yaml.safe_load(value)
    return KubernetesConfig.model_validate(data)


def missing_objects(path: InstallPath) -> list[str]:
    """What the path's pods need and neither the path nor the chart makes, one line each."""
    if path.helm is not None:
        objects = rendered(path.helm)
        k8s = pipeline_kubernetes(objects)
        namespace = path.helm.namespace
        made = {k for k, _ in path.by_hand} | {key_of(o, namespace) for o in objects}
        # The launcher pod runs as the chart's ServiceAccount.
        accounts = {o["spec"]["template"]["spec"].get("serviceAccountName", "default")
                    for o in objects if o["kind"] == "Job"}
    else:
        k8s = launched_settings(path)
        namespace = k8s.namespace
        made = {k for k, _ in path.by_hand}
        accounts = set()
    accounts |= {k8s.job_service_account} - {None, "", "default"}
    needed = [Key("Secret", namespace, name) for name in secret_names(k8s)]
    needed += [Key("ServiceAccount", namespace, name) for name in sorted(accounts - {"default"})]
    if k8s.cache.pvc:
        needed.append(Key("PersistentVolumeClaim", namespace, k8s.cache.pvc))
    if k8s.scheduling.priority_class_name:
        needed.append(Key("PriorityClass", None, k8s.scheduling.priority_class_name))
    return [str(key) for key in needed if key not in made]


def test_every_secret_account_volume_and_class_the_pods_need_is_made_on_the_path(readme_path):
    missing = missing_objects(readme_path)
    assert not missing, f"README {readme_path.title!r}: pods need objects the path never " \
        f"makes: {missing}"


def test_the_pods_run_the_images_the_path_pushed(readme_path):
    # `make push` tags what it builds IMAGE_TAG; a chart or config left at its default
    # tag would run images nobody pushed (ImagePullBackOff hours later, on GPU nodes).
    assert readme_path.pushed, f"README {readme_path.title!r} pushes no images"
    k8s = (pipeline_kubernetes(rendered(readme_path.helm)) if readme_path.helm is not None
           else launched_settings(readme_path))
    assert k8s.images.registry == readme_path.pushed["REGISTRY"], readme_path.title
    assert k8s.images.tag == readme_path.pushed["IMAGE_TAG"] == f"dev-{SAMPLE_OUTPUT}", \
        readme_path.title


def test_every_repository_file_readme_names_for_the_cluster_exists():
    text = README.read_text()
    named = set(re.findall(r"(?<![\w/])((?:helm/trackb/ci|jobs/configs|k8s)/[\w./-]+\.ya?ml)",
                           text))
    assert named
    missing = sorted(n for n in named if "<" not in n and not (ROOT / n).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_laptop_path_installs_no_chart_and_applies_the_launchers_rbac():
    (title,) = [t for t in PATHS if "Laptop" in t]
    path = read_path(title, PATHS[title])
    assert path.helm is None and path.cluster_config is not None
    assert ROOT / "k8s" / "rbac.yaml" in path.files


def test_chart_paths_apply_nothing_from_k8s_but_the_namespace():
    # The chart renders its ServiceAccounts, Role and RoleBinding; k8s/rbac.yaml holds the
    # same objects for installs without the chart, so on a chart path it can only collide.
    for title, script in PATHS.items():
        path = read_path(title, script)
        if path.helm is not None:
            applied = {f.relative_to(ROOT).as_posix() for f in path.files
                       if f.parts[len(ROOT.parts)] == "k8s"}
            assert applied <= {"k8s/namespace.yaml"}, (title, applied)


# ---- the check is live --------------------------------------------------------------------

OLD_README_ORDER = """
kubectl apply -f k8s/namespace.yaml -f k8s/rbac.yaml
kubectl -n trackb create secret generic trackb-s3 \\
  --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...
helm install trackb helm/trackb -n trackb -f helm/trackb/ci/default-values.yaml \\
  --set kubernetes.images.registry=ghcr.io/your-org --set launcher.enabled=true
"""


def test_the_order_issue_14_reported_is_caught():
    # README before issue 14: the launcher's ServiceAccount, Role and RoleBinding twice.
    found = collisions(read_path("old", OLD_README_ORDER))
    assert any("ServiceAccount trackb/trackb-launcher" in line for line in found), found
    assert any("Role trackb/trackb-launcher" in line for line in found), found
    assert any("RoleBinding trackb/trackb-launcher" in line for line in found), found


def test_a_path_that_forgets_the_store_secret_is_caught():
    (title,) = [t for t in PATHS if t.startswith("GPU Operator")]
    script = re.sub(r"kubectl -n trackb create secret generic trackb-s3 [^\n]*\\\n[^\n]*\n", "",
                    PATHS[title])
    assert "create secret" not in script
    assert missing_objects(read_path(title, script)) == ["Secret trackb/trackb-s3"]


def test_a_secret_used_before_its_namespace_exists_is_caught():
    path = read_path("x", "kubectl -n trackb create secret generic s --from-literal=a=b\n"
                          "kubectl apply -f k8s/namespace.yaml\n")
    assert path.problems and "'trackb'" in path.problems[0]


def test_commands_join_continuations_expand_variables_and_drop_comments():
    script = ('NS=team-a  # the namespace\nhelm install r helm/trackb -n "$NS" \\\n'
              '  --set a=1   # trailing comment\necho "${NS}" && kubectl get pods\n')
    assert commands(script, {}) == [["helm", "install", "r", "helm/trackb", "-n", "team-a",
                                      "--set", "a=1"], ["echo", "team-a"],
                                     ["kubectl", "get", "pods"]]


# ---- the kind e2e workflow follows the same order ----------------------------------------

def e2e_path() -> InstallPath:
    workflow = yaml.safe_load(E2E_WORKFLOW.read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    script = "\n".join(s["run"] for s in steps if "run" in s and "if" not in s)
    return read_path("e2e-kind.yml", script, e2e_env(workflow))


def e2e_env(workflow: dict) -> dict[str, str]:
    """The workflow's env with GitHub expressions evaluated as a run would (a sample sha)."""
    return {name: re.sub(r"\$\{\{\s*github\.sha\s*\}\}", SAMPLE_SHA, str(value))
            for name, value in workflow.get("env", {}).items()}


def test_the_e2e_workflow_installs_by_the_readme_order_without_collisions():
    path = e2e_path()
    assert path.helm is not None
    assert not path.problems
    assert not collisions(path)
    assert path.files and all(f.exists() for f in path.files)


def test_the_e2e_workflow_names_what_the_chart_renders():
    # The workflow's shell refers to rendered objects by name: the MinIO Service it
    # port-forwards to and the Deployment it waits for, the root Secret, the bucket, the
    # image tag, the launcher Job's label and run id.
    env = e2e_env(yaml.safe_load(E2E_WORKFLOW.read_text()))
    path = e2e_path()
    objects = rendered(path.helm)
    names = {key_of(o, path.helm.namespace) for o in objects}
    for kind in ("Service", "Deployment"):  # port-forward svc/..., rollout status deploy/...
        assert Key(kind, env["NAMESPACE"], f"{env['RELEASE']}-minio") in names, kind
    k8s = pipeline_kubernetes(objects)
    assert k8s.s3.credentials_secret == "trackb-minio-root"
    assert Key("Secret", env["NAMESPACE"], "trackb-minio-root") in {k for k, _ in path.by_hand}
    assert k8s.s3.store == f"s3://{env['BUCKET']}"
    assert k8s.images.tag == env["IMAGE_TAG"] == f"e2e-{SAMPLE_SHA}"
    launchers = [o for o in objects if o["kind"] == "Job" and o["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "launcher"]
    assert len(launchers) == 1
    assert f"{env['RUN_ID']}" in launchers[0]["spec"]["template"]["spec"]["containers"][0][
        "command"]

