"""The one table of trackb's stage commands and pipeline steps.

:data:`COMMANDS` lists every stage command (``trackb <name>``, and its container entry
``python -m jobs.<name>``): the module holding its config class and runner, and the
config fields it takes as arguments. :data:`STEPS` lists every step of a run, in run
order: one output folder under ``runs/<run_id>/``, the command that runs it, the
:class:`~trackb_core.pipeline.PipelineConfig` section its options come from, how its
inputs are wired, its Kubernetes resources (requests, limits, deadline), whether it
needs a GPU, whether it runs model-written code, and when it runs.

The pipeline (``plan``), the CLI, ``jobs/``, the Job builder, the cluster settings and
the Helm values schema all read these tables; a test checks that each row has its Job
entry, its rendered manifest, its resources key and its values-schema entry.

Adding a step: write its stage module (a ``<Stage>Config`` and ``run(config, out)``),
add a :class:`Command` if it is a new command (and ``jobs/<command>.py``), and a
:class:`Step` here. This module imports nothing heavy: the stage modules load when a
command or step is used (:meth:`Command.load`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any, Literal


@dataclass(frozen=True)
class Command:
    """One stage command: ``trackb <name>`` = ``python -m jobs.<name>``.

    ``module`` is ``trackb_core.<module>``, which defines ``config_class`` and the
    function ``runner(config, out)``; ``positional`` are the config fields the command
    takes as arguments (in order) instead of options; ``summary`` is its line in
    ``trackb --help``. A command whose config has ``partitions``
    (:class:`trackb_core.partition.PartitionOptions`) names its ``merger``: the
    function ``merger(config, out)`` of the same module that writes the step's output
    and manifest from its finished parts (what the launcher calls after an Indexed Job).
    """

    name: str
    module: str
    config_class: str
    summary: str
    runner: str = "run"
    positional: tuple[str, ...] = ()
    merger: str | None = None

    @property
    def job_module(self) -> str:
        """The container entry point: ``jobs.<name with - as _>``."""
        return "jobs." + self.name.replace("-", "_")

    def load(self) -> tuple[ModuleType, type]:
        """``(module, config class)``, imported now."""
        module = importlib.import_module(f"trackb_core.{self.module}")
        return module, getattr(module, self.config_class)


COMMANDS: tuple[Command, ...] = (
    Command("extract", "extract", "ExtractConfig",
            "corpus -> functions.jsonl, tasks.jsonl", merger="merge"),
    Command("generate", "generate", "GenerateConfig",
            "tasks -> responses.jsonl (reference or OpenAI-compatible teacher)",
            merger="merge"),
    Command("build-dataset", "dataset", "DatasetConfig",
            "responses -> train.jsonl, test.jsonl, README.md (dataset card)"),
    Command("train", "train", "TrainConfig",
            "dataset + base model -> adapter/ (LoRA), metrics.json, loss_curve.png"),
    Command("eval", "evaluate", "EvalConfig",
            "dataset + model [+ adapter] -> predictions.jsonl, eval.json", merger="merge"),
    Command("score", "evaluate", "ScoreConfig",
            "dataset + predictions made elsewhere -> eval.json", runner="score"),
    Command("compare", "compare", "CompareConfig",
            "two eval.json -> report.md, compare.json, report.png",
            positional=("baseline", "post")),
    Command("tiny-model", "tinymodel", "TinyModelConfig",
            "corpus -> a tiny pretrained model for CPU runs"),
    Command("warm-cache", "warmcache", "WarmCacheConfig",
            "hub model -> the model cache (HF_HOME), for pods that load it offline"),
)


def command(name: str) -> Command:
    """The command called ``name``. Raises KeyError if there is none."""
    for candidate in COMMANDS:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


# -- how a step's inputs are wired -------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """An input wired to the output folder of an earlier step."""

    step: str


@dataclass(frozen=True)
class Setting:
    """An input wired to a top-level pipeline setting (``corpus``)."""

    name: str


@dataclass(frozen=True)
class BaseModelRef:
    """An input wired to the base model: the pipeline's ``model``, or the output of the
    step that builds it (``builder``) when ``model`` is ``tiny``. When the run has the
    step that fills the model cache (``warmer``), the step waits for it."""

    builder: str = "tiny-model"
    warmer: str = "warm-cache"


BASE_MODEL = BaseModelRef()
Input = Output | Setting | BaseModelRef | None


# -- a step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """Default requests, limits and deadline of one resources key on Kubernetes
    (``kubernetes.resources.<key>``, ``kubernetes.job.deadlines.<key>``)."""

    doc: str
    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    deadline: int
    disk: str = "2Gi"
    shm: str | None = None
    gpus: int = 0


@dataclass(frozen=True)
class Step:
    """One step of a run: one output folder, ``runs/<run_id>/<folder>/``.

    Attributes:
        folder: the output folder, also the Kubernetes object name part and label.
        command: the :class:`Command` that runs it.
        section: the PipelineConfig field holding its options (None: defaults only).
        inputs: its config's input fields and what they are wired to.
        fixed: other config fields the step sets (``tag`` of an evaluation).
        resources: its key in ``kubernetes.resources`` and ``kubernetes.job.deadlines``
            (steps sharing a key share one :class:`Sizing`).
        sizing: the defaults of that key.
        gpu: in the GPU profile it runs on GPUs (the trainer image).
        distributed: with several GPUs or nodes it runs under torchrun.
        runs_model_code: it executes model- or teacher-written code (in the sandbox):
            its pod's egress is locked to DNS and the object store.
        asks_teacher: it calls the teacher, so a teacher server (vLLM) may run beside it.
        hub: it may download models from the hub (gets the hub token).
        when: ``always``; ``tiny_model``: only when the pipeline's model is ``tiny``;
            ``model_cache``: only when the model is a hub id and the cluster's model
            cache is a PVC (trackb_core.pipeline.warms_cache).
    """

    folder: str
    command: str
    section: str | None
    inputs: Mapping[str, Input]
    resources: str
    sizing: Sizing
    fixed: Mapping[str, Any] = field(default_factory=dict)
    gpu: bool = False
    distributed: bool = False
    runs_model_code: bool = False
    asks_teacher: bool = False
    hub: bool = False
    when: Literal["always", "tiny_model", "model_cache"] = "always"

    def __post_init__(self) -> None:
        # read-only views: a Step is shared by every run
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    @property
    def cli(self) -> Command:
        """Its :class:`Command`."""
        return command(self.command)

    @property
    def loads_model(self) -> bool:
        """Whether one of its inputs is the base model."""
        return any(isinstance(ref, BaseModelRef) for ref in self.inputs.values())


PREDICT_SIZING = Sizing("predict-baseline and predict-post, each: eval's generation on a "
                        "GPU (no model-written code runs there).", "1", "4Gi", "4", "14Gi",
                        deadline=6 * 3600, disk="8Gi", shm="1Gi", gpus=1)
SCORE_SIZING = Sizing("eval-baseline and eval-post, each: scoring, which runs model-written "
                      "unit tests in the sandbox (no GPU).", "1", "2Gi", "4", "6Gi",
                      deadline=3600)

# Requests are modest so that the CPU profile schedules on a laptop kind cluster; limits
# leave room to burst. A T4 node (e.g. g4dn.xlarge: 4 vCPU, 16 GiB) fits one GPU pod.
STEPS: tuple[Step, ...] = (
    Step("extract", "extract", "extract", {"corpus": Setting("corpus")}, "extract",
         Sizing("extract (downloads and parses the corpus; derives hidden tests by running "
                "corpus code in the sandbox, one child per CPU).", "500m", "1Gi", "2", "4Gi",
                deadline=3600, disk="4Gi")),
    Step("generate", "generate", "generate", {"tasks": Output("extract")}, "generate",
         Sizing("The generate client (an HTTP client of the teacher; also its "
                "wait-for-teacher step).", "250m", "512Mi", "1", "2Gi", deadline=6 * 3600),
         asks_teacher=True),
    # Runs teacher-written unit tests: 4 filter processes, each with sandbox children
    # (dataset.filter_workers).
    Step("build-dataset", "build-dataset", "dataset", {"responses": Output("generate")},
         "build_dataset",
         Sizing("build-dataset (runs unit tests in the sandbox).", "1", "2Gi", "4", "6Gi",
                deadline=1800),
         runs_model_code=True),
    Step("tiny-model", "tiny-model", "tiny_model", {"corpus": Setting("corpus")},
         "tiny_model",
         Sizing("tiny-model (CPU pretraining of the demo model).", "1", "2Gi", "4", "6Gi",
                deadline=3600),
         hub=True, when="tiny_model"),
    # Fills the cache PVC from the hub before train and predict load the model from it
    # offline; it starts with the run (it reads no other step's output).
    Step("warm-cache", "warm-cache", None, {"model": Setting("model")}, "warm_cache",
         Sizing("warm-cache (downloads the base model into the cache PVC; the files go to "
                "the PVC, not the pod's disk).", "250m", "1Gi", "2", "4Gi",
                deadline=2 * 3600),
         hub=True, when="model_cache"),
    Step("train", "train", "train",
         {"dataset": Output("build-dataset"), "model": BASE_MODEL}, "train",
         Sizing("train; gpus is the GPU count per node (> 1 runs torchrun).", "1", "4Gi",
                "4", "14Gi", deadline=12 * 3600, disk="8Gi", shm="2Gi", gpus=1),
         gpu=True, distributed=True, hub=True),
    # Evaluation is two steps per side: generation on a GPU, where no model-written code
    # runs, and scoring on a CPU, where it runs in the sandbox behind locked egress (and,
    # on Kubernetes, the runtime class code-running pods may get: gVisor).
    Step("predict-baseline", "eval", "eval",
         {"dataset": Output("build-dataset"), "model": BASE_MODEL, "adapter": None}, "eval",
         PREDICT_SIZING, fixed={"tag": "baseline", "score": False}, gpu=True, hub=True),
    Step("eval-baseline", "score", "score",
         {"dataset": Output("build-dataset"), "predictions": Output("predict-baseline")},
         "score", SCORE_SIZING, fixed={"tag": "baseline"}, runs_model_code=True),
    Step("predict-post", "eval", "eval",
         {"dataset": Output("build-dataset"), "model": BASE_MODEL,
          "adapter": Output("train")}, "eval",
         PREDICT_SIZING, fixed={"tag": "post_sft", "score": False}, gpu=True, hub=True),
    Step("eval-post", "score", "score",
         {"dataset": Output("build-dataset"), "predictions": Output("predict-post")},
         "score", SCORE_SIZING, fixed={"tag": "post_sft"}, runs_model_code=True),
    Step("compare", "compare", None,
         {"baseline": Output("eval-baseline"), "post": Output("eval-post")}, "compare",
         Sizing("compare.", "250m", "512Mi", "1", "2Gi", deadline=900)),
)


def step(folder: str) -> Step:
    """The step whose output folder is ``folder``. Raises KeyError if there is none."""
    for candidate in STEPS:
        if candidate.folder == folder:
            return candidate
    raise KeyError(folder)


def resource_keys() -> dict[str, Sizing]:
    """``{resources key: its sizing}`` in table order. Raises ValueError if two steps
    sharing a key disagree on its sizing."""
    found: dict[str, Sizing] = {}
    for row in STEPS:
        if found.setdefault(row.resources, row.sizing) != row.sizing:
            raise ValueError(f"steps with resources key {row.resources!r} disagree on its "
                             "sizing")
    return found


def deadline_doc(key: str) -> str:
    """What ``kubernetes.job.deadlines.<key>`` bounds, in words."""
    rows = [row for row in STEPS if row.resources == key]
    text = " and ".join(row.folder for row in rows) + (", each" if len(rows) > 1 else "")
    if any(row.asks_teacher for row in rows):
        text += " (the teacher server's start included)"
    return text + "."


def sections() -> dict[str, list[Step]]:
    """``{PipelineConfig section: the steps configured by it}`` in table order."""
    found: dict[str, list[Step]] = {}
    for row in STEPS:
        if row.section is not None:
            found.setdefault(row.section, []).append(row)
    return found
