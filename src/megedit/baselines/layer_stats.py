"""Second moments E[k kᵀ] of the keys MEMIT and AlphaEdit edit, cached per model and layer.

A *key* is the input of the MLP's output projection at one token: ``act(gate(h)) * up(h)`` for a gated
(Llama) MLP, the input of ``down``; ``act(fc_in(h))`` for an ungated (GPT-2/J, Phi) MLP, the input of
``fc_out``; its size is the MLP's intermediate size. The statistic is the uncentred second moment over
every token of a seeded sample of Wikipedia texts (the shared sample in
``$MEGEDIT_DATA_DIR/corpus/enwiki_2021_wikiextractor_sample.jsonl``, JSONL ``{id, title, text}``), each
text cut to ``max_seq_len`` tokens, with an optional budget on the tokens in all.

Cache: ``$MEGEDIT_CACHE/layer_stats/<model>/<module path>.<budget>.safetensors`` plus a ``.json``
manifest beside it. The manifest records what the numbers depend on (model name and source, the sha256
of the weights as prepare records it, layer, module path, corpus name + size + sha256, sample count,
token budget, sequence length, seed, dtype, tokenizer) and the sha256 of the tensor file; a cache whose
manifest differs from the request, or whose file does not match its hash, is never served: the
statistic is recomputed and replaces it. Both files are written atomically (tensor file first, manifest
last), so a killed run leaves either the old complete pair or no valid pair.

A long computation is resumable: every ``checkpoint_every`` texts the partial sums of all layers being
computed go to one ``partial-<hash>.safetensors`` (atomic), whose metadata carry the request and how many
texts were consumed; a re-run with the same request continues from there, any other request ignores it.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from megedit.artifacts import atomic_write_json, sha256_file, sha256_json
from megedit.loading import decoder_layers, get_attr_path, state_dict_sha256
from megedit.paths import cache_dir, data_dir
from megedit.registry import KEY_PROJECTION, MemitSpec, ModelSpec
from megedit.scoring import left_pad, positions_from_mask

DEFAULT_CORPUS = "corpus/enwiki_2021_wikiextractor_sample.jsonl"
FORMAT = "megedit.layer_stats.mom2"
VERSION = 1


@dataclass(frozen=True)
class StatsOptions:
    """What to collect: ``n_texts``, ``max_seq_len`` and ``dtype`` have no default here; callers take them from
    the model's ``memit:`` section (``megedit.registry.MemitSpec``) so that each default lives in one place."""

    n_texts: int  # texts drawn from the corpus (a seeded permutation of its lines)
    max_seq_len: int  # tokens kept per text
    dtype: str  # "float32" or "float64": accumulation and storage
    max_tokens: int | None = None  # stop once this many tokens were counted (the last text is cut to fit)
    seed: int = 0  # permutation of the corpus lines
    corpus: str = DEFAULT_CORPUS  # relative to the data directory, or an absolute path
    # Speed and memory only (not in the manifest):
    batch_size: int = 8  # texts per forward
    checkpoint_every: int = 256  # texts between partial checkpoints

    def budget_tag(self) -> str:
        tokens = "all" if self.max_tokens is None else str(self.max_tokens)
        return f"n{self.n_texts}-t{tokens}-len{self.max_seq_len}-{self.dtype}-s{self.seed}"


@dataclass
class KeyStats:
    mom2: dict[int, torch.Tensor]  # layer -> E[k kᵀ] [D, D] (float32)
    manifests: dict[int, dict]  # layer -> the manifest served or written
    computed: list[int] = field(default_factory=list)  # layers computed in this call (the rest came from the cache)
    resumed_from_texts: int = 0  # texts a partial checkpoint had already consumed


class _StopForward(Exception):
    """Raised by the hook of the deepest layer needed: the rest of the forward is wasted work."""


def key_module_path(spec: ModelSpec, layer: int) -> str:
    """Dotted path of the projection whose input is the key, e.g. ``model.layers.4.mlp.down_proj``."""
    role = KEY_PROJECTION[spec.mlp.kind]
    try:
        name = spec.mlp.projections[role]
    except KeyError:
        raise ValueError(f"model {spec.name}: 'mlp.projections.{role}' is not set in its registry file") from None
    return f"{spec.mlp.layers}.{layer}.{spec.mlp.module}.{name}"


def key_module(lm, spec: ModelSpec, layer: int):
    layers = decoder_layers(lm, spec)
    role = KEY_PROJECTION[spec.mlp.kind]
    return get_attr_path(get_attr_path(layers[layer], spec.mlp.module), spec.mlp.projections[role])


def corpus_path(options: StatsOptions, data_dir_: str | os.PathLike | None = None) -> Path:
    path = Path(options.corpus).expanduser()
    if not path.is_absolute():
        path = data_dir(data_dir_) / options.corpus
    if not path.is_file():
        raise FileNotFoundError(f"statistics corpus {path} does not exist (StatsOptions.corpus, relative to the "
                                "data directory: --data.data_dir / $MEGEDIT_DATA_DIR)")
    return path


def stats_file(spec: ModelSpec, layer: int, options: StatsOptions, root: Path | None = None) -> Path:
    root = root if root is not None else cache_dir() / "layer_stats"
    return root / spec.name / f"{key_module_path(spec, layer)}.{options.budget_tag()}.safetensors"


def _manifest_path(file: Path) -> Path:
    return file.with_suffix(".json")


def _corpus_identity(path: Path) -> dict:
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def _request(spec, tokenizer, layer: int, key_dim: int, options: StatsOptions, weights_sha256: str,
             corpus: dict) -> dict:
    """Everything the statistic depends on; a cached manifest must equal this to be served."""
    return {"format": FORMAT, "version": VERSION, "model": spec.name, "model_source": spec.source,
            "model_weights_sha256": weights_sha256, "layer": layer, "module": key_module_path(spec, layer),
            "key_dim": key_dim, "corpus": corpus, "n_texts": options.n_texts, "max_tokens": options.max_tokens,
            "max_seq_len": options.max_seq_len, "seed": options.seed, "dtype": options.dtype,
            "tokenizer": {"class": type(tokenizer).__name__, "size": len(tokenizer),
                          "name_or_path": Path(str(getattr(tokenizer, "name_or_path", ""))).name}}


def _differences(recorded: dict, wanted: dict) -> dict:
    return {k: (recorded.get(k), wanted.get(k)) for k in sorted(set(recorded) | set(wanted))
            if recorded.get(k) != wanted.get(k)}


def _load_cached(file: Path, request: dict, where: str) -> tuple[torch.Tensor | None, dict | None, str]:
    """``(mom2, manifest, "")`` when the cache may be served, else ``(None, None, why not)``."""
    from safetensors.torch import load_file

    mpath = _manifest_path(file)
    if not mpath.is_file() or not file.is_file():
        return None, None, "no cache"
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return None, None, f"{mpath} is not valid JSON"
    diff = _differences(manifest.get("request", {}), request)
    if diff:
        return None, None, f"{where}: cached statistic was computed for another request {diff}"
    if sha256_file(file) != manifest.get("result", {}).get("file_sha256"):
        return None, None, f"{where}: {file.name} does not match the sha256 in its manifest"
    return load_file(file)["mom2"].float(), manifest, ""


def _save_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_partial(path: Path, sums: dict[int, torch.Tensor], request_id: str, texts: int, tokens: int) -> None:
    _save_atomic({f"sum.{layer}": s for layer, s in sums.items()}, path,
                 {"request_id": request_id, "texts": str(texts), "tokens": str(tokens)})


def _read_partial(path: Path, request_id: str, layers: Sequence[int]):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("request_id") != request_id:
                return None
            sums = {layer: f.get_tensor(f"sum.{layer}") for layer in layers}
        return sums, int(meta["texts"]), int(meta["tokens"])
    except Exception as exc:  # a damaged partial is only lost work
        print(f"layer_stats: ignoring unreadable partial checkpoint {path} ({exc})")
        return None


def _corpus_texts(path: Path, options: StatsOptions) -> list[str]:
    """The ``n_texts`` texts of the seeded permutation of the corpus lines (fewer if the corpus is smaller)."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    order = list(range(len(lines)))
    random.Random(options.seed).shuffle(order)
    texts = []
    for i in order[: options.n_texts]:
        try:
            texts.append(str(json.loads(lines[i]).get("text", "")))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc.msg})") from None
    return texts


def key_second_moments(lm, tokenizer, spec: ModelSpec, layers: Sequence[int], options: StatsOptions, *,
                       data_dir: str | os.PathLike | None = None, weights_sha256: str | None = None,
                       cache_root: str | os.PathLike | None = None, progress: bool = True) -> KeyStats:
    """E[k kᵀ] of the keys at ``layers``, from the cache when a matching one exists, else computed (resumably).

    ``weights_sha256`` is the model's ``state_dict_sha256`` (prepare's lineage records it as
    ``model_weights_sha256``); it is computed when not given.
    """
    layers = sorted(set(int(x) for x in layers))
    root = Path(cache_root) if cache_root is not None else cache_dir() / "layer_stats"
    if options.dtype not in ("float32", "float64"):
        raise ValueError(f"StatsOptions.dtype is {options.dtype!r}; expected 'float32' or 'float64'")
    weights_sha256 = weights_sha256 or state_dict_sha256(lm)
    corpus = corpus_path(options, data_dir)
    corpus_id = _corpus_identity(corpus)
    requests, files = {}, {}
    for layer in layers:
        mod = key_module(lm, spec, layer)
        dim = mod.in_features if hasattr(mod, "in_features") else mod.weight.shape[0]  # Linear / Conv1D
        requests[layer] = _request(spec, tokenizer, layer, int(dim), options, weights_sha256, corpus_id)
        files[layer] = stats_file(spec, layer, options, root)

    out = KeyStats(mom2={}, manifests={})
    missing = []
    for layer in layers:
        mom2, manifest, why = _load_cached(files[layer], requests[layer], f"layer {layer}")
        if mom2 is None:
            if why != "no cache":
                print(f"layer_stats: refusing the cache, recomputing ({why})")
            missing.append(layer)
        else:
            out.mom2[layer], out.manifests[layer] = mom2, manifest
    if not missing:
        return out

    request_id = sha256_json([requests[layer] for layer in missing])
    partial = root / spec.name / f"partial-{request_id[:16]}.safetensors"
    sums, count, texts_done = _accumulate(lm, tokenizer, spec, missing, options, corpus, partial, request_id,
                                          {layer: requests[layer]["key_dim"] for layer in missing}, progress, out)
    if count == 0:
        raise ValueError(f"{corpus}: the first {options.n_texts} texts hold no tokens")
    for layer in missing:
        mom2 = (sums[layer] / count).to(getattr(torch, options.dtype))
        _save_atomic({"mom2": mom2}, files[layer], {"format": FORMAT})
        manifest = {"request": requests[layer],
                    "result": {"texts": texts_done, "tokens": count, "file": files[layer].name,
                               "file_sha256": sha256_file(files[layer])}}
        atomic_write_json(_manifest_path(files[layer]), manifest)
        out.mom2[layer], out.manifests[layer] = mom2.float(), manifest
    out.computed = missing
    partial.unlink(missing_ok=True)
    return out


def _start_sums(partial: Path, request_id: str, layers, dims: dict[int, int], dtype, device,
                out: KeyStats) -> tuple[dict[int, torch.Tensor], int, int]:
    """The partial sums to continue from (``(sums, texts consumed, tokens counted)``): a checkpoint of the same
    request when there is one, else zeros."""
    resumed = _read_partial(partial, request_id, layers)
    if resumed is None:
        return {layer: torch.zeros(dims[layer], dims[layer], dtype=dtype, device=device) for layer in layers}, 0, 0
    sums, start, count = resumed
    out.resumed_from_texts = start
    print(f"layer_stats: resuming from {partial.name} after {start} texts ({count} tokens)")
    return {layer: s.to(device=device, dtype=dtype) for layer, s in sums.items()}, start, count


def next_chunk(tokenize, texts: Sequence[str], done: int, chunk_end: int, budget: int | None,
               count: int) -> tuple[list[list[int]], int]:
    """Token ids of ``texts[done:chunk_end]`` (empty ones skipped), shortest first, and how many texts that
    consumed. Under a token ``budget`` with ``count`` tokens already counted, the chunk stops where the budget
    is spent and its last text is cut to fit, so the statistic covers exactly ``budget`` tokens."""
    seqs, pending, consumed = [], 0, done
    for i in range(done, chunk_end):
        if budget is not None and count + pending >= budget:
            break
        ids = tokenize(texts[i])
        if budget is not None:
            ids = ids[: budget - count - pending]
        pending += len(ids)
        consumed = i + 1
        if ids:
            seqs.append(ids)
    seqs.sort(key=len)  # similar lengths share a batch: less padding
    return seqs, consumed


def _sum_hooks(lm, spec, layers, sums: dict[int, torch.Tensor], state: dict, dtype) -> list:
    """Forward pre-hooks that add ``Σ k kᵀ`` over the batch's real tokens (``state["mask"]``) to each layer's sum;
    the deepest layer's hook ends the forward, since nothing after it is read."""
    deepest = max(layers)

    def hook_for(layer):
        def hook(_module, args):
            keys = args[0][state["mask"]].to(dtype)  # [tokens, D]
            sums[layer].addmm_(keys.T, keys)
            if layer == deepest:
                raise _StopForward
        return hook

    return [key_module(lm, spec, layer).register_forward_pre_hook(hook_for(layer)) for layer in layers]


def _forward_chunk(lm, seqs: list[list[int]], batch_size: int, pad: int, state: dict, device) -> int:
    """Run the LM over ``seqs`` (the hooks accumulate); returns the number of real tokens seen."""
    tokens = 0
    for b in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[b:b + batch_size], pad)
        state["mask"] = mask.bool().to(device)
        try:
            lm(input_ids=ids.to(device), attention_mask=mask.to(device),
               position_ids=positions_from_mask(mask).to(device), use_cache=False)
        except _StopForward:
            pass
        tokens += int(mask.sum())
    return tokens


@torch.no_grad()
def _accumulate(lm, tokenizer, spec, layers, options, corpus, partial, request_id, dims, progress, out):
    """Sum of ``k kᵀ`` per layer over the corpus sample, checkpointed every ``checkpoint_every`` texts:
    ``(sums, tokens counted, texts consumed)``."""
    acc_dtype = getattr(torch, options.dtype)
    device = next(lm.parameters()).device
    sums, done, count = _start_sums(partial, request_id, layers, dims, acc_dtype, device, out)
    texts = _corpus_texts(corpus, options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = {"mask": None}
    handles = _sum_hooks(lm, spec, layers, sums, state, acc_dtype)
    budget = options.max_tokens
    by_tokens = budget is not None  # the bar counts what ends the loop: tokens under a budget, texts otherwise
    bar = tqdm(total=budget if by_tokens else len(texts), initial=count if by_tokens else done,
               desc=f"E[kk^T] layers {layers}", unit="tok" if by_tokens else "text", disable=not progress)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, truncation=True, max_length=options.max_seq_len)["input_ids"])

    try:
        while done < len(texts) and (budget is None or count < budget):
            chunk_end = min(len(texts), done + options.checkpoint_every)
            seqs, consumed = next_chunk(tokenize, texts, done, chunk_end, budget, count)
            seen = _forward_chunk(lm, seqs, options.batch_size, pad, state, device)
            count += seen
            bar.update(seen if by_tokens else consumed - done)
            done = consumed
            bar.set_postfix({"texts": done} if by_tokens else {"tokens": count})
            if done < len(texts) and (budget is None or count < budget):
                _write_partial(partial, sums, request_id, done, count)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return sums, count, done


def options_from_spec(memit: MemitSpec, **overrides) -> StatsOptions:
    """The statistics options of a ``memit:`` section (``overrides`` replace single ``StatsOptions`` fields)."""
    base = {"n_texts": memit.mom2_n_texts, "max_seq_len": memit.mom2_max_seq_len, "dtype": memit.mom2_dtype,
            "max_tokens": memit.mom2_max_tokens}
    return StatsOptions(**{**base, **overrides})


__all__ = ["StatsOptions", "KeyStats", "key_second_moments", "key_module", "key_module_path", "stats_file",
           "options_from_spec", "DEFAULT_CORPUS"]
