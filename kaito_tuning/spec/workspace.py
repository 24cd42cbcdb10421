"""The Workspace resource (group kaito.sh), as users write it: v1alpha1 and v1beta1.

Like Kaito there is no ``spec:`` wrapper: ``resource``, ``inference``, ``tuning`` and ``status``
sit at the top level. These dataclasses are the single source of truth: the CRD in ``crds/``
is generated from them (``kaito-tuning crd``) and the parser below is driven by them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kaito_tuning.errors import Problem
from kaito_tuning.spec.files import bounded
from kaito_tuning.spec.schema import from_json, openapi_schema, spec, to_json

GROUP = "kaito.sh"
VERSIONS = ("v1alpha1", "v1beta1")
STORAGE_VERSION = "v1beta1"
KIND = "Workspace"
PLURAL = "workspaces"
V1ALPHA1_DEFAULT_INSTANCE_TYPE = "Standard_NC24ads_A100_v4"
MAX_ADAPTERS = 10


@dataclass
class LabelSelectorRequirement:
    key: str = spec("The label key the selector applies to.", required=True)
    operator: str = spec("How the key relates to the values: In, NotIn, Exists or DoesNotExist.",
                         required=True, enum=["In", "NotIn", "Exists", "DoesNotExist"])
    values: list[str] = spec("Label values; non-empty for In and NotIn, empty for Exists and DoesNotExist.",
                             default=[])


@dataclass
class LabelSelector:
    match_labels: dict[str, str] = spec(
        "Labels the GPU nodes must carry. The tuning pod is pinned to nodes with all of them; "
        "auto-provisioned nodes are created with them.", default={})
    match_expressions: list[LabelSelectorRequirement] = spec(
        "Further node label requirements (ANDed with matchLabels).", default=[])


@dataclass
class GPUPartition:
    mode: str = spec("GPU partitioning technology: mig (NVIDIA Multi-Instance GPU) or accelerator (whole GPUs).",
                     required=True, enum=["mig", "accelerator"])
    profile: str | None = spec("The partition profile for mig, e.g. 1g.10gb.")
    count: int | None = spec("Whole GPUs to allocate (accelerator mode only).", minimum=1)


@dataclass
class ResourceSpec:
    instance_type: str | None = spec(
        "GPU instance type the workload runs on, e.g. Standard_NC24ads_A100_v4 or g5.xlarge. "
        "Decides the GPU count requested and is checked against the preset's GPU memory need.")
    count: int = spec("Number of nodes. Tuning runs on exactly one.", default=1, schema_default=1, minimum=0)
    label_selector: LabelSelector | None = spec(
        "Selects the GPU nodes the workload may run on (bring-your-own nodes), and labels auto-provisioned ones.",
        required=True)
    preferred_nodes: list[str] = spec("Existing nodes to prefer when provisioning (deprecated in v1beta1).",
                                      default=[])
    partition: GPUPartition | None = spec(
        "GPU partitioning (v1beta1; Kaito's MIG feature). Accepted by the schema; this operator refuses it "
        "(tuning never uses partitions, and serving runs on whole GPUs).", versions=("v1beta1",))


@dataclass
class PresetOptions:
    image: str | None = spec(
        "An image holding the base model's weights (Kaito's model artifact, one file per layer, or a container image "
        "with them under /workspace/weights): for tuning, the download step pulls it into the weights cache, so the "
        "hub is never asked. Deprecated in Kaito's v1beta1.")
    image_pull_secrets: list[str] = spec(
        "Names of kubernetes.io/dockerconfigjson secrets to pull `image` with (deprecated in Kaito's v1beta1).",
        default=[])
    model_access_secret: str | None = spec(
        "Name of a secret with key HF_TOKEN, used to download gated models (v1beta1).", versions=("v1beta1",))


@dataclass
class PresetSpec:
    name: str = spec("Preset model name, e.g. phi-3-mini-128k-instruct (or its Hugging Face id). "
                     "`kaito-tuning presets` lists them.", required=True)
    access_mode: str | None = spec("public or private (kept for Kaito compatibility; weights come from the preset's source).",
                                   enum=["public", "private"], schema_default="public")
    preset_options: dict | None = spec(
        "Kaito's presetOptions: image (and imagePullSecrets) holds the base model's weights for tuning; "
        "modelAccessSecret names a secret with key HF_TOKEN for gated models.", schema_type=PresetOptions)


@dataclass
class DataSource:
    name: str | None = spec("A name for this data source (used in volume names; immutable).")
    urls: list[str] = spec("http(s) URLs of dataset files (parquet, JSON lines, JSON or CSV). Every file is used.",
                           default=[])
    image: str | None = spec("An image whose /data directory holds the dataset (or, for adapters, the adapter).")
    image_pull_secrets: list[str] = spec(
        "Names of kubernetes.io/dockerconfigjson secrets to pull `image` with.", default=[])
    volume_source: dict | None = spec(
        "A Kubernetes VolumeSource holding the data, mounted read-only at /mnt/data.", schemaless=True)


@dataclass
class DataDestination:
    image: str | None = spec("Image reference (registry/repository:tag) the adapter is pushed to.")
    image_push_secret: str | None = spec(
        "Name of a kubernetes.io/dockerconfigjson secret with push rights to `image`'s registry.")
    volume_source: dict | None = spec(
        "A Kubernetes VolumeSource the adapter (and checkpoints) are written to.", schemaless=True)


_INPUT_CEL = [{"rule": "[has(self.urls) && size(self.urls) > 0, has(self.image), has(self.volumeSource)]"
                       ".filter(x, x).size() == 1",
               "message": "exactly one of urls, image or volumeSource must be set"}]
_OUTPUT_CEL = [
    {"rule": "has(self.image) != has(self.volumeSource)", "message": "exactly one of image or volumeSource must be set"},
    {"rule": "!has(self.image) || has(self.imagePushSecret)", "message": "imagePushSecret is required with image"},
]


@dataclass
class TuningSpec:
    preset: PresetSpec | None = spec("The base model to tune.", required=True)
    method: str | None = spec("lora (bf16 base) or qlora (4-bit base). Case-insensitive.", required=True)
    config: str | None = spec(
        "Name of a ConfigMap in the workspace's namespace with key training_config.yaml "
        "(sections ModelConfig, QuantizationConfig, LoraConfig, TrainingArguments, DataCollator, DatasetConfig). "
        "Empty: the method's default.")
    input: DataSource | None = spec("Where the training data comes from.", required=True, cel=_INPUT_CEL)
    output: DataDestination | None = spec("Where the trained adapter goes.", required=True, cel=_OUTPUT_CEL)


@dataclass
class AdapterSpec:
    source: DataSource | None = spec("The adapter: name (a DNS label, unique) and image (+imagePullSecrets) or volumeSource.",
                                     required=True)
    strength: str | None = spec('Weight of this adapter, "0.0" to "1.0" (default "1.0").')


@dataclass
class InferenceSpec:
    preset: PresetSpec | None = spec("The base model to serve.")
    adapters: list[AdapterSpec] = spec("LoRA adapters to attach (at most 10).", default=[], max_items=MAX_ADAPTERS)
    config: str | None = spec("Name of a ConfigMap with inference parameters.")
    template: dict | None = spec(
        "Kaito's custom pod template (instead of preset). Accepted by the schema; this operator serves presets "
        "only and refuses it.", schemaless=True)


@dataclass
class Condition:
    type: str = spec("Condition type: ResourceReady, JobStarted, WorkspaceSucceeded, InferenceReady, ...",
                     required=True, max_length=316)
    status: str = spec("True, False or Unknown.", required=True, enum=["True", "False", "Unknown"])
    observed_generation: int | None = spec("The metadata.generation the condition was computed from.", minimum=0,
                                           extra={"format": "int64"})
    last_transition_time: str = spec("When the status last changed.", required=True,
                                     extra={"format": "date-time"})
    reason: str = spec("CamelCase reason, e.g. InvalidSpec, OutOfMemory, Succeeded.", required=True,
                       max_length=1024)
    message: str = spec("What happened, for people.", required=True)


@dataclass
class Metric:
    description: str = spec("Benchmark type and load pattern.", required=True)
    value: str = spec("The measured value.", required=True)
    unit: str | None = spec("Unit of the value.")
    config: dict[str, str] = spec("Benchmark parameters.", default={})


@dataclass
class Performance:
    metrics: dict[str, Metric] = spec("Kaito's inference benchmark metrics by name (not written by this operator).",
                                      default={})


@dataclass
class WorkspaceStatus:
    worker_nodes: list[str] = spec("Nodes the workload runs on.", default=[])
    conditions: list[Condition] = spec("Conditions of the workspace (Kaito's types, plus NodeClaimReady).",
                                       default=[])
    state: str | None = spec("Pending, Running, Succeeded or Failed (tuning); Ready or NotReady (inference).")
    target_node_count: int | None = spec("Nodes the workspace needs.", extra={"format": "int32"})
    performance: Performance | None = spec("Kaito's inference benchmark results (kept when present).")
    tuning: dict | None = spec(
        "This operator's tuning run (not in Kaito): revision, jobName, specHash, startedAt, finishedAt, "
        "progress {step, totalSteps, epoch, loss, evalLoss, etaSeconds}, output {image, digest | volume}, "
        "failure and lastAttemptFailure {reason, message, container, exitCode}, note.", schemaless=True)
    inference: dict | None = spec("This operator's serving details (not in Kaito).", schemaless=True)


@dataclass
class Workspace:
    api_version: str | None = spec("kaito.sh/v1alpha1 or kaito.sh/v1beta1.")
    kind: str | None = spec("Workspace.")
    resource: ResourceSpec | None = spec("The GPU nodes the workspace runs on.")
    inference: InferenceSpec | None = spec("Serve a preset model, optionally with adapters. Exclusive with tuning.")
    tuning: TuningSpec | None = spec("Fine-tune a preset model with LoRA or QLoRA. Exclusive with inference.")
    status: dict | None = spec("Observed state, written by the operator (not checked when a file is validated).",
                               schema_type=WorkspaceStatus, check=False)
    metadata: dict | None = spec("Standard object metadata.", schemaless=True)

    @property
    def name(self) -> str:
        return (self.metadata or {}).get("name") or ""

    @property
    def namespace(self) -> str:
        return (self.metadata or {}).get("namespace") or "default"

    @property
    def version(self) -> str:
        return (self.api_version or "").partition("/")[2]

    def to_dict(self) -> dict:
        return to_json(self)


_ROOT_CEL = [
    {"rule": "has(self.tuning) != has(self.inference)",
     "message": "exactly one of tuning or inference must be set"},
]


def crd_schema(version: str) -> dict:
    """openAPIV3Schema for one served version."""
    overrides = {}
    if version == "v1alpha1":
        overrides["resource.instanceType"] = {"default": V1ALPHA1_DEFAULT_INSTANCE_TYPE}
    s = openapi_schema(Workspace, overrides, version)
    s["properties"]["metadata"] = {"type": "object"}
    s["required"] = ["resource"]
    s["x-kubernetes-validations"] = _ROOT_CEL
    s["description"] = ("Workspace: GPU nodes plus either an inference service or a tuning run "
                        "(kaito.sh; fields at the top level, no spec wrapper).")
    return s


def parse_workspace(obj: dict, path: str = "") -> tuple[Workspace, list[Problem]]:
    """Parse a Workspace mapping; apply defaults. Returns the object and the structural problems."""
    problems: list[Problem] = []
    ws = from_json(Workspace, obj, path, problems)
    apply_defaults(ws)
    return ws, bounded(problems)


def apply_defaults(ws: Workspace) -> None:
    if ws.resource and ws.version == "v1alpha1" and not ws.resource.instance_type:
        ws.resource.instance_type = V1ALPHA1_DEFAULT_INSTANCE_TYPE
    if ws.tuning and ws.tuning.method:
        ws.tuning.method = ws.tuning.method.strip().lower()
    for part in (ws.tuning, ws.inference):
        if part is not None and part.preset is not None and part.preset.access_mode is None:
            part.preset.access_mode = "public"  # the CRD's default, also for files that never met the API server
    if ws.inference:
        for a in ws.inference.adapters:
            if a.strength is None:
                a.strength = "1.0"
