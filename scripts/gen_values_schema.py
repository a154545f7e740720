"""Generate the chart's ``values.schema.json`` and its pydantic-owned ``values.yaml`` sections.

    python scripts/gen_values_schema.py           # rewrite helm/trackb/values.schema.json
                                                  # and the generated blocks of values.yaml
    python scripts/gen_values_schema.py --check   # exit 1 if either would change (CI, tests)

Why generated: the chart and the Job builder share ONE schema. ``kubernetes:`` in
values.yaml is :class:`trackb_core.k8s.settings.KubernetesConfig` (same fields, same
defaults, the field descriptions as the ``# --`` comments), and ``pipeline:`` holds the
:class:`trackb_core.pipeline.PipelineConfig` fields the launcher passes through. Both blocks
sit between ``# >>> generated`` / ``# <<< generated`` markers and are rewritten from the
models, so there is one set of defaults, not two. The chart-only keys (serviceAccount,
rbac, launcher, minio) are described in :data:`CHART_ONLY` below; a test checks that
values.yaml and that table agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from trackb_core.stages import sections

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "trackb"
SCHEMA_PATH = CHART / "values.schema.json"
VALUES_PATH = CHART / "values.yaml"
BEGIN = "# >>> generated from {model} by scripts/gen_values_schema.py; do not edit"
END = "# <<< generated"

# PipelineConfig fields the chart does not pass through: the launcher sets them on its
# command line (--run-id from launcher.runId, --backend k8s), and the Kubernetes settings
# come from the chart's own `kubernetes:` section.
PIPELINE_SKIPPED = ("run_id", "backend", "kubernetes")
# Stage sections (one per section of the step table, trackb_core.stages): overrides
# only. An empty mapping means "trackb's defaults" (shown by `trackb <stage> --help`), so
# the defaults are not copied into the chart a second time.
PIPELINE_STAGES = tuple(sections())
# In a cluster every stage runs in its own pod: a local store would vanish with it.
STORE_DESCRIPTION = (
    "Store root, s3://bucket/prefix. Empty: kubernetes.s3.store (or s3://<minio.bucket> "
    "when minio.enabled).")


def _obj(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False,
            "properties": properties}


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RESOURCES = {
    "type": "object", "additionalProperties": False,
    "description": "Requests and limits (a Kubernetes ResourceRequirements).",
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
}
_IMAGE = _obj("A container image.", {
    "repository": _str("Image repository.", minLength=1),
    "tag": _str("Image tag (pinned; never 'latest').", minLength=1, **{"not": {"const": "latest"}}),
    "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"],
                   "description": "imagePullPolicy."},
})

# The keys only the chart has. values.yaml's `# --` comments say the same in prose.
CHART_ONLY: dict[str, Any] = {
    "nameOverride": _str("Replaces the chart name in object names."),
    "fullnameOverride": _str("Replaces the whole '<release>-trackb' name prefix."),
    "serviceAccount": _obj("The launcher's ServiceAccount (named kubernetes.service_account).", {
        "create": {"type": "boolean", "description": "Create the ServiceAccount."},
        "annotations": {**_MAP, "description": "ServiceAccount annotations (IRSA, "
                        "workload identity)."},
    }),
    "stageServiceAccount": _obj("The stage pods' ServiceAccount (named "
                                "kubernetes.job_service_account).", {
        "create": {"type": "boolean", "description": "Create the ServiceAccount."},
        "annotations": {**_MAP, "description": "ServiceAccount annotations (IRSA, "
                        "workload identity)."},
    }),
    "priorityClass": _obj("A PriorityClass named kubernetes.scheduling.priority_class_name.", {
        "create": {"type": "boolean", "description": "Create the PriorityClass."},
        "value": {"type": "integer", "minimum": -2147483648, "maximum": 1000000000,
                  "description": "Its priority (user classes stop at 1000000000)."},
        "preemptionPolicy": {"enum": ["PreemptLowerPriority", "Never"],
                             "description": "Whether its pods may preempt lower ones."},
        "description": _str("What it is for."),
    }),
    "cacheVolume": _obj("A PersistentVolumeClaim named kubernetes.cache.pvc (the model "
                        "cache).", {
        "create": {"type": "boolean", "description": "Create the PersistentVolumeClaim."},
        "storageClassName": _str("StorageClass; empty: the cluster's default."),
        "size": _str("Requested storage, e.g. 50Gi.",
                     pattern=r"^[0-9]+(\.[0-9]+)?[EPTGMK]i?$"),
        "accessModes": {"type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"enum": ["ReadWriteMany", "ReadWriteOnce",
                                           "ReadWriteOncePod", "ReadOnlyMany"]},
                        "description": "Access modes (ReadWriteMany recommended)."},
    }),
    "rbac": _obj("RBAC for the launcher.", {
        "create": {"type": "boolean", "description": "Create the Role and RoleBinding."},
    }),
    "launcher": _obj("The in-cluster launcher Job (`run-all --backend k8s`).", {
        "enabled": {"type": "boolean", "description": "Install the launcher Job."},
        "runId": _str("Run id; empty: the release name.",
                      pattern="^$|^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        "extraArgs": {"type": "array", "items": {"type": "string"},
                      "description": "Extra run-all arguments, e.g. --set train.epochs=1."},
        "podAnnotations": {**_MAP, "description": "Launcher pod annotations."},
    }),
    "cleanup": _obj("The pre-delete hook running `trackb delete <run id>` (launcher.enabled "
                    "only).", {
        "enabled": {"type": "boolean", "description": "Run the pre-delete hook."},
        "backoffLimit": {"type": "integer", "minimum": 0,
                         "description": "Retries of the hook pod."},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 60,
                                  "description": "Seconds the hook may run."},
    }),
    "minio": _obj("DEV ONLY in-cluster MinIO (no persistence, no TLS).", {
        "enabled": {"type": "boolean", "description": "Install the dev-only MinIO."},
        "image": _IMAGE,
        "bucket": _str("Bucket created at start.",
                       pattern="^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
        "storageSizeLimit": _str("emptyDir size limit for the data.", minLength=1),
        "resources": _RESOURCES,
    }),
}


def _models() -> tuple[type, type]:
    """(KubernetesConfig, PipelineConfig). Raises ImportError until settings.py exists."""
    import importlib

    from trackb_core.pipeline import PipelineConfig

    settings = importlib.import_module("trackb_core.k8s.settings")
    return settings.KubernetesConfig, PipelineConfig


def _input_fields(model: type) -> set[str]:
    """Fields the pipeline wires itself (declared with config.input_field)."""
    return {name for name, info in model.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "input" in info.json_schema_extra}


def _hoist_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its ``$defs``, which move into ``defs`` (refs stay ``#/$defs/X``,
    valid once the defs sit at the document root). Raises ValueError on a name clash."""
    schema = copy.deepcopy(schema)
    for name, body in schema.pop("$defs", {}).items():
        if name in defs and defs[name] != body:
            raise ValueError(f"two different models are both called {name}")
        defs[name] = body
    return schema


def _drop_unused_defs(properties: dict[str, Any], defs: dict[str, Any]) -> None:
    """Remove the ``$defs`` nothing refers to (the stage models the Chart* copies replace)."""
    while True:
        text = json.dumps([properties, defs])
        unused = [name for name in defs if f'"#/$defs/{name}"' not in text]
        if not unused:
            return
        for name in unused:
            del defs[name]


def _strip_input_markers(node: Any) -> None:
    """Drop config.input_field's markers: its boolean ``required`` is not JSON Schema."""
    if isinstance(node, dict):
        if isinstance(node.get("required"), bool):
            for key in ("input", "filename", "required"):
                node.pop(key, None)
        for value in node.values():
            _strip_input_markers(value)
    elif isinstance(node, list):
        for value in node:
            _strip_input_markers(value)


def pipeline_schema(pipeline_model: type, defs: dict[str, Any]) -> dict[str, Any]:
    """The ``pipeline:`` section: PipelineConfig minus skipped fields; stage sections
    without the input fields the pipeline wires (setting one is an error there)."""
    full = _hoist_defs(pipeline_model.model_json_schema(), defs)
    props = {k: v for k, v in full["properties"].items() if k not in PIPELINE_SKIPPED}
    props["store"] = _str(STORE_DESCRIPTION, pattern="^$|^s3://[^/]+")
    for stage in PIPELINE_STAGES:
        stage_model = pipeline_model.model_fields[stage].annotation
        ref_name = stage_model.__name__
        body = copy.deepcopy(defs[ref_name])
        wired = _input_fields(stage_model)
        body["properties"] = {k: v for k, v in body["properties"].items() if k not in wired}
        body["required"] = [k for k in body.get("required", []) if k not in wired]
        if not body["required"]:
            body.pop("required")
        body["additionalProperties"] = False
        defs[f"Chart{ref_name}"] = body
        props[stage] = {"$ref": f"#/$defs/Chart{ref_name}",
                        "description": full["properties"][stage].get("description", "")}
    return {"type": "object", "additionalProperties": False,
            "description": "PipelineConfig passed through to run-all (pipeline.yaml).",
            "properties": props}


def values_schema() -> dict[str, Any]:
    """The whole values.schema.json. Raises ImportError until settings.py exists."""
    import importlib

    kubernetes_model, pipeline_model = _models()
    settings = importlib.import_module("trackb_core.k8s.settings")
    defs: dict[str, Any] = {}
    kubernetes = _hoist_defs(settings.kubernetes_json_schema(), defs)
    kubernetes.pop("title", None)
    kubernetes.setdefault("description", (kubernetes_model.__doc__ or "").strip().splitlines()[0])
    properties = {**CHART_ONLY, "kubernetes": kubernetes,
                  "pipeline": pipeline_schema(pipeline_model, defs)}
    for body in defs.values():  # extra=forbid in pydantic; say so in the schema too
        if body.get("type") == "object" and "properties" in body:
            body.setdefault("additionalProperties", False)
    _drop_unused_defs(properties, defs)
    _strip_input_markers([properties, defs])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "trackb Helm chart values",
        "description": "Generated by scripts/gen_values_schema.py; do not edit by hand.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "$defs": dict(sorted(defs.items())),
    }


# ---------------------------------------------------------------- values.yaml blocks


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style for mappings and lists)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _comment(description: str | None, indent: str) -> list[str]:
    import textwrap

    text = " ".join((description or "").split()) or "(undocumented)"
    lines = textwrap.wrap(text, width=max(40, 94 - len(indent) - 5))
    return [f"{indent}# -- {lines[0]}"] + [f"{indent}# {line}" for line in lines[1:]]


def _model_block(model: type, values: dict[str, Any], indent: str,
                 skip: tuple[str, ...] = ()) -> list[str]:
    """``model``'s fields as commented YAML lines; nested models recurse."""
    from pydantic import BaseModel

    lines: list[str] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        lines += _comment(info.description, indent)
        value = values[name]
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and value:
            lines.append(f"{indent}{name}:")
            lines += _model_block(annotation, value, indent + "  ")
        else:
            lines.append(f"{indent}{name}: {_scalar(value)}")
    return lines


def kubernetes_block() -> list[str]:
    """values.yaml's ``kubernetes:`` section, from KubernetesConfig's defaults."""
    kubernetes_model, _ = _models()
    defaults = kubernetes_model().model_dump(mode="json")
    doc = (kubernetes_model.__doc__ or "").strip().splitlines()[0]
    return [BEGIN.format(model="KubernetesConfig"),
            *_comment(f"{doc} The launcher and `trackb render` read this same section "
                      "from pipeline.yaml.", ""),
            "kubernetes:", *_model_block(kubernetes_model, defaults, "  "), END]


def pipeline_block() -> list[str]:
    """values.yaml's ``pipeline:`` section: PipelineConfig's pass-through fields."""
    _, pipeline_model = _models()
    defaults = pipeline_model().model_dump(mode="json")
    lines = [BEGIN.format(model="PipelineConfig"),
             *_comment("The pipeline config run-all reads (the ConfigMap's pipeline.yaml). "
                       "Stage sections hold overrides only; empty means trackb's defaults "
                       "(`trackb <stage> --help`).", ""),
             "pipeline:"]
    for name, info in pipeline_model.model_fields.items():
        if name in PIPELINE_SKIPPED:
            continue
        if name == "store":
            lines += _comment(STORE_DESCRIPTION, "  ") + ['  store: ""']
        elif name in PIPELINE_STAGES:
            lines += _comment(f"{info.description} Overrides only; empty: trackb's "
                              "defaults.", "  ") + [f"  {name}: {{}}"]
        else:
            lines += _comment(info.description, "  ")
            lines.append(f"  {name}: {_scalar(defaults[name])}")
    return lines + [END]


def render_values(text: str) -> str:
    """values.yaml ``text`` with each generated block replaced by a fresh one.

    Raises ValueError when a block's markers are missing.
    """
    blocks = {"KubernetesConfig": kubernetes_block(), "PipelineConfig": pipeline_block()}
    lines = text.splitlines()
    for model, block in blocks.items():
        begin = BEGIN.format(model=model)
        if begin not in lines or END not in lines[lines.index(begin):]:
            raise ValueError(f"values.yaml lacks the markers of the {model} block")
        start = lines.index(begin)
        stop = lines.index(END, start)
        lines[start:stop + 1] = block
    return "\n".join(lines) + "\n"


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    wanted = {SCHEMA_PATH: schema_text(),
              VALUES_PATH: render_values(VALUES_PATH.read_text(encoding="utf-8"))}
    stale = [path for path, text in wanted.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python "
                  "scripts/gen_values_schema.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
