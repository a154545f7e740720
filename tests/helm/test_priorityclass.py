"""templates/priorityclass.yaml: the chart may create the PriorityClass its pods name."""

from __future__ import annotations

import yaml

from . import CHART, KUBERNETES_VERSIONS, find, one, pod_spec, render, run_helm

ON = ("priorityClass.create=true", "kubernetes.scheduling.priority_class_name=trackb-batch",
      "launcher.enabled=true")


def test_no_priority_class_is_created_by_default():
    assert not find(render(), "PriorityClass")
    assert not find(render(CHART / "ci" / "default-values.yaml"), "PriorityClass")


def test_the_created_class_is_the_one_every_pod_names_and_never_the_global_default():
    import kubernetes_validate

    objects = render(CHART / "ci" / "default-values.yaml", sets=ON)
    klass = one(objects, "PriorityClass", "scheduling")
    assert klass["metadata"]["name"] == "trackb-batch"
    assert "namespace" not in klass["metadata"], "cluster-scoped"
    assert klass["globalDefault"] is False
    assert (klass["value"], klass["preemptionPolicy"]) == (1000, "PreemptLowerPriority")
    # The launcher's pod and, through pipeline.yaml, the stage pods the Job builder makes.
    assert pod_spec(one(objects, "Job", "launcher"))["priorityClassName"] == "trackb-batch"
    pipeline = yaml.safe_load(one(objects, "ConfigMap", "pipeline")["data"]["pipeline.yaml"])
    assert pipeline["kubernetes"]["scheduling"]["priority_class_name"] == "trackb-batch"
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(klass, version, strict=True)


def test_value_and_preemption_policy_are_settings():
    objects = render(CHART / "ci" / "default-values.yaml", sets=(
        *ON, "priorityClass.value=50", "priorityClass.preemptionPolicy=Never"))
    klass = one(objects, "PriorityClass", "scheduling")
    assert (klass["value"], klass["preemptionPolicy"]) == (50, "Never")


def test_creating_a_class_without_a_name_fails_at_render_time_naming_the_setting():
    result = run_helm("template", "demo", str(CHART), "--set", "priorityClass.create=true")
    assert result.returncode != 0
    assert "kubernetes.scheduling.priority_class_name" in result.stderr, result.stderr


def test_a_preemption_policy_kubernetes_does_not_know_is_refused_by_the_schema():
    result = run_helm("template", "demo", str(CHART), "--set", "priorityClass.create=true",
                      "--set", "kubernetes.scheduling.priority_class_name=x",
                      "--set", "priorityClass.preemptionPolicy=Sometimes")
    assert result.returncode != 0 and "preemptionPolicy" in result.stderr, result.stderr
