"""Semantic validation of a Workspace: every rule a schema cannot say alone.

Each rule appends ``Problem(field.path, message)``; messages say what is wrong and what to do.
The same functions back ``kaito-tuning validate``, the admission webhook and the tuner.
"""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import urlsplit

from kaito_tuning import addresses, redact
from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.errors import Problem, ValidationError
from kaito_tuning.spec import memory
from kaito_tuning.spec.files import bounded, short
from kaito_tuning.spec.instances import INSTANCE_TYPES, UnknownInstanceType, get_instance_type
from kaito_tuning.spec.presets import METHODS, UnknownPreset, get_preset
from kaito_tuning.spec.workspace import (
    GROUP,
    KIND,
    MAX_ADAPTERS,
    VERSIONS,
    DataDestination,
    DataSource,
    Workspace,
    parse_workspace,
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def dns_label_problem(value: str, path: str, max_len: int = 63) -> Problem | None:
    if not value or len(value) > max_len or not _DNS_LABEL.match(value):
        return Problem(path, f"{short(value)} is not a valid name: use at most {max_len} lowercase letters, digits "
                             "and '-', starting and ending with a letter or digit")
    return None


def dns_subdomain_problem(value: str, path: str) -> Problem | None:
    if not value or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        return Problem(path, f"{short(value)} is not a valid Kubernetes object name: lowercase letters, digits, "
                             "'-' and '.', starting and ending with a letter or digit")
    return None


def image_problem(ref: str, path: str, *, require_tag: bool = False) -> Problem | None:
    try:
        imageref.parse(ref, require_tag=require_tag)
    except imageref.InvalidReference as e:
        return Problem(path, str(e))
    return None


#: volume types a workspace may mount (issue 11): input (and adapters) and output. configMap is input only.
INPUT_VOLUME_TYPES = ("persistentVolumeClaim", "emptyDir", "csi", "nfs", "azureFile", "configMap")
OUTPUT_VOLUME_TYPES = ("persistentVolumeClaim", "emptyDir", "csi", "nfs", "azureFile")
#: what ``local=True`` (``kaito-tuning run`` on this machine) adds: a directory of this machine
LOCAL_VOLUME_TYPES = ("hostPath",)
_REQUIRED_KEYS = {"persistentVolumeClaim": ("claimName",), "configMap": ("name",), "nfs": ("server", "path"),
                  "csi": ("driver",), "azureFile": ("secretName", "shareName"), "hostPath": ("path",)}


def validate_workspace(ws: Workspace, *, allow_private_urls: bool = True, volume_types: tuple[str, ...] | None = None,
                       local: bool = False) -> list[Problem]:
    """All semantic problems of a parsed Workspace (structure was checked by the parser).

    ``volume_types``: the volume types input and output may use (default INPUT_VOLUME_TYPES, and
    OUTPUT_VOLUME_TYPES for output; configMap is never an output). ``local``: also allow hostPath,
    for runs on this machine (``kaito-tuning run``), never in a cluster.
    """
    inputs = tuple(volume_types) if volume_types is not None else INPUT_VOLUME_TYPES
    outputs = tuple(t for t in inputs if t != "configMap") if volume_types is not None else OUTPUT_VOLUME_TYPES
    if local:
        inputs, outputs = inputs + LOCAL_VOLUME_TYPES, outputs + LOCAL_VOLUME_TYPES
    return bounded(_validate_workspace(ws, allow_private_urls, inputs, outputs))


def _validate_workspace(ws: Workspace, allow_private_urls: bool, inputs: tuple, outputs: tuple) -> list[Problem]:
    p: list[Problem] = []
    if ws.api_version is not None:
        group, _, version = ws.api_version.partition("/")
        if group != GROUP or version not in VERSIONS:
            p.append(Problem("apiVersion", f"must be {GROUP}/v1alpha1 or {GROUP}/v1beta1, got {short(ws.api_version)}"))
    if ws.kind is not None and ws.kind != KIND:
        p.append(Problem("kind", f"must be {KIND}, got {short(ws.kind)}"))
    name = (ws.metadata or {}).get("name")
    if name is None:
        p.append(Problem("metadata.name", "is required"))
    elif not isinstance(name, str):
        p.append(Problem("metadata.name", f"must be a string, got {short(name)}"))
    elif (e := dns_label_problem(name, "metadata.name")):
        p.append(e)
    namespace = (ws.metadata or {}).get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or dns_label_problem(namespace, "")):
        p.append(Problem("metadata.namespace", f"{short(namespace)} is not a valid namespace name"))
    p += _version_problems(ws)
    if ws.tuning is None and ws.inference is None:
        p.append(Problem("", "a workspace needs either tuning or inference; neither is set"))
    elif ws.tuning is not None and ws.inference is not None:
        p.append(Problem("", "a workspace has either tuning or inference, not both; split it into two workspaces"))
    if ws.resource is None:
        p.append(Problem("resource", "is required: give instanceType and labelSelector"))
    elif ws.resource.label_selector is not None:
        sel = ws.resource.label_selector
        if not sel.match_labels and not sel.match_expressions:
            p.append(Problem("resource.labelSelector", "must have matchLabels (the labels of the GPU nodes to use)"))
        for k, v in sel.match_labels.items():
            if len(v) > 63 or (v and not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", v)):
                p.append(Problem(f"resource.labelSelector.matchLabels.{k}", f"{short(v)} is not a valid label value"))
    if ws.tuning is not None:
        p += _validate_tuning(ws, allow_private_urls)
        if ws.tuning.input is not None and ws.tuning.input.volume_source:
            p += volume_problems(ws.tuning.input.volume_source, "tuning.input.volumeSource", inputs)
        if ws.tuning.output is not None and ws.tuning.output.volume_source:
            p += volume_problems(ws.tuning.output.volume_source, "tuning.output.volumeSource", outputs)
    if ws.inference is not None:
        p += _validate_inference(ws)
        for i, a in enumerate(ws.inference.adapters):
            if a.source is not None and a.source.volume_source:
                p += volume_problems(a.source.volume_source, f"inference.adapters[{i}].source.volumeSource", inputs)
    return p


def volume_problems(source: dict, path: str, allowed: tuple[str, ...]) -> list[Problem]:
    """Problems of a VolumeSource: exactly one volume type, one of ``allowed``, with its required keys."""
    kinds = list(source)
    allowed_text = ", ".join(allowed)
    if len(kinds) != 1:
        shown = ", ".join(short(k, 40) for k in kinds[:5])
        return [Problem(path, f"must name exactly one volume type ({allowed_text}); it names {len(kinds)}"
                              + (f": {shown}" if kinds else ""))]
    kind, body = kinds[0], source[kinds[0]]
    if kind not in allowed:
        return [Problem(f"{path}.{short(kind, 40) if not isinstance(kind, str) else kind[:40]}",
                        f"volume type is not allowed here; allowed: {allowed_text}")]
    if body is None and kind == "emptyDir":
        return []
    if not isinstance(body, dict):
        return [Problem(f"{path}.{kind}", f"must be a mapping, got {short(body)}")]
    return [Problem(f"{path}.{kind}.{key}", "is required") for key in _REQUIRED_KEYS.get(kind, ())
            if not isinstance(body.get(key), str) or not body.get(key)]


def _version_problems(ws: Workspace) -> list[Problem]:
    """Fields Kaito has only in v1beta1, and the Kaito fields this operator does not implement."""
    p: list[Problem] = []
    v1alpha1 = ws.version == "v1alpha1"
    if ws.resource is not None and ws.resource.partition is not None:
        if v1alpha1:
            p.append(Problem("resource.partition", "exists only in kaito.sh/v1beta1"))
        elif ws.tuning is not None:
            p.append(Problem("resource.partition", "GPU partitioning is not supported for tuning; remove partition"))
        else:
            p.append(Problem("resource.partition", "GPU partitioning is not supported by this operator; "
                                                   "serve on whole GPUs (remove partition)"))
    for part, where in ((ws.tuning, "tuning"), (ws.inference, "inference")):
        opts = (part.preset.preset_options or {}) if part is not None and part.preset is not None else {}
        if v1alpha1 and "modelAccessSecret" in opts:
            p.append(Problem(f"{where}.preset.presetOptions.modelAccessSecret", "exists only in kaito.sh/v1beta1"))
    if ws.inference is not None and ws.inference.template is not None:
        p.append(Problem("inference.template", "custom pod templates are not supported by this operator; "
                                               "remove template and set preset.name"))
    return p


def _validate_tuning(ws: Workspace, allow_private_urls: bool) -> list[Problem]:
    p: list[Problem] = []
    t = ws.tuning
    method = t.method
    if method is not None and method not in METHODS:
        p.append(Problem("tuning.method", f"{short(method)} is not supported: use lora or qlora"))
        method = None
    preset = None
    if t.preset is not None and t.preset.name:
        try:
            preset = get_preset(t.preset.name)
        except UnknownPreset as e:
            p.append(Problem("tuning.preset.name", str(e)))
        else:
            if not preset.methods:
                p.append(Problem("tuning.preset.name", f"preset {short(preset.name)} does not support tuning; "
                                                       "`kaito-tuning presets` lists the tunable ones"))
                preset = None
            elif method and not preset.supports(method):
                p.append(Problem("tuning.method", f"preset {short(preset.name)} cannot be tuned with {method}; "
                                                  f"it supports {', '.join(preset.methods)}"))
    if t.preset is not None:
        p += _preset_options_problems(t.preset.preset_options or {}, "tuning.preset.presetOptions")
    if ws.resource is not None:
        r = ws.resource
        p += _node_count_problems(ws)
        if r.instance_type:
            try:
                inst = get_instance_type(r.instance_type)
            except UnknownInstanceType as e:
                p.append(Problem("resource.instanceType", str(e)))
            else:
                if not inst.cuda:
                    p.append(Problem("resource.instanceType",
                                     f"{inst.name} has {inst.gpu_model} accelerators; the tuner runs on NVIDIA GPUs "
                                     "(CUDA): choose an NVIDIA instance type, e.g. Standard_NC24ads_A100_v4"))
                elif preset and method:
                    p += _memory_problems(preset, method, inst, r.count if isinstance(r.count, int) else 1)
    if t.config is not None and (e := dns_subdomain_problem(t.config, "tuning.config")):
        p.append(e)
    if t.input is not None:
        p += _validate_input(t.input, "tuning.input", allow_private_urls)
    if t.output is not None:
        p += _validate_output(t.output, "tuning.output")
    return p


def _preset_options_problems(opts: dict, path: str) -> list[Problem]:
    """``presetOptions.image``: the base weights' image (an artifact in Kaito's shape, or a model image);
    ``imagePullSecrets``: dockerconfigjson secrets for it, or for the operator's preset registry."""
    p: list[Problem] = []
    image = opts.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        p.append(Problem(f"{path}.image", "must be an image reference such as registry/repository:tag"))
    elif image and (e := image_problem(image, f"{path}.image")):
        p.append(Problem(e.path, f"{e.message}; it names the image holding the base model's weights"))
    for i, s in enumerate(opts.get("imagePullSecrets") or []):
        if not isinstance(s, str) or not s:
            p.append(Problem(f"{path}.imagePullSecrets[{i}]", "is empty"))
        elif (e := dns_subdomain_problem(s, f"{path}.imagePullSecrets[{i}]")):
            p.append(e)
    return p


#: nodes one tuning run may span (resource.count)
MAX_TUNING_NODES = 64


def _node_count_problems(ws: Workspace) -> list[Problem]:
    """resource.count for tuning: 1 to MAX_TUNING_NODES; several nodes write their output to an image."""
    count = ws.resource.count
    if not isinstance(count, int) or not 1 <= count <= MAX_TUNING_NODES:
        return [Problem("resource.count", f"tuning runs on 1 to {MAX_TUNING_NODES} nodes; got {short(count)}")]
    if count == 1:
        return []
    p = []
    if ws.tuning.output is not None and ws.tuning.output.volume_source:
        p.append(Problem("resource.count", f"{count} nodes cannot share tuning.output.volumeSource: every node keeps "
                                           "its own checkpoints in the output directory; use tuning.output.image "
                                           "(node 0 pushes the adapter) or count 1"))
    name = (ws.metadata or {}).get("name")
    # an Indexed Job's pods are named (and their hostnames are) <job>-<index>: a DNS label, at most 63 characters
    if isinstance(name, str) and len(name) + len(f"-{count - 1}") > 63:
        p.append(Problem("metadata.name", f"is too long for {count} nodes: the pods' hostnames are <name>-<index>, "
                                          f"at most 63 characters; use at most {63 - len(f'-{count - 1}')} characters"))
    return p


def _memory_problems(preset, method: str, inst, nodes: int) -> list[Problem]:
    """The GPU-memory check, per GPU: one whole model per GPU, or sharded over every GPU of the nodes (FSDP)."""
    choice = memory.choose(preset, method, inst, nodes)
    if choice.fits:
        return []
    candidates = {t.name: t for t in INSTANCE_TYPES.values() if t.cuda}.values()
    fitting_types = sorted((t for t in candidates if memory.choose(preset, method, t, nodes).fits),
                           key=lambda t: (t.total_gpu_memory_gib, t.gpu_memory_gib, t.cloud != "azure", t.name))
    fits = ", ".join(f"{t.name} ({t.gpu_count}x{t.gpu_memory_gib} GiB)" for t in fitting_types[:4]) or "none"
    alt = ""
    if method == "lora" and preset.supports("qlora") and memory.choose(preset, "qlora", inst, nodes).fits:
        alt = "; or use method qlora, which fits"
    where = f"{nodes} nodes of {inst.name} have" if nodes > 1 else f"{inst.name} has"
    sharded = ""
    if nodes * inst.gpu_count > 1:
        sharded = f"; sharded over all {nodes * inst.gpu_count} GPUs (FSDP) still about {choice.per_gpu_gib:.0f} GiB"
    return [Problem("resource.instanceType",
                    f"{preset.name} with {method} needs about {choice.need_gib:g} GiB of GPU memory, but {where} "
                    f"{inst.gpu_memory_gib} GiB per GPU ({inst.gpu_model}){sharded}{alt}; instance types that fit: "
                    f"{fits}")]


def _validate_input(src: DataSource, path: str, allow_private_urls: bool) -> list[Problem]:
    p: list[Problem] = []
    given = [k for k, v in (("urls", src.urls), ("image", src.image), ("volumeSource", src.volume_source)) if v]
    if len(given) != 1:
        what = "none is set" if not given else f"{' and '.join(given)} are set"
        p.append(Problem(path, f"exactly one of urls, image or volumeSource must be set; {what}"))
    if src.name is not None and (e := dns_label_problem(src.name, f"{path}.name")):
        p.append(e)
    for i, url in enumerate(src.urls):
        if (msg := url_problem(url, allow_private=allow_private_urls)):
            p.append(Problem(f"{path}.urls[{i}]", msg))
    if len(set(src.urls)) != len(src.urls):
        p.append(Problem(f"{path}.urls", "lists the same URL twice"))
    if src.image and (e := image_problem(src.image, f"{path}.image")):
        p.append(e)
    for i, s in enumerate(src.image_pull_secrets):
        if not s.strip():
            p.append(Problem(f"{path}.imagePullSecrets[{i}]", "is empty"))
    if src.image_pull_secrets and not src.image:
        p.append(Problem(f"{path}.imagePullSecrets", "is only used with image"))
    return p


def _validate_output(dst: DataDestination, path: str) -> list[Problem]:
    p: list[Problem] = []
    if bool(dst.image) == bool(dst.volume_source):
        what = "both are set" if dst.image else "neither is set"
        p.append(Problem(path, f"exactly one of image or volumeSource must be set; {what}"))
    if dst.image:
        if (e := image_problem(dst.image, f"{path}.image", require_tag=True)):
            p.append(e)
        if not dst.image_push_secret:
            p.append(Problem(f"{path}.imagePushSecret",
                             "is required with image: name a kubernetes.io/dockerconfigjson secret that can push to it"))
    # imagePushSecret next to volumeSource is accepted (Kaito accepts it) and not used
    # The secret's name is not checked against the name grammar: Kaito's quick start uses the placeholder
    # ACR_REGISTRY_SECRET_HERE, which must be accepted as written. The operator reports a secret that
    # does not exist (or is of the wrong type) in the workspace status.
    return p


_SPACE = re.compile(r"\s")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def url_problem(url: str, *, allow_private: bool = True) -> str | None:
    """Why ``url`` cannot be a dataset URL, or None. The URL is shown redacted (``redact.url``: no userinfo,
    query or fragment), whatever is wrong with it: a signed URL's signature or a password must not reach a
    status, an Event or a log because the URL had a typo."""
    if not isinstance(url, str) or not url.strip():
        return "is empty"

    def shown() -> str:  # only when something is wrong: every reconcile validates every URL
        return short(redact.url(url))

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"{shown()} is not a valid URL ({e})"
    if parts.scheme not in ("http", "https"):
        if not parts.scheme:
            return f"{shown()} is not a URL: write it as https://host/path"
        return f"{shown()} uses {short(parts.scheme)}; only http and https URLs are supported"
    if (bad := _SPACE.search(url)):
        return f"{shown()} contains white space{_in_query(url, bad.start())}; percent-encode it (%20)"
    if (bad := _CONTROL.search(url)):
        return f"{shown()} contains the control character U+{ord(bad.group()):04X}{_in_query(url, bad.start())}; remove it"
    if not parts.hostname:
        return f"{shown()} has no host"
    if parts.username is not None or parts.password is not None:
        return ("must not carry credentials (user:password@); they would be stored in the workspace in clear "
                "text. Serve the file from a URL that needs none, or use tuning.input.image with imagePullSecrets")
    del port
    if not allow_private and (why := private_target(parts.hostname)):
        return f"{shown()} targets {why}; this operator refuses private, loopback and metadata addresses"
    return None


def _in_query(url: str, index: int) -> str:
    """Where character ``index`` of ``url`` is, when the redacted URL does not show it."""
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    return " in its query or fragment" if index > cut else ""


def private_target(host: str) -> str | None:
    """Why ``host`` is private/loopback/link-local/CGNAT/metadata, or None (``kaito_tuning.addresses``, the
    policy the Job's downloader applies on every hop). Resolves names: admission catches the plain cases;
    the downloader checks the address it really connects to (DNS may answer differently then)."""
    h = host.strip("[]").lower()
    if (why := addresses.forbidden_host(h)):
        return f"{short(h)}, which {why}"
    for address in resolve(h):  # none: unresolvable here; the downloader checks the address it reaches
        if (why := addresses.forbidden(address)):
            return f"{short(h)}, which resolves to {address}, which {why}"
    return None


#: how long a host's addresses are reused. The operator validates every workspace on every reconcile and
#: a cluster's workspaces name few hosts: one lookup per host and minute, not one per reconcile (a slow
#: resolver made 300 workspaces wait on ~0.2 s lookups, one at a time)
RESOLVE_TTL_SECONDS = 60.0
_RESOLVED: dict[str, tuple[float, tuple[str, ...]]] = {}


def resolve(host: str) -> tuple[str, ...]:
    """The addresses ``host`` resolves to (empty when it does not), cached for ``RESOLVE_TTL_SECONDS``."""
    now = time.monotonic()
    hit = _RESOLVED.get(host)
    if hit is not None and now - hit[0] < RESOLVE_TTL_SECONDS:
        return hit[1]
    try:
        found = tuple(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None)))
    except OSError:
        found = ()
    if len(_RESOLVED) >= 4096:  # bounded: names in workspaces are user input
        _RESOLVED.clear()
    _RESOLVED[host] = (now, found)
    return found


def _validate_inference(ws: Workspace) -> list[Problem]:
    p: list[Problem] = []
    inf = ws.inference
    if inf.preset is None or not inf.preset.name:
        if inf.template is None:
            p.append(Problem("inference.preset.name", "is required"))
    else:
        try:
            get_preset(inf.preset.name, purpose="inference")
        except UnknownPreset as e:
            p.append(Problem("inference.preset.name", str(e)))
    if inf.preset is not None:
        p += _preset_options_problems(inf.preset.preset_options or {}, "inference.preset.presetOptions")
    if len(inf.adapters) > MAX_ADAPTERS:
        p.append(Problem("inference.adapters", f"has {len(inf.adapters)} adapters; at most {MAX_ADAPTERS} are allowed"))
    seen: set[str] = set()
    for i, a in enumerate(inf.adapters):
        path = f"inference.adapters[{i}]"
        src = a.source
        if src is None:
            continue
        if not src.name:
            p.append(Problem(f"{path}.source.name", "is required"))
        else:
            if (e := dns_label_problem(src.name, f"{path}.source.name", max_len=55)):
                p.append(e)
            if src.name in seen:
                p.append(Problem(f"{path}.source.name", f"two adapters are named {short(src.name)}; names must be unique"))
            seen.add(src.name)
        if src.urls:
            p.append(Problem(f"{path}.source.urls", "URLs are not supported as an adapter source; use image or volumeSource"))
        if bool(src.image) == bool(src.volume_source):
            p.append(Problem(f"{path}.source", "exactly one of image or volumeSource must be set"))
        if src.image and (e := image_problem(src.image, f"{path}.source.image")):
            p.append(e)
        if (msg := strength_problem(a.strength)):
            p.append(Problem(f"{path}.strength", msg))
    return p


def strength_problem(strength: str | None) -> str | None:
    if strength is None:
        return None
    try:
        v = float(strength)
    except (TypeError, ValueError):
        return f'{short(strength)} is not a number; use a value from "0.0" to "1.0"'
    if not 0.0 <= v <= 1.0:
        return f'{short(strength)} is out of range; use a value from "0.0" to "1.0"'
    return None


def validate_update(old: Workspace, new: Workspace) -> list[Problem]:
    """Changes that are not allowed on an existing workspace."""
    p: list[Problem] = []
    if (old.tuning is None) != (new.tuning is None):
        p.append(Problem("tuning", "cannot be added to or removed from an existing workspace; create a new one"))
    if (old.inference is None) != (new.inference is None):
        p.append(Problem("inference", "cannot be added to or removed from an existing workspace; create a new one"))
    ro, rn = old.resource, new.resource
    if ro and rn:
        if ro.instance_type != rn.instance_type and ro.instance_type:
            p.append(Problem("resource.instanceType", f"is immutable (was {short(ro.instance_type)})"))
        if ro.count != rn.count:
            p.append(Problem("resource.count", f"is immutable (was {ro.count})"))
        if ro.label_selector != rn.label_selector:
            p.append(Problem("resource.labelSelector", "is immutable"))
    to, tn = old.tuning, new.tuning
    if to and tn:
        if (to.preset and to.preset.name) != (tn.preset and tn.preset.name):
            p.append(Problem("tuning.preset.name", f"is immutable (was {short(to.preset and to.preset.name)}); "
                                                   "create a new workspace to tune another model"))
        if (to.method or "").lower() != (tn.method or "").lower():
            p.append(Problem("tuning.method", f"is immutable (was {short(to.method)}); create a new workspace to change it"))
        if to.input and tn.input and to.input.name != tn.input.name:
            p.append(Problem("tuning.input.name", f"is immutable (was {short(to.input.name)})"))
    return p


def load_workspace(obj: dict, *, local: bool = False) -> Workspace:
    """Parse and fully validate (structure and semantics); raise ValidationError listing every problem.

    ``local=True``: the workspace runs on this machine (``kaito-tuning run``), so hostPath volumes are allowed.
    """
    ws, problems = parse_workspace(obj)
    problems = bounded(problems + validate_workspace(ws, local=local))
    if problems:
        raise ValidationError(problems)
    return ws
