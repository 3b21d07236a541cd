"""MEMIT (Meng et al., ICLR 2023): all N edits written at once into the MLP output projections of a few layers.

For each edit, with ``L`` the last edited layer:

1. *target value* ``z``: the output of decoder block ``L`` at the subject's last token of the edit prompt,
   plus a vector ``delta`` optimised (Adam) so that the LM completes the prompt with `` {target_new}``;
   the loss is the target's mean token NLL over the prompt and a few generated context prefixes, plus
   ``kl_factor`` times the KL, to the unedited one, of the next-token distribution at the subject's last
   token of "{subject} is a" (with delta added there too),
   plus ``v_weight_decay * |delta| / |h|^2``; ``|delta|`` is clamped to ``clamp_norm_factor * |h|``.
2. for each edited layer ``l`` in ascending order (earlier layers already edited): the *keys* ``K``
   ([N, D], the input of the MLP's output projection at the subject's last token, averaged between
   the bare prompt and the mean over the prefixed prompts), the residual ``R = (z - h_L) / (layers left)``
   with ``h_L`` the current block-``L`` output, and the update of the projection weight
   ``ΔW = Rᵀ K (mom2_weight · C + KᵀK)⁻¹`` with ``C = E[k kᵀ]`` over Wikipedia (``layer_stats``): the
   least-squares fit of ``ΔW K ≈ R`` that keeps the keys of ordinary text where they were.

``memit_weights`` returns the edited weights (parameter name -> tensor) and leaves the LM as it was;
``swapped_weights`` loads them for the duration of a ``with`` block. AlphaEdit (``alphaedit.py``) shares
every step except the solve.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from megedit.baselines.layer_stats import KeyStats, key_module, key_module_path, key_second_moments, options_from_spec
from megedit.baselines.z_cache import PER_EDIT, ZCache, split_report
from megedit.loading import decoder_layers, state_dict_sha256
from megedit.registry import MemitSpec, ModelSpec
from megedit.scoring import left_pad, positions_from_mask, target_ids

# MEMIT generates its context prefixes from these first words.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
PREFIX_SEED = 0  # sampling seed of the context prefixes
STOP_LOSS = 5e-2  # MEMIT stops a z optimisation once its loss is below this


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # the exact text the LM sees (``spec.format_prompt`` applied)
    subject: str  # must occur in ``prompt``; its last token is where the key is read and z written
    target: str  # ``target_new``; tokenised as ``" " + target`` like ``megedit.scoring.target_ids``


def requests_from_records(records, spec: ModelSpec) -> list[EditRequest]:
    """``EditRecord``s (or anything with prompt, prompt_kind, subject, target_new) as edit requests."""
    return [EditRequest(spec.format_prompt(r.prompt, r.prompt_kind), r.subject, r.target_new) for r in records]


@dataclass
class EditResult:
    weights: dict[str, Tensor]  # parameter name -> edited weight (dtype and device of the LM's)
    diagnostics: dict = field(default_factory=dict)
    kkt: dict[int, Tensor] | None = None  # AlphaEdit: cumulative K Kᵀ of the edited keys per layer, if asked


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------- tokens
def subject_last_token(tokenizer, text: str, subject: str, search_from: int = 0) -> int | None:
    """Index (in ``tokenizer(text)["input_ids"]``) of the token holding the last character of the last
    occurrence of ``subject`` in ``text[search_from:]``; None when it does not occur (case-insensitively)."""
    start = text.rfind(subject, search_from)
    if start < 0:
        start = text.lower().rfind(subject.lower(), search_from)
    if start < 0 or not subject:
        return None
    end = start + len(subject)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer: count the tokens of the text so far
        return len(tokenizer(text[:end])["input_ids"]) - 1
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
    return hits[-1] if hits else None


@dataclass
class _Row:
    ids: list[int]
    pos: int  # subject's last token in ids
    owner: int  # request index
    targets: list[int] = field(default_factory=list)  # appended to ids; empty for key / KL rows
    kl: bool = False


def _prompt_row(tokenizer, text: str, subject: str, search_from: int, owner: int, stats: dict) -> _Row:
    ids = list(tokenizer(text)["input_ids"])
    pos = subject_last_token(tokenizer, text, subject, search_from)
    if pos is None or pos >= len(ids):
        stats["subject_not_found"] += 1
        pos = len(ids) - 1  # MEMIT's "last" token strategy
    return _Row(ids=ids, pos=pos, owner=owner)


def _padded(rows: Sequence[_Row], tokenizer, device):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [r.ids + r.targets for r in rows]
    ids, mask = left_pad(seqs, pad)
    shift = [ids.shape[1] - len(s) for s in seqs]
    return ids.to(device), mask.to(device), positions_from_mask(mask).to(device), shift


@torch.no_grad()
def context_prefixes(lm, tokenizer, n: int, n_tokens: int, seed: int = PREFIX_SEED) -> list[str]:
    """``[""]`` plus ``n`` texts sampled from the LM (top-5, ``n_tokens`` new tokens) after MEMIT's first words,
    each ending in ". "; seeded, so the same LM gives the same prefixes (greedy decoding of a small LM from a
    single word mostly repeats itself)."""
    if n == 0:
        return [""]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(lm.parameters()).device
    out = [""]
    for i, word in enumerate(PREFIX_STARTS[:n]):  # one at a time: prefix i does not depend on n
        start = list(tokenizer(word)["input_ids"])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            gen = lm.generate(input_ids=torch.tensor([start], device=device), max_new_tokens=n_tokens,
                              attention_mask=torch.ones(1, len(start), dtype=torch.long, device=device),
                              do_sample=True, top_k=5, top_p=1.0, temperature=1.0, pad_token_id=pad,
                              eos_token_id=eos)
        new = gen[0, len(start):].tolist()
        new = new[: new.index(eos)] if eos in new else new
        text = tokenizer.decode(start + new, skip_special_tokens=True)
        out.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". ")
    return out


# ---------------------------------------------------------------------------------------------- reads
def _forward_capture(lm, module, rows: Sequence[_Row], tokenizer, *, pre: bool, batch_size: int) -> Tensor:
    """The input (``pre``) or output of ``module`` at each row's subject token, stopping the forward there."""
    device = next(lm.parameters()).device
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        ids, mask, positions, shift = _padded(chunk, tokenizer, device)
        idx_r = torch.arange(len(chunk), device=device)
        idx_t = torch.tensor([s + r.pos for s, r in zip(shift, chunk)], device=device)
        got = {}

        def grab(x):
            x = x[0] if isinstance(x, tuple) else x
            got["x"] = x[idx_r, idx_t].detach()
            raise _Stop

        handle = (module.register_forward_pre_hook(lambda _m, args: grab(args[0])) if pre
                  else module.register_forward_hook(lambda _m, _a, output: grab(output)))
        try:
            lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        out.append(got["x"])
    return torch.cat(out).double()


def compute_keys(lm, tokenizer, spec: ModelSpec, layer: int, requests: Sequence[EditRequest], prefixes: Sequence[str],
                 batch_size: int = 32) -> tuple[Tensor, int]:
    """Keys ``[N, D]`` at ``layer``: the mean of the bare prompt's key and the prefixed prompts' mean key
    (MEMIT's average over context types); also how many prompts fell back to the last token."""
    stats = {"subject_not_found": 0}
    rows = [_prompt_row(tokenizer, p + r.prompt, r.subject, len(p), i, stats)
            for i, r in enumerate(requests) for p in prefixes]
    with torch.no_grad():
        k = _forward_capture(lm, key_module(lm, spec, layer), rows, tokenizer, pre=True, batch_size=batch_size)
    k = k.view(len(requests), len(prefixes), -1)
    keys = k[:, 0] if len(prefixes) == 1 else (k[:, 0] + k[:, 1:].mean(1)) / 2
    return keys, stats["subject_not_found"]


def block_outputs(lm, tokenizer, spec: ModelSpec, layer: int, requests: Sequence[EditRequest],
                  batch_size: int = 32) -> Tensor:
    """Output of decoder block ``layer`` at the subject's last token of each bare prompt, ``[N, d]``."""
    stats = {"subject_not_found": 0}
    rows = [_prompt_row(tokenizer, r.prompt, r.subject, 0, i, stats) for i, r in enumerate(requests)]
    with torch.no_grad():
        return _forward_capture(lm, decoder_layers(lm, spec)[layer], rows, tokenizer, pre=False,
                                batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- z
def compute_targets(lm, tokenizer, spec: ModelSpec, hp: MemitSpec, requests: Sequence[EditRequest],
                    prefixes: Sequence[str], batch_size: int = 8, progress: bool = True) -> tuple[Tensor, dict]:
    """Target values ``z`` ``[N, d]`` at the last edited layer, ``batch_size`` edits optimised side by side
    (Adam is element-wise and each edit has its own loss and stop, so this equals one at a time)."""
    layer = hp.layers[-1]
    device = next(lm.parameters()).device
    zs, report = [], {"z_nll": [], "z_steps": [], "delta_ratio": [], "subject_not_found": 0}
    bar = tqdm(total=len(requests), desc="MEMIT z", unit="edit", disable=not progress)
    for b in range(0, len(requests), batch_size):
        group = requests[b:b + batch_size]
        z, rep = _optimise_group(lm, tokenizer, spec, hp, layer, group, prefixes, device)
        zs.append(z)
        for key in ("z_nll", "z_steps", "delta_ratio"):
            report[key] += rep[key]
        report["subject_not_found"] += rep["subject_not_found"]
        bar.update(len(group))
    bar.close()
    return torch.cat(zs), report


def _logits_from(lm, ids, mask, positions, first: int) -> tuple[Tensor, int]:
    """``(logits, offset)``: the logits of positions ``first`` onward where the model takes ``logits_to_keep``
    (transformers' causal LMs), else all of them with offset 0."""
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        keep = ids.shape[1] - first
        return lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                  logits_to_keep=keep).logits, first
    return lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits, 0


@dataclass
class _ZBatch:
    """One group's rows for the z optimisation, padded once, with the indices the loss and the hook need.

    Rows: per edit, one per context prefix (the prompt followed by the target tokens) and, with a KL term,
    one "{subject} is a" row. ``at_r``/``at_t`` address each row's subject token (where delta is added);
    ``tr``/``tp``/``tt``/``tw`` each target token (row, logit position, token id, weight in its edit's mean NLL).
    """
    ids: Tensor
    mask: Tensor
    positions: Tensor
    at_r: Tensor
    at_t: Tensor
    owner: Tensor  # [rows] edit index
    first_row: list[int]  # per edit, its first (un-prefixed) row: where the unedited |h| is read
    tr: Tensor
    tp: Tensor
    tt: Tensor
    tw: Tensor
    kl_r: Tensor  # rows of the KL prompts (empty without a KL term)
    kl_t: Tensor

    @property
    def first_logit(self) -> int:
        """The earliest position whose logits the loss reads: the LM head can skip every one before it."""
        return int(min(self.tp.min(), self.kl_t.min()) if len(self.kl_r) else self.tp.min())


def _z_rows(tokenizer, group: Sequence[EditRequest], prefixes: Sequence[str], with_kl: bool,
            stats: dict) -> tuple[list[_Row], list[int]]:
    """The rows of a group (prefixed prompts with their targets, then the KL prompt) and each edit's first row."""
    rows, first_row = [], []
    for i, r in enumerate(group):
        tgt = target_ids(tokenizer, r.target)
        first_row.append(len(rows))
        for p in prefixes:
            row = _prompt_row(tokenizer, p + r.prompt, r.subject, len(p), i, stats)
            row.targets = tgt
            rows.append(row)
        if with_kl:
            row = _prompt_row(tokenizer, f"{r.subject} is a", r.subject, 0, i, stats)
            row.kl = True
            rows.append(row)
    return rows, first_row


def target_positions(rows: Sequence[_Row], shift: Sequence[int],
                     n_prefixes: int) -> tuple[list[int], list[int], list[int], list[float]]:
    """Where each target token is predicted: its row, the position of the logit that predicts it (one before
    the token, after left padding by ``shift``), its id, and its weight, so that an edit's loss is the mean
    over its prompts of each prompt's mean token NLL (MEMIT's loss)."""
    tr, tp, tt, tw = [], [], [], []
    for j, (s, r) in enumerate(zip(shift, rows)):
        for k, tok in enumerate(r.targets):
            tr.append(j)
            tp.append(s + len(r.ids) + k - 1)
            tt.append(tok)
            tw.append(1.0 / (len(r.targets) * n_prefixes))
    return tr, tp, tt, tw


def _z_batch(tokenizer, group, prefixes, with_kl: bool, device, stats: dict) -> _ZBatch:
    rows, first_row = _z_rows(tokenizer, group, prefixes, with_kl, stats)
    ids, mask, positions, shift = _padded(rows, tokenizer, device)
    at_t = torch.tensor([s + r.pos for s, r in zip(shift, rows)], device=device)
    tr, tp, tt, tw = target_positions(rows, shift, len(prefixes))
    kl_r = torch.tensor([j for j, r in enumerate(rows) if r.kl], device=device, dtype=torch.long)
    return _ZBatch(ids=ids, mask=mask, positions=positions, at_r=torch.arange(len(rows), device=device), at_t=at_t,
                   owner=torch.tensor([r.owner for r in rows], device=device), first_row=first_row,
                   tr=torch.tensor(tr, device=device), tp=torch.tensor(tp, device=device),
                   tt=torch.tensor(tt, device=device), tw=torch.tensor(tw, device=device),
                   kl_r=kl_r, kl_t=at_t[kl_r] if len(kl_r) else kl_r)


def _delta_hook(batch: _ZBatch, delta: Tensor, state: dict):
    """A forward hook on block ``L`` that adds each edit's delta at the subject token of each of its rows, and
    records the unedited output at each edit's first row on the first call (the scale of the decay and clamp)."""
    def add_delta(_m, _a, output):
        h = output[0] if isinstance(output, tuple) else output
        if state["init"] is None:
            state["init"] = h[batch.at_r[batch.first_row], batch.at_t[batch.first_row]].detach().float()
        h = h.index_put((batch.at_r, batch.at_t), h[batch.at_r, batch.at_t] + delta[batch.owner].to(h.dtype))
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return add_delta


def _target_nll(logits: Tensor, offset: int, batch: _ZBatch, n_edits: int) -> Tensor:
    """Each edit's weighted target NLL, ``[n_edits]``."""
    logp = torch.log_softmax(logits[batch.tr, batch.tp - offset].float(), dim=-1).gather(1, batch.tt[:, None])
    return torch.zeros(n_edits, device=logits.device).index_add(0, batch.owner[batch.tr], -logp.squeeze(1) * batch.tw)


def kl_per_edit(logp: Tensor, logp_init: Tensor, owner: Tensor, n_edits: int) -> Tensor:
    """KL(current || unedited) of each KL row's next-token distribution, summed per edit, ``[n_edits]``."""
    kl = (logp.exp() * (logp - logp_init)).sum(-1)
    return torch.zeros(n_edits, device=logp.device).index_add(0, owner, kl)


def clamp_scale(norm: Tensor, max_norm: Tensor) -> Tensor:
    """The factor that brings each norm down to ``max_norm`` where it is above it, 1 elsewhere."""
    return torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))


def _step(opt, loss: Tensor, active: Tensor, delta: Tensor, max_norm: Tensor) -> None:
    """One Adam step on the active edits' deltas, then the norm clamp. A finished edit keeps its delta: Adam's
    momentum would move it even with a zero gradient."""
    opt.zero_grad(set_to_none=True)
    loss[active].sum().backward()
    before = delta.detach().clone()
    opt.step()
    with torch.no_grad():
        delta[~active] = before[~active]
        delta.mul_(clamp_scale(delta.norm(dim=-1), max_norm)[:, None])


def _descend(lm, hp: MemitSpec, batch: _ZBatch, delta: Tensor, state: dict) -> tuple[Tensor, Tensor]:
    """Optimise ``delta`` (the delta hook is on); each edit stops once its loss is below ``STOP_LOSS``.
    Returns each edit's last target NLL and its number of steps."""
    g = delta.shape[0]
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(g, dtype=torch.bool, device=delta.device)
    steps = torch.zeros(g, dtype=torch.long)
    nll_each = torch.zeros(g, device=delta.device)
    kl_init = None
    first = batch.first_logit  # only the target and KL positions need logits (the LM head is vocabulary-sized)
    for it in range(hp.v_num_grad_steps):
        logits, offset = _logits_from(lm, batch.ids, batch.mask, batch.positions, first)
        nll_each = _target_nll(logits, offset, batch, g)
        loss = nll_each
        if len(batch.kl_r):
            kl_logp = torch.log_softmax(logits[batch.kl_r, batch.kl_t - offset].float(), dim=-1)
            kl_init = kl_logp.detach() if kl_init is None else kl_init  # the first pass is the unedited LM
            loss = loss + hp.kl_factor * kl_per_edit(kl_logp, kl_init, batch.owner[batch.kl_r], g)
        init_norm = state["init"].norm(dim=-1)
        loss = loss + hp.v_weight_decay * delta.norm(dim=-1) / init_norm ** 2
        active &= ~(loss.detach() < STOP_LOSS)
        if not bool(active.any()) or it == hp.v_num_grad_steps - 1:
            break
        steps[active.cpu()] += 1
        _step(opt, loss, active, delta, hp.clamp_norm_factor * init_norm)
    return nll_each, steps


def _optimise_group(lm, tokenizer, spec, hp, layer, group, prefixes, device):
    """Target values ``z = h + delta`` of one group of edits, optimised side by side, and their diagnostics."""
    stats = {"subject_not_found": 0}
    batch = _z_batch(tokenizer, group, prefixes, hp.kl_factor > 0, device, stats)
    delta = torch.zeros(len(group), spec.hidden_size, device=device, requires_grad=True)
    state = {"init": None}
    handle = decoder_layers(lm, spec)[layer].register_forward_hook(_delta_hook(batch, delta, state))
    try:
        nll_each, steps = _descend(lm, hp, batch, delta, state)
    finally:
        handle.remove()
    init = state["init"]
    z = (init + delta.detach()).double()
    return z, {"z_nll": nll_each.detach().cpu().tolist(), "z_steps": steps.tolist(),
               "delta_ratio": (delta.detach().norm(dim=-1) / init.norm(dim=-1)).cpu().tolist(),
               "subject_not_found": stats["subject_not_found"]}


@dataclass
class EditTargets:
    """What MEMIT and AlphaEdit share before their solves: the context prefixes and each edit's target value
    ``z`` at the last edited layer (computing it is most of their cost, so a caller running both passes one)."""
    prefixes: list[str]
    z: Tensor  # [N, d]
    report: dict


def edit_targets(lm, tokenizer, spec: ModelSpec, requests: Sequence[EditRequest], *, hparams: MemitSpec | None = None,
                 z_batch_size: int = 8, progress: bool = True, cache: bool = True,
                 weights_sha256: str | None = None) -> EditTargets:
    """The target values of ``requests``. With ``cache`` each edit's ``z`` is read from / written to
    ``z_cache.ZCache`` (``weights_sha256``: the model's ``state_dict_sha256``, hashed when not given), so a
    killed run resumes and a larger batch reuses a smaller one's edits."""
    hp = _hparams(spec, hparams)
    with torch.inference_mode(False), torch.enable_grad():
        prefixes = context_prefixes(lm, tokenizer, hp.context_prefixes, hp.context_prefix_tokens)
        if not cache:
            zs, report = compute_targets(lm, tokenizer, spec, hp, requests, prefixes, z_batch_size, progress)
            return EditTargets(prefixes, zs, report)
        store = ZCache(spec.name, weights_sha256 or state_dict_sha256(lm), hp, prefixes)
        zs, report = _cached_targets(lm, tokenizer, spec, hp, requests, prefixes, z_batch_size, progress, store)
    return EditTargets(prefixes, zs, report)


def _cached_targets(lm, tokenizer, spec, hp, requests, prefixes, z_batch_size, progress, store: ZCache):
    """``compute_targets`` for the edits ``store`` lacks, in chunks written as they finish; the rest read."""
    ids = [ZCache.edit_id(r.prompt, r.subject, r.target) for r in requests]
    found = {i: store.get(ids[i]) for i in range(len(requests))}
    todo = [i for i, hit in found.items() if hit is None]
    if progress and len(todo) < len(requests):
        print(f"MEMIT z: {len(requests) - len(todo)} of {len(requests)} edits from the cache {store.dir}")
    chunk = max(z_batch_size, 8 * z_batch_size)  # what a kill can lose
    subject_not_found = 0
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        z, rep = compute_targets(lm, tokenizer, spec, hp, [requests[i] for i in part], prefixes, z_batch_size,
                                 progress)
        subject_not_found += rep["subject_not_found"]
        for k, (i, diag) in enumerate(zip(part, split_report(rep, len(part)))):
            store.put(ids[i], z[k], diag)
            found[i] = (z[k], diag)
    zs = torch.stack([found[i][0].double() for i in range(len(requests))])
    report = {k: [found[i][1][k] for i in range(len(requests))] for k in PER_EDIT}
    report["subject_not_found"] = subject_not_found  # of the edits computed in this call
    report["z_cached"] = len(requests) - len(todo)
    return zs, report


# ---------------------------------------------------------------------------------------------- layers
Solver = Callable[[int, int, Tensor, Tensor], Tensor]  # (index, layer, K [N,D], R [N,d]) -> ΔW [d, D] (float64)


def _weight_param(lm, spec, layer):
    """The projection's weight parameter, its name and whether it is stored [D, d] (GPT-2's Conv1D)."""
    mod = key_module(lm, spec, layer)
    name = key_module_path(spec, layer) + ".weight"
    transposed = not isinstance(mod, torch.nn.Linear)
    return name, mod.weight, transposed


def run_batch_edit(lm, tokenizer, spec: ModelSpec, hp: MemitSpec, requests: Sequence[EditRequest], solver: Solver,
                   *, z_batch_size: int = 8, batch_size: int = 32, final_keys: bool = False,
                   progress: bool = True, method: str = "MEMIT", targets: EditTargets | None = None,
                   weights_sha256: str | None = None) -> tuple[dict[str, Tensor], dict, dict[int, Tensor]]:
    """Steps shared by MEMIT and AlphaEdit. The LM is edited layer by layer (each layer's keys and residual are
    read with the earlier layers already edited), the edited weights are copied out, and the LM is restored
    exactly. Returns ``(weights, diagnostics, keys after all edits per layer if final_keys)``."""
    if not requests:
        raise ValueError(f"{method}: no edit requests")
    t0 = time.time()
    layers = list(hp.layers)
    if targets is None:
        targets = edit_targets(lm, tokenizer, spec, requests, hparams=hp, z_batch_size=z_batch_size, progress=progress,
                               weights_sha256=weights_sha256)
    elif targets.z.shape[0] != len(requests):
        raise ValueError(f"{method}: {targets.z.shape[0]} target values for {len(requests)} edit requests")
    prefixes, zs, zrep = targets.prefixes, targets.z, targets.report
    params = {layer: _weight_param(lm, spec, layer) for layer in layers}
    original = {layer: p.detach().clone() for layer, (_, p, _) in params.items()}
    diag = {"method": method, "n_edits": len(requests), "layers": layers, "context_prefixes": prefixes,
            **{k: v for k, v in zrep.items()}, "per_layer": {}}
    after = {}
    try:
        with torch.no_grad():
            for i, layer in enumerate(tqdm(layers, desc=f"{method} layers", disable=not progress)):
                keys, _ = compute_keys(lm, tokenizer, spec, layer, requests, prefixes, batch_size)
                cur = block_outputs(lm, tokenizer, spec, layers[-1], requests, batch_size)
                resid = (zs - cur) / (len(layers) - i)
                delta = solver(i, layer, keys, resid)  # [d, D]
                name, weight, transposed = params[layer]
                upd = delta.T if transposed else delta
                if upd.shape != weight.shape:
                    raise ValueError(f"{method}: update {tuple(upd.shape)} does not fit {name} {tuple(weight.shape)}")
                weight.copy_((weight.double() + upd.to(weight.device)).to(weight.dtype))
                fit = (keys @ delta.T - resid).norm() / resid.norm().clamp_min(1e-12)
                diag["per_layer"][layer] = {"resid_norm": float(resid.norm(dim=-1).mean()),
                                            "update_norm": float(delta.norm()),
                                            "weight_norm": float(original[layer].double().norm()),
                                            "fit_rel_error": float(fit)}
            diag["z_error_after"] = float((zs - block_outputs(lm, tokenizer, spec, layers[-1], requests, batch_size))
                                          .norm(dim=-1).mean())
            if final_keys:
                after = {layer: compute_keys(lm, tokenizer, spec, layer, requests, prefixes, batch_size)[0]
                         for layer in layers}
            weights = {params[layer][0]: params[layer][1].detach().clone() for layer in layers}
    finally:
        with torch.no_grad():
            for layer, (_, weight, _) in params.items():
                weight.copy_(original[layer])
    diag["time_s"] = round(time.time() - t0, 2)
    return weights, diag, after


def _hparams(spec: ModelSpec, hparams: MemitSpec | None) -> MemitSpec:
    hp = hparams or spec.memit
    if hp is None:
        raise ValueError(f"model {spec.name}: no MEMIT settings; add a 'memit:' section to its registry file "
                         "(configs/models/<model>.yaml) or pass hparams")
    return hp


def second_moments(lm, tokenizer, spec: ModelSpec, hp: MemitSpec, stats, *, data_dir, weights_sha256, progress,
                   stats_overrides: Mapping | None = None) -> dict[int, Tensor]:
    """E[k kᵀ] per edited layer: given (a ``KeyStats`` or a ``{layer: tensor}``), or from ``layer_stats``."""
    if stats is None:
        stats = key_second_moments(lm, tokenizer, spec, hp.layers, options_from_spec(hp, **(stats_overrides or {})),
                                   data_dir=data_dir, weights_sha256=weights_sha256, progress=progress)
    mom2 = stats.mom2 if isinstance(stats, KeyStats) else dict(stats)
    missing = [layer for layer in hp.layers if layer not in mom2]
    if missing:
        raise ValueError(f"no E[kk^T] statistic for layer(s) {missing}")
    return {layer: mom2[layer].double() for layer in hp.layers}


def memit_solver(mom2: Mapping[int, Tensor], mom2_weight: float) -> Solver:
    """``ΔW = Rᵀ K (mom2_weight·C + KᵀK)⁻¹``; with ``mom2_weight == 0`` the minimum-norm ``ΔW K = R``."""
    def solve(_i: int, layer: int, keys: Tensor, resid: Tensor) -> Tensor:
        keys, resid = keys.double(), resid.double()
        if mom2_weight == 0:
            return (torch.linalg.pinv(keys) @ resid).T
        cov = mom2[layer].to(keys.device, torch.float64)
        adj = torch.linalg.solve(mom2_weight * cov + keys.T @ keys, keys.T)  # [D, N]
        return resid.T @ adj.T
    return solve


def memit_weights(lm, tokenizer, spec: ModelSpec, requests: Sequence[EditRequest], *,
                  hparams: MemitSpec | None = None, stats: KeyStats | Mapping[int, Tensor] | None = None,
                  stats_overrides: Mapping | None = None, data_dir: str | os.PathLike | None = None,
                  weights_sha256: str | None = None, z_batch_size: int = 8, batch_size: int = 32,
                  progress: bool = True, targets: EditTargets | None = None) -> EditResult:
    """MEMIT's edited weights for all ``requests`` at once; the LM is left unchanged.

    ``hparams`` defaults to the model's ``memit:`` section; ``stats`` (E[kkᵀ] per edited layer) is read from
    or written to the ``layer_stats`` cache when not given (``stats_overrides`` replace ``StatsOptions``
    fields, ``weights_sha256`` saves hashing the weights again when the caller knows it, ``targets`` reuses
    ``edit_targets`` computed for the same requests and settings).
    """
    hp = _hparams(spec, hparams)
    mom2 = second_moments(lm, tokenizer, spec, hp, stats, data_dir=data_dir, weights_sha256=weights_sha256,
                          progress=progress, stats_overrides=stats_overrides)
    weights, diag, _ = run_batch_edit(lm, tokenizer, spec, hp, requests, memit_solver(mom2, hp.mom2_weight),
                                      z_batch_size=z_batch_size, batch_size=batch_size, progress=progress,
                                      method="MEMIT", targets=targets, weights_sha256=weights_sha256)
    return EditResult(weights=weights, diagnostics=diag)


@contextlib.contextmanager
def swapped_weights(lm, weights: Mapping[str, Tensor]):
    """Load ``weights`` (parameter name -> tensor) into ``lm`` for the ``with`` block, then restore the
    originals bit for bit (also when the block raises)."""
    params = {name: lm.get_parameter(name) for name in weights}
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: weight {tuple(weights[name].shape)} does not fit the parameter {tuple(p.shape)}")
    original = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        yield lm
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(original[name])
