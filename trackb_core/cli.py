"""The ``trackb`` command line: thin commands over ``trackb_core``'s stages.

Each stage command parses its options into the stage's typed config (a YAML file via
``--config``, then options on top), opens the ``--out`` store and calls the stage's
``run(config, out)``. Errors arrive as :class:`~trackb_core.errors.TrackbError` and
leave as one line on stderr and the error's exit code.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any

import click

from trackb_core import __version__
from trackb_core.config import (
    StageConfig,
    build_config,
    config_options,
    load_yaml,
    merge,
    options_to_overrides,
    parse_dotted_overrides,
)
from trackb_core.errors import EXIT_INTERRUPTED, Terminated, TrackbError, raise_on_sigterm
from trackb_core.publish import PublishConfig
from trackb_core.sandbox import protect_process
from trackb_core.stages import COMMANDS, Command

EPILOG_URIS = (
    "URIs are local paths, file:// or s3://bucket/prefix (endpoint from "
    "TRACKB_S3_ENDPOINT_URL, credentials from the standard AWS chain). An input URI may "
    "name the upstream stage's output folder or the file in it."
)


def fail(exc: TrackbError) -> None:
    """Print ``exc`` as one line and exit with its code."""
    click.echo(f"trackb: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def reports_errors(func):
    """Turn TrackbError into one line + exit code; Ctrl-C into exit 130 and SIGTERM into
    exit 143, with no trace."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TrackbError as exc:
            fail(exc)
        except KeyboardInterrupt:
            click.echo("trackb: interrupted; the stage left no manifest, so it is not done",
                       err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated as exc:
            click.echo("trackb: terminated (SIGTERM); the stage left no manifest, so it is "
                       "not done", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def load_stage_config(cls: type[StageConfig], config_file: str | None,
                      overrides: dict[str, Any]) -> StageConfig:
    """YAML file (optional) + overrides -> validated config. Raises ConfigError."""
    values = load_yaml(config_file) if config_file else {}
    source = f"config {config_file}" if config_file else "options"
    return build_config(cls, merge(values, overrides), source=source)


def _help_text(cls: type[StageConfig]) -> str:
    return inspect.cleandoc(cls.__doc__ or "") + "\n\n" + EPILOG_URIS


def make_stage_command(spec: Command) -> click.Command:
    """The click command of one row of :data:`trackb_core.stages.COMMANDS`."""
    module, cls = spec.load()

    @click.pass_context
    @reports_errors
    def command(ctx: click.Context, config_file: str | None, out: str, **kwargs: Any) -> None:
        from trackb_core.stage import say
        from trackb_core.store import open_store

        config = load_stage_config(cls, config_file, options_to_overrides(cls, kwargs))
        store = open_store(out)
        runner = getattr(module, spec.runner)
        manifest = runner(config, store)
        say(spec.name, f"done in {manifest['timings']['total_seconds']:.1f}s -> {store.uri}")

    command = config_options(cls, skip=spec.positional)(command)
    for field in reversed(spec.positional):
        command = click.argument(field, metavar=field.upper() + "_URI")(command)
    command = click.option("--out", required=True, metavar="URI",
                           help="Output folder of this stage (local path or s3://).")(command)
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           default=None, metavar="FILE",
                           help="YAML file of this stage's options; "
                                "command-line options override it.")(command)
    first_line = inspect.cleandoc(cls.__doc__ or spec.name).splitlines()[0]
    return click.command(spec.name, help=_help_text(cls), short_help=first_line,
                         context_settings={"max_content_width": 100})(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trackb")
def main() -> None:
    """trackb: turn a Python corpus into a code-task instruction dataset, LoRA-fine-tune a
    small code LLM on it, and measure honestly how much it gained.

    \b
    Stages (each writes its files and, last, manifest.json into --out):
      {stages}
      run-all        all of the above under <store>/runs/<run_id>/, skipping finished stages
                     (--backend local: this machine; --backend k8s: Kubernetes Jobs)

    \b
    On Kubernetes:
      render         every object a run creates, as YAML (the launcher's own builder)
      preflight      check a run can start (objects build, permissions, Secrets, PVC, nodes)
      status         where a run stands: each stage done in the store or not, its Job
      logs           one stage's logs (from its pods, or the copy kept in the store)
      delete         remove a run's Kubernetes objects (the store keeps its outputs)

    \b
    Sharing:
      publish        push a build-dataset folder to the Hugging Face Hub

    Run `trackb COMMAND --help` for a command's inputs, outputs and defaults.
    """
    # Every trackb process may hold secrets (S3 keys, the hub token) in its environment:
    # no same-user process, model-written code included, may read them through /proc.
    protect_process()
    # Pods stop with SIGTERM (the images' STOPSIGNAL); it must end the process cleanly.
    raise_on_sigterm()


# The stage list comes from the command table, so a new command shows up by itself.
main.help = (main.help or "").replace(
    "{stages}", "\n      ".join(f"{c.name:<14} {c.summary}" for c in COMMANDS))
for _spec in COMMANDS:
    main.add_command(make_stage_command(_spec))


@main.command("run-all", context_settings={"max_content_width": 100})
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Pipeline YAML (see jobs/configs/demo.yaml).")
@click.option("--run-id", default=None,
              help="Run id (lowercase letters, digits, '-'). Reusing one resumes that run: "
                   "stages whose manifest matches are skipped.  [default: from the config, "
                   "else the current UTC time]")
@click.option("--store", default=None, metavar="URI",
              help="Store root; the run goes to <store>/runs/<run_id>/.  "
                   "[default: from the config, else '.']")
@click.option("--backend", type=click.Choice(["local", "k8s"]), default=None,
              help="Where stages run: local (this machine, one after another) or k8s "
                   "(Kubernetes Jobs; cluster from kubeconfig or the pod's service "
                   "account).  [default: local]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=1 (repeatable).")
@reports_errors
def run_all(config_file: str, run_id: str | None, store: str | None, backend: str | None,
            sets: tuple[str, ...]) -> None:
    """Run the whole pipeline: extract -> generate -> build-dataset -> [tiny-model] ->
    train -> eval (baseline) -> eval (post-SFT) -> compare.

    Every stage writes under <store>/runs/<run_id>/<stage>/. On an existing run id, a
    stage whose manifest exists with the same config and input hashes is reported as
    cached and skipped; the first stage that differs runs again, and so does everything
    downstream of a changed output. The report ends up in
    <store>/runs/<run_id>/compare/report.md.
    """
    from trackb_core.pipeline import PipelineConfig, new_run_id, run_pipeline

    values = load_yaml(config_file)
    overrides = parse_dotted_overrides(sets)
    for key, value in (("run_id", run_id), ("store", store), ("backend", backend)):
        if value is not None:
            overrides[key] = value
    config = build_config(PipelineConfig, merge(values, overrides), source=f"config {config_file}")
    config = config.model_copy(update={"run_id": new_run_id(config)})
    if config.backend == "k8s":
        from trackb_core.k8s.launcher import run_on_kubernetes

        # Only a person at a terminal means "cancel" by Ctrl-C; in a pod (or under nohup,
        # cron, CI) an interrupt must not delete hours of GPU work.
        interactive = sys.stdin.isatty() and "KUBERNETES_SERVICE_HOST" not in os.environ
        report = run_on_kubernetes(config, config.run_id, cancel_on_interrupt=interactive)
    else:
        report = run_pipeline(config)
    click.echo(f"report: {report}")


@main.command("render", context_settings={"max_content_width": 100})
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Pipeline YAML; its 'kubernetes' section holds the "
                                   "cluster settings.")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the YAML files (one per stage, plus launcher.yaml).")
@click.option("--run-id", default=None,
              help="Run id the objects are named after.  [default: from the config, else "
                   "the config file's name]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set kubernetes.namespace=ml (repeatable).")
@reports_errors
def render_command(config_file: str, out: str, run_id: str | None,
                   sets: tuple[str, ...]) -> None:
    """Write every Kubernetes object of a run (ConfigMaps, Jobs, Services,
    NetworkPolicies) as YAML files into DIR, from the same builder the k8s launcher
    uses. Apply them with `kubectl apply -f DIR` after k8s/namespace.yaml and
    k8s/rbac.yaml, or read them to review what a run will create. They carry no
    ownerReferences (a uid exists only once created): delete them with
    `kubectl delete -f DIR`, not by deleting a Job.
    """
    from trackb_core.k8s.render import render

    for path in render(config_file, out, run_id=run_id, overrides=parse_dotted_overrides(sets)):
        click.echo(str(path))


@main.command("preflight", context_settings={"max_content_width": 100})
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Pipeline YAML; its 'kubernetes' section holds the "
                                   "cluster settings.")
@click.option("--run-id", default=None,
              help="Run id the objects would be named after.  [default: from the config, "
                   "else the current UTC time, as run-all]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set kubernetes.namespace=ml (repeatable).")
@reports_errors
def preflight_command(config_file: str, run_id: str | None, sets: tuple[str, ...]) -> None:
    """Check that a run can start on Kubernetes, before anything runs: every stage's
    objects build (a model each pod can find, a reachable store), the launcher may make
    every call it makes (SelfSubjectAccessReviews), the Secrets and the cache PVC exist
    in the namespace, the PriorityClass and RuntimeClass exist, and a node matches the
    GPU node selector. Creates nothing.

    \b
    Prints one finding per line:
      error     the run cannot work as configured (run-all refuses to start it)
      warning   it may, or only later (e.g. a GPU pool that autoscales from zero)
      skipped   this identity may not make the check (forbidden)

    Exits 64 when any finding is an error, else 0. `run-all --backend k8s` makes the
    same checks before its first Job. The cluster comes from kubeconfig, else the pod's
    service account.
    """
    from trackb_core.errors import ConfigError
    from trackb_core.k8s.client import connect
    from trackb_core.k8s.preflight import preflight
    from trackb_core.pipeline import PipelineConfig, new_run_id

    config = build_config(PipelineConfig, merge(load_yaml(config_file),
                                                parse_dotted_overrides(sets)),
                          source=f"config {config_file}")
    findings = preflight(config, run_id or new_run_id(config), connect())
    for finding in findings:
        click.echo(str(finding))
    errors = sum(finding.level == "error" for finding in findings)
    if errors:
        raise ConfigError(f"preflight found {errors} error(s); fix them before run-all")


@main.command("publish", help=_help_text(PublishConfig),
              short_help="Push a dataset folder to the Hugging Face Hub.",
              context_settings={"max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="YAML file of this command's options; command-line options "
                                   "override it.")
@config_options(PublishConfig)
@reports_errors
def publish_command(config_file: str | None, **kwargs: Any) -> None:
    from trackb_core.publish import publish

    config = load_stage_config(PublishConfig, config_file,
                               options_to_overrides(PublishConfig, kwargs))
    click.echo(publish(config))


# -- a run on Kubernetes: status, logs, delete -----------------------------------------------
def _k8s_options(func):
    func = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set kubernetes.namespace=ml "
                             "(repeatable).")(func)
    func = click.option("--namespace", "-n", default=None, metavar="NAMESPACE",
                        help="Namespace of the run, when no --config names it.  "
                             "[default: trackb]")(func)
    return click.option("--config", "config_file", default=None,
                        type=click.Path(dir_okay=False), metavar="FILE",
                        help="The run's pipeline YAML (its namespace and store).  [default: "
                             "the pipeline the run's launcher recorded on its Lease]")(func)


def _k8s_config(run_id: str, config_file: str | None, namespace: str | None,
                sets: tuple[str, ...]):
    """The run's pipeline: from --config, else as its launcher recorded it in the
    cluster. Raises ConfigError, MissingInputError, UnavailableError."""
    from trackb_core.pipeline import PipelineConfig

    overrides = parse_dotted_overrides(sets)
    if namespace:
        overrides = merge(overrides, {"kubernetes": {"namespace": namespace}})
    if config_file:
        return build_config(PipelineConfig, merge(load_yaml(config_file), overrides),
                            source=f"config {config_file}")
    from trackb_core.k8s.launcher import run_config
    from trackb_core.k8s.settings import KubernetesConfig

    recorded = run_config(run_id, namespace or KubernetesConfig().namespace)
    values = recorded.model_dump(mode="json")
    return build_config(PipelineConfig, merge(values, overrides), source="the run's Lease")


@main.command("status", context_settings={"max_content_width": 100})
@click.argument("run_id")
@_k8s_options
@reports_errors
def status_command(run_id: str, config_file: str | None, namespace: str | None,
                   sets: tuple[str, ...]) -> None:
    """Show each stage of RUN_ID on Kubernetes: done in the store or not, and its Job;
    under a partitioned step, each part: done, running (with its progress), failed
    (with the cause) or pending."""
    from trackb_core.k8s.launcher import status

    for row in status(_k8s_config(run_id, config_file, namespace, sets), run_id):
        click.echo(f"{row['stage']:<14} {row['store']:<9} {row['job']}")
        for part in row.get("partitions", []):
            click.echo(f"  {part['part']:<22} {part['state']}")


@main.command("logs", context_settings={"max_content_width": 100})
@click.argument("run_id")
@click.argument("stage")
@_k8s_options
@reports_errors
def logs_command(run_id: str, stage: str, config_file: str | None, namespace: str | None,
                 sets: tuple[str, ...]) -> None:
    """Print STAGE's logs of RUN_ID: from its pods, or the copy saved in the store
    (runs/<run_id>/<stage>/_k8s/) once the pods are gone."""
    from trackb_core.k8s.launcher import logs

    click.echo(logs(_k8s_config(run_id, config_file, namespace, sets), run_id, stage))


@main.command("delete", context_settings={"max_content_width": 100})
@click.argument("run_id")
@_k8s_options
@reports_errors
def delete_command(run_id: str, config_file: str | None, namespace: str | None,
                   sets: tuple[str, ...]) -> None:
    """Cancel RUN_ID on Kubernetes: delete its Jobs and their pods, ConfigMaps, Services,
    NetworkPolicies and its Lease. The store keeps its outputs, so a later run-all
    resumes. This is the one way to cancel a run besides Ctrl-C at the launcher's
    terminal: signals to a launcher (SIGTERM) never delete anything."""
    from trackb_core.k8s.launcher import delete

    for name in delete(_k8s_config(run_id, config_file, namespace, sets), run_id):
        click.echo(f"deleted {name}")


if __name__ == "__main__":  # pragma: no cover
    main()
