"""Which adapters to serve, checked before any weights are loaded.

Adapters come from ``--adapter IMAGE_OR_DIR[=STRENGTH]`` (a directory, or an OCI image pulled with
:func:`kaito_tuning.artifacts.pull_adapter`) or, in a Kaito pod, from ``--adapters-dir /mnt/adapter``:
one subdirectory per adapter, its strength in the environment variable named like the adapter.

Each adapter is served as a model of its own, named after its directory or repository. Before the
base model or any LoRA weight is loaded, every adapter is checked: its name (unique, not the base
model's), its strength ("0.0".."1.0", Kaito's field), its ``adapter_config.json``
(``peft_type``, ``base_model_name_or_path``) and its ``training_metadata.json`` (the preset it was
tuned from). Once the base model exists, :func:`check_shapes` compares the shape of each saved LoRA
tensor with the module it patches (what names cannot tell). A mismatch is refused with one line that
says which adapter and why, never a stack trace from inside peft.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE
from kaito_tuning.errors import KaitoError, Problem, UserError, ValidationError
from kaito_tuning.spec.presets import Preset
from kaito_tuning.spec.rules import strength_problem
from kaito_tuning.spec.workspace import MAX_ADAPTERS

log = logging.getLogger(__name__)

#: peft's older weight file, still accepted
_ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


class AdapterMismatch(UserError):
    reason = "AdapterMismatch"


class AdapterNotFound(UserError):
    reason = "AdapterNotFound"


@dataclass
class Adapter:
    """One adapter to serve: its model name, where it comes from and how strongly it applies."""

    name: str
    source: str  # the directory or image as given
    strength: float = 1.0
    image: str | None = None  # set when source is an image reference
    path: Path | None = None  # the adapter directory (after pulling, for images)
    field: str = "--adapter"

    @property
    def config(self) -> dict:
        return _read_json(self.path / ADAPTER_CONFIG, self.field)

    @property
    def metadata(self) -> dict:
        meta = self.path / METADATA_FILE
        return _read_json(meta, self.field) if meta.is_file() else {}

    @property
    def what(self) -> str:
        return f"adapter {self.name!r} ({self.source})"


def _read_json(path: Path, field: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", field=field, reason="AdapterInvalid") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object", field=field, reason="AdapterInvalid")
    return data


def _has_registry(text: str) -> bool:
    """True for ``host[:port]/repo[:tag]`` references (an explicit registry), not ``dir/sub``."""
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def parse_adapter_args(values: list[str]) -> list[Adapter]:
    """``IMAGE_OR_DIR[=STRENGTH]`` arguments → adapters; every problem reported at once, nothing fetched."""
    problems: list[Problem] = []
    if len(values) > MAX_ADAPTERS:
        problems.append(Problem("--adapter", f"{len(values)} adapters given; at most {MAX_ADAPTERS} can be served"))
    adapters: list[Adapter] = []
    for i, value in enumerate(values):
        where = f"--adapter[{i}]"
        source, strength = value, None
        if "=" in value and not Path(value).expanduser().exists():  # a directory may have "=" in its name
            source, _, strength = value.rpartition("=")
        if (msg := strength_problem(strength)):
            problems.append(Problem(where, f"strength {msg}"))
            continue
        a = Adapter(name="", source=source, strength=float(strength) if strength is not None else 1.0, field=where)
        expanded = Path(source).expanduser()
        if expanded.is_dir():
            a.path = expanded.resolve()
            a.name = a.path.name
        elif expanded.exists():
            problems.append(Problem(where, f"{source} is a file; give the adapter's directory (with {ADAPTER_CONFIG})"))
            continue
        elif _has_registry(source) or source.startswith("docker.io/"):
            try:
                ref = imageref.parse(source)
            except imageref.InvalidReference as e:
                problems.append(Problem(where, str(e)))
                continue
            a.image = source
            a.name = ref.repository.rsplit("/", 1)[-1]
        else:
            problems.append(Problem(where, f"{source!r} is neither an existing directory nor an image reference "
                                           "with a registry (registry/repository:tag)"))
            continue
        adapters.append(a)
    seen: dict[str, str] = {}
    for a in adapters:
        if a.name in seen:
            problems.append(Problem(a.field, f"two adapters are named {a.name!r} ({seen[a.name]} and {a.source}); "
                                             "each adapter is served under its directory or repository name, "
                                             "so rename one"))
        seen[a.name] = a.source
    if problems:
        raise ValidationError(problems)
    return adapters


def adapter_args_in_dir(root: str | os.PathLike, environ: dict | None = None) -> list[str]:
    """Kaito's pod layout as ``DIR[=STRENGTH]`` arguments: ``/mnt/adapter/<name>/adapter_config.json``,
    the strength in the environment variable named like the adapter (default 1.0)."""
    environ = os.environ if environ is None else environ
    base = Path(root)
    if not base.is_dir():
        raise AdapterNotFound(f"{root} is not a directory", field="--adapters-dir")
    values = []
    for d in sorted(p for p in base.iterdir() if (p / ADAPTER_CONFIG).is_file()):
        strength = environ.get(d.name)
        values.append(f"{d}={strength}" if strength is not None else str(d))
    return values


def check_names(adapters: list[Adapter], preset: Preset) -> None:
    """No adapter may be served under the base model's name (or its repo id)."""
    for a in adapters:
        if a.name.lower() in (preset.name.lower(), preset.repo.lower()):
            raise UserError(f"adapter {a.source} would be served as {a.name!r}, the base model's name; "
                            "rename its directory or repository", field=a.field, reason="AdapterNameTaken")


def fetch_adapters(adapters: list[Adapter], workdir: Path, *, auth_file: str | None = None,
                   plain_http: bool = False) -> None:
    """Pull every image adapter into ``workdir/<name>``; directories are used where they are."""
    from kaito_tuning.artifacts import pull_adapter

    for a in adapters:
        if a.image is None:
            if not (a.path / ADAPTER_CONFIG).is_file():
                raise AdapterNotFound(f"{a.path} has no {ADAPTER_CONFIG}; is it an adapter directory?", field=a.field)
            continue
        dest = Path(workdir) / a.name
        log.info("pulling adapter %s from %s", a.name, a.image)
        try:
            pull_adapter(a.image, dest, auth_file=auth_file, plain_http=plain_http)
        except KaitoError as e:
            e.field = e.field or a.field
            raise
        a.path = dest


def _hub_id(value: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face repo id we can compare with the preset's."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not Path(value).exists()


def check_trained_for(adapter: Adapter, preset: Preset) -> None:
    """Refuse an adapter whose files say it was trained for another base model (before loading any weights)."""
    cfg = adapter.config
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterMismatch(f"{adapter.what} is a {peft_type} adapter; only LoRA adapters can be served",
                              field=adapter.field)
    ours = {preset.repo.lower(), preset.name.lower()}
    base = str(cfg.get("base_model_name_or_path") or "")
    if base and _hub_id(base) and base.lower() not in ours:
        raise AdapterMismatch(f"{adapter.what} was trained for {base}, but this server runs {preset.repo} "
                              f"(preset {preset.name}); serve it with its own base model", field=adapter.field)
    meta_preset = str(adapter.metadata.get("preset") or "")
    if meta_preset and meta_preset.lower() not in ours:
        raise AdapterMismatch(f"{adapter.what} was tuned from preset {meta_preset}, but this server runs preset "
                              f"{preset.name}; serve it with --preset {meta_preset}", field=adapter.field)
    if tensor_shapes(adapter.path, adapter.field) == {}:
        raise AdapterMismatch(f"{adapter.what} has no tensors in {ADAPTER_WEIGHTS}", field=adapter.field)


def prepare_adapters(adapters: list[Adapter], preset: Preset, workdir: Path, *, auth_file: str | None = None,
                     plain_http: bool = False) -> list[Adapter]:
    """Names checked, images pulled, files checked against ``preset``: ready for :func:`check_shapes`."""
    check_names(adapters, preset)
    fetch_adapters(adapters, workdir, auth_file=auth_file, plain_http=plain_http)
    for a in adapters:
        check_trained_for(a, preset)
    return adapters


def check_shapes(adapter: Adapter, preset: Preset, model) -> None:
    """Refuse an adapter whose LoRA tensors do not fit ``model``'s modules (what names cannot tell)."""
    for key, shape in tensor_shapes(adapter.path, adapter.field).items():
        problem = _shape_problem(model, key, shape)
        if problem:
            raise AdapterMismatch(f"{adapter.what} does not fit {preset.name}: {problem}; it was trained for another "
                                  "base model", field=adapter.field)


def tensor_shapes(adapter_dir: Path, field: str = "--adapter") -> dict[str, tuple[int, ...]]:
    """Each saved tensor's name and shape, read from the file's header (no weights loaded)."""
    st = adapter_dir / ADAPTER_WEIGHTS
    if st.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(st), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {st}: {' '.join(str(e).split())[:200]}", field=field,
                            reason="AdapterInvalid") from None
    binary = adapter_dir / _ADAPTER_WEIGHTS_BIN
    if binary.is_file():
        import torch

        try:
            state = torch.load(binary, map_location="meta", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise UserError(f"cannot read {binary}: {type(e).__name__}", field=field, reason="AdapterInvalid") from None
        return {k: tuple(v.shape) for k, v in state.items()}
    raise AdapterNotFound(f"{adapter_dir} has no {ADAPTER_WEIGHTS}", field=field)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?$")


def _shape_problem(model, key: str, shape: tuple[int, ...]) -> str | None:
    """Why the saved tensor ``key`` cannot patch ``model``, or None."""
    m = _LORA_KEY.match(key)
    if m is None:  # modules_to_save: a full copy of a module's weight (base_model.model.lm_head.weight)
        path, _, param = key.removeprefix("base_model.model.").rpartition(".")
        try:
            target = model.get_parameter(f"{path}.{param}") if path else None
        except AttributeError:
            return f"it saves {key}, but the model has no parameter {path}.{param}"
        if target is not None and tuple(target.shape) != shape:
            return f"{path}.{param} has shape {tuple(target.shape)} but the adapter's is {shape}"
        return None
    module_path, part = m.group("module"), m.group("part")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return f"it patches {module_path}, which the model does not have"
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if in_f is None and hasattr(module, "num_embeddings"):
        in_f, out_f = module.num_embeddings, module.embedding_dim
    if in_f is None or len(shape) != 2:
        return None
    if part == "lora_A" and shape[1] != in_f:
        return f"{module_path} takes {in_f} inputs but the adapter's lora_A has shape {shape}"
    if part == "lora_B" and shape[0] != out_f:
        return f"{module_path} gives {out_f} outputs but the adapter's lora_B has shape {shape}"
    if part == "lora_embedding_A" and shape[1] != in_f:
        return f"{module_path} has {in_f} embeddings but the adapter's lora_embedding_A has shape {shape}"
    return None
