"""Causal tracing (ROME, Meng et al. 2022, Sec. 2) of CounterFact facts: which layers' states carry the fact?

Per prompt (the edit's prompt as the LM sees it, ``spec.format_prompt``), the answer token is the first token of
the true object. Three runs:
  clean      the plain forward; p = P(answer).
  corrupted  Gaussian noise (``--noise`` x the std of the subject tokens' embeddings) added to the subject tokens'
             input embeddings, ``--samples`` seeded draws side by side in the batch; p* = mean P(answer).
  restored   corrupted, but one state set back to its clean value: the block output (residual), the MLP output
             or the attention output of one layer at one token, or the MLP outputs of a window of ``--window``
             layers centred at the layer (ROME's Fig. 1 b, c).
Indirect effect IE = p_restored - p*; the tokens are grouped as ROME does (first / middle / last subject token,
first subsequent token, further tokens, last token); AIE = the mean over prompts of each class's per-token mean.
Tokens before the subject are never traced: the noise cannot reach them, so their IE is 0.

Exact but cheap: a state restored at token t changes nothing before t, so each restored run starts at t from the
corrupted run's key/value cache of tokens [0, t); only the last position's logits are computed.

    python bench/causal_trace.py --prepare_dir runs/smollm2-counterfact-1024/prepare --n 128
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megedit.artifacts import atomic_path, atomic_write_json
from megedit.loading import decoder_layers, get_attr_path, load_lm
from megedit.prepare.artifact import load_prepared
from megedit.registry import RegistryError, load_model_spec
from megedit.scoring import target_ids

KINDS = ("block", "mlp", "attn", "mlp_window")  # block = the residual stream after the layer
CLASSES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")


@dataclass
class Traced:
    """One prompt: its token ids ``[T]``, subject tokens ``[b, e)``, answer token id, and whether the model's
    greedy pre-edit answer (the prepare artifact's) starts with the true object (ROME's 'known fact')."""

    ids: torch.Tensor
    b: int
    e: int
    answer: int
    known: bool = False


def token_classes(b: int, e: int, length: int) -> dict[str, list[int]]:
    """ROME's token classes of a prompt of ``length`` tokens whose subject is tokens ``[b, e)``. A one-token
    subject is both the first and the last subject token; the last token is never 'first subsequent'."""
    if not 0 <= b < e < length:
        raise ValueError(f"subject tokens [{b}, {e}) must end before the last of {length} tokens")
    return {"first_subject": [b], "middle_subject": list(range(b + 1, e - 1)), "last_subject": [e - 1],
            "first_subsequent": [e] if e < length - 1 else [], "further": list(range(e + 1, length - 1)),
            "last": [length - 1]}


def subject_span(tokenizer, text: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of ``text`` and the tokens ``[b, e)`` that overlap the last occurrence of ``subject``."""
    start = text.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {text!r}")
    enc = tokenizer(text, return_offsets_mapping=True)
    end = start + len(subject)
    hit = [i for i, (s, t) in enumerate(enc["offset_mapping"]) if s < end and t > start]
    return list(enc["input_ids"]), hit[0], hit[-1] + 1


def attention_module(block, override: str | None = None):
    """The attention inside one decoder block: ``override`` (an attribute path) or its one child named *attn*."""
    if override:
        return get_attr_path(block, override)
    found = [m for name, m in block.named_children() if "attn" in name.lower()]
    if len(found) != 1:
        raise ValueError(f"cannot tell the attention module of {type(block).__name__}; pass --attn_module")
    return found[0]


def trace_modules(lm, spec, attn: str | None = None) -> dict[tuple[str, int], torch.nn.Module]:
    """``{(kind, layer): module}`` for kinds block, mlp and attn, from the registry's attribute paths."""
    out = {}
    for i, block in enumerate(decoder_layers(lm, spec)):
        out["block", i] = block
        out["mlp", i] = get_attr_path(block, spec.mlp.module)
        out["attn", i] = attention_module(block, attn)
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


def answer_probs(lm, ids: torch.Tensor, answer: int, cache=None) -> torch.Tensor:
    """P(answer) after the last token of each row of ``ids`` ``[R, T]`` (continuing ``cache`` if given)."""
    out = lm(input_ids=ids, cache=cache, use_cache=cache is not None, logits_to_keep=1)
    return torch.softmax(out.logits[:, -1].float(), -1)[:, answer]


def clean_run(lm, modules, ids: torch.Tensor, answer: int) -> tuple[float, dict]:
    """p on the clean prompt and every traced module's clean output ``[T, H]``."""
    states, hooks = {}, []
    for key, mod in modules.items():
        hooks.append(mod.register_forward_hook(lambda m, i, o, key=key: states.__setitem__(key, _first(o)[0].clone())))
    try:
        p = answer_probs(lm, ids[None], answer)
    finally:
        for h in hooks:
            h.remove()
    return float(p[0]), states


class Corrupt:
    """Hooks for one forward over tokens ``[offset, offset + len)`` of a prompt, rows ordered ``s * C + c``
    (noise sample s, config c): noise on the subject tokens' embeddings, and each config's clean states put back.
    A config is a list of ``((kind, layer), positions)`` sites."""

    def __init__(self, lm, modules, clean: dict, noise: torch.Tensor, b: int, offset: int, configs: list):
        self.lm, self.modules, self.clean, self.noise, self.b, self.offset = lm, modules, clean, noise, b, offset
        self.configs, self.hooks = configs, []

    def _noise_hook(self, mod, inp, out):
        n_cfg, width = len(self.configs), out.shape[1]
        lo, hi = max(self.b, self.offset), min(self.b + self.noise.shape[1], self.offset + width)
        if lo >= hi:
            return out
        out = out.clone()
        out[:, lo - self.offset:hi - self.offset] += self.noise[:, lo - self.b:hi - self.b].repeat_interleave(n_cfg, 0)
        return out

    def _restore_hook(self, key, rows, pos):
        def hook(mod, inp, out):
            h = _first(out).clone()
            h[rows, pos - self.offset] = self.clean[key][pos]
            return _replace_first(out, h)
        return hook

    def __enter__(self):
        self.hooks.append(self.lm.get_input_embeddings().register_forward_hook(self._noise_hook))
        n_cfg, samples = len(self.configs), self.noise.shape[0]
        sites: dict = {}
        for c, config in enumerate(self.configs):
            for key, positions in config:
                for p in positions:
                    sites.setdefault(key, []).extend((c + n_cfg * s, p) for s in range(samples))
        for key, pairs in sites.items():
            rows, pos = torch.tensor(pairs).T
            self.hooks.append(self.modules[key].register_forward_hook(self._restore_hook(key, rows, pos)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def corrupted_probs(lm, modules, clean, tr: Traced, noise, start: int, configs: list, cache=None) -> torch.Tensor:
    """Mean over noise samples of P(answer) for each config, running tokens ``[start, T)`` after ``cache``
    (the corrupted run's cache of tokens ``[0, start)``; None when start is 0)."""
    samples, n_cfg = noise.shape[0], len(configs)
    if cache is not None:
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n_cfg)
    ids = tr.ids[start:][None].expand(samples * n_cfg, -1)
    with Corrupt(lm, modules, clean, noise, tr.b, start, configs):
        p = answer_probs(lm, ids, tr.answer, cache)
    return p.view(samples, n_cfg).mean(0)


def corrupted_cache(lm, modules, tr: Traced, noise, start: int):
    """The corrupted run's key/value cache of tokens ``[0, start)``, one row per noise sample."""
    if start == 0:
        return None
    with Corrupt(lm, modules, {}, noise, tr.b, 0, [[]]):
        out = lm(input_ids=tr.ids[:start][None].expand(noise.shape[0], -1), use_cache=True, logits_to_keep=1)
    return out.cache


def kind_configs(kind: str, n_layers: int, window: int, t: int) -> list:
    """One config per layer restoring token ``t``: that layer's ``kind`` output, or for ``mlp_window`` the MLP
    outputs of the ``window`` layers centred at it (cut at the ends, as ROME does)."""
    if kind != "mlp_window":
        return [[((kind, layer), (t,))] for layer in range(n_layers)]
    return [[(("mlp", j), (t,)) for j in range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))]
            for layer in range(n_layers)]


def trace_prompt(lm, modules, clean, tr: Traced, noise, kinds, n_layers: int, window: int, batch: int,
                 positions: list[int]) -> tuple[float, torch.Tensor]:
    """p* and the indirect effects ``[kind, layer, token]`` (NaN at tokens not traced) of one prompt."""
    p_star = float(corrupted_probs(lm, modules, clean, tr, noise, 0, [[]])[0])
    ie = torch.full((len(kinds), n_layers, len(tr.ids)), float("nan"))
    for t in positions:
        cache = corrupted_cache(lm, modules, tr, noise, t)
        configs = [c for kind in kinds for c in kind_configs(kind, n_layers, window, t)]
        probs = torch.cat([corrupted_probs(lm, modules, clean, tr, noise, t, configs[i:i + batch], cache)
                           for i in range(0, len(configs), batch)])
        ie[:, :, t] = probs.view(len(kinds), n_layers) - p_star
    return p_star, ie


def class_means(ie: torch.Tensor, classes: dict[str, list[int]]) -> torch.Tensor:
    """``[kind, layer, class]``: each class's mean over its tokens (NaN for an empty class)."""
    cols = [ie[:, :, idx].mean(-1) if idx else torch.full(ie.shape[:2], float("nan")) for idx in classes.values()]
    return torch.stack(cols, -1)


def mean_ci(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, 95% half-width (normal approximation) and count over dim 0, ignoring NaN."""
    ok = ~x.isnan()
    n = ok.sum(0)
    mean = torch.where(ok, x, 0).sum(0) / n.clamp(min=1)
    var = torch.where(ok, (x - mean) ** 2, 0).sum(0) / (n - 1).clamp(min=1)
    return mean, 1.96 * (var / n.clamp(min=1)).sqrt(), n


def prepare_prompts(prepared, tokenizer) -> list[tuple[str, Traced]]:
    """``(edit id, Traced)`` for every edit whose subject is found in its formatted prompt and has a true object;
    the answer is the first token of the true object (as ``megedit.scoring.target_ids`` tokenises it)."""
    spec, out = prepared.spec, []
    for rec, pre in zip(prepared.edits, prepared.pre_edit):
        if not rec.target_true:
            continue
        try:
            ids, b, e = subject_span(tokenizer, spec.format_prompt(rec.prompt, rec.prompt_kind), rec.subject)
            token_classes(b, e, len(ids))
        except ValueError:
            continue
        true = target_ids(tokenizer, rec.target_true)
        known = pre["prompt"]["tokens"][: len(true)] == true
        out.append((rec.id, Traced(torch.tensor(ids), b, e, true[0], known)))
    return out


def embedding_std(lm, prompts: list[tuple[str, Traced]]) -> float:
    """Std of the input embeddings of every subject token of ``prompts`` (ROME's noise scale)."""
    emb = lm.get_input_embeddings().weight
    return float(torch.cat([emb[tr.ids[tr.b:tr.e]] for _, tr in prompts]).std())


def trace_all(lm, modules, prompts, args, noise_level: float, n_layers: int) -> tuple[list[dict], torch.Tensor, int]:
    """Trace prompts in order until ``args.n`` pass the filter p_clean >= ``args.min_p``; returns the per-prompt
    rows, the class AIE stack ``[prompt, kind, layer, class]`` and how many prompts were screened."""
    rows, stack, screened, start = [], [], 0, time.perf_counter()
    for idx, (eid, tr) in enumerate(prompts):
        if len(rows) >= args.n or (args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes):
            break
        if args.known_only and not tr.known:
            continue
        t0, screened = time.perf_counter(), screened + 1
        if screened % 25 == 0:
            print(f"screened {screened}, {len(rows)} kept", flush=True)
        with torch.no_grad():
            p, clean = clean_run(lm, modules, tr.ids, tr.answer)
            if p < args.min_p:
                continue
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + idx)
            noise = torch.randn(args.samples, tr.e - tr.b, lm.get_input_embeddings().weight.shape[1],
                                generator=gen) * noise_level
            classes = token_classes(tr.b, tr.e, len(tr.ids))
            classes = {c: classes[c] for c in args.classes}
            positions = sorted({t for idx_ in classes.values() for t in idx_})
            p_star, ie = trace_prompt(lm, modules, clean, tr, noise, args.kinds, n_layers, args.window, args.batch,
                                      positions)
        stack.append(class_means(ie, classes))
        rows.append({"id": eid, "known": tr.known, "p_clean": round(p, 4), "p_star": round(p_star, 4), "tokens": len(tr.ids),
                     "subject_tokens": tr.e - tr.b, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[{len(rows)}/{args.n}] {eid} p={p:.3f} p*={p_star:.3f} ({rows[-1]['seconds']} s, "
              f"{screened} screened)", flush=True)
    if not rows:
        raise SystemExit(f"no prompt of {screened} has p_clean >= {args.min_p}")
    return rows, torch.stack(stack), screened


def summarise(stack: torch.Tensor, kinds, classes) -> dict:
    """``{kind: {class: {aie, ci95, n}}}``, one value per layer."""
    mean, half, n = mean_ci(stack)
    return {kind: {c: {"aie": [round(float(v), 5) for v in mean[k, :, j]],
                       "ci95": [round(float(v), 5) for v in half[k, :, j]], "n": int(n[k, 0, j])}
                   for j, c in enumerate(classes)} for k, kind in enumerate(kinds)}


def print_table(summary: dict, n_layers: int) -> None:
    """AIE at the last subject token per layer and kind, then each kind's peak per token class."""
    kinds = list(summary)
    if all("last_subject" in summary[k] for k in kinds):
        print("AIE at the last subject token (mean +- 95% half-width)")
        print("layer " + " ".join(f"{k:>17}" for k in kinds))
        for layer in range(n_layers):
            cells = [f"{summary[k]['last_subject']['aie'][layer]:+8.4f}+-{summary[k]['last_subject']['ci95'][layer]:.4f}"
                     for k in kinds]
            print(f"{layer:>5} " + " ".join(f"{c:>17}" for c in cells))
    print("peak per kind and token class: layer (AIE)")
    for k in kinds:
        peaks = {c: max(range(n_layers), key=lambda i, c=c: summary[k][c]["aie"][i]) for c in summary[k]}
        print(f"  {k:>10}: " + ", ".join(f"{c} {i} ({summary[k][c]['aie'][i]:+.4f})" for c, i in peaks.items()))


def plot(path: Path, summary: dict, n_layers: int, title: str) -> None:
    """ROME Fig. 1 style: one heatmap (token class x layer) per kind, and the last-subject-token AIE per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary)
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 3.6))
    for ax, kind in zip(axes, kinds):
        classes = list(summary[kind])
        grid = [summary[kind][c]["aie"] for c in classes]
        im = ax.imshow(grid, aspect="auto", cmap="Purples" if "mlp" in kind else "Greens" if kind == "attn" else "Blues",
                       vmin=0, vmax=max(max(r) for r in grid) or 1e-9)
        ax.set_yticks(range(len(classes)), [c.replace("_", " ") for c in classes], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"AIE, {kind.replace('_', ' ')} restored", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[-1]
    for kind in kinds:
        if "last_subject" in summary[kind]:
            s = summary[kind]["last_subject"]
            lo = [a - h for a, h in zip(s["aie"], s["ci95"])]
            hi = [a + h for a, h in zip(s["aie"], s["ci95"])]
            ax.plot(range(n_layers), s["aie"], label=kind.replace("_", " "))
            ax.fill_between(range(n_layers), lo, hi, alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_title("AIE at the last subject token", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def memit_layers(spec) -> list[int] | None:
    """The layers MEMIT / AlphaEdit edit: the run's spec, else the registry's (older runs predate ``memit:``)."""
    memit = spec.memit
    if memit is None:
        try:
            memit = load_model_spec(spec.name).memit
        except RegistryError:
            return None
    return list(memit.layers) if memit else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare_dir", required=True)
    ap.add_argument("--n", type=int, default=128, help="prompts that pass the filter (taken in the artifact's order)")
    ap.add_argument("--samples", type=int, default=5, help="noise draws per prompt")
    ap.add_argument("--noise", type=float, default=3.0, help="noise std as a multiple of the subject embeddings' std")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min_p", type=float, default=0.1, help="filter: keep prompts whose clean P(answer) >= this")
    ap.add_argument("--known_only", action="store_true",
                    help="filter: also require that the greedy pre-edit answer starts with the true object")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--classes", nargs="+", choices=CLASSES, default=list(CLASSES))
    ap.add_argument("--window", type=int, default=10, help="layers restored together by mlp_window")
    ap.add_argument("--batch", type=int, default=64, help="restore configs per forward (x samples rows)")
    ap.add_argument("--attn_module", default=None, help="attention's attribute path in a block (default: the child "
                                                        "named *attn*)")
    ap.add_argument("--max_minutes", type=float, default=None, help="stop starting prompts after this long "
                                                                    "(the JSON says how many were traced)")
    ap.add_argument("--out", default="bench/results/causal_trace", help="writes <out>.json and <out>.png")
    args = ap.parse_args(argv)
    args.classes = [c for c in CLASSES if c in args.classes]
    return args


def main(argv=None):
    args = parse_args(argv)
    load_before, t0 = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
    prepared = load_prepared(args.prepare_dir)
    spec = prepared.spec
    lm, tok = load_lm(spec)
    modules = trace_modules(lm, spec, args.attn_module)
    prompts = prepare_prompts(prepared, tok)
    std = embedding_std(lm, prompts)
    t1 = time.perf_counter()
    rows, stack, screened = trace_all(lm, modules, prompts, args, args.noise * std, spec.num_layers)
    summary = summarise(stack, args.kinds, args.classes)
    seconds = time.perf_counter() - t1
    result = {
        "command": "python bench/causal_trace.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": spec.name, "num_layers": spec.num_layers, "memit_layers": memit_layers(spec),
        "prompt_format": spec.completion_template, "answer": "first token of ' ' + target_true",
        "filter": f"p_clean >= {args.min_p}" + (", greedy pre-edit answer starts with target_true"
                                                 if args.known_only else ""),
        "known_in_artifact": sum(tr.known for _, tr in prompts), "n": len(rows), "n_asked": args.n, "max_minutes": args.max_minutes,
        "screened": screened, "samples": args.samples, "kinds": args.kinds, "classes": args.classes,
        "noise": {"multiple": args.noise, "subject_embedding_std": round(std, 5), "std": round(args.noise * std, 5)},
        "window": args.window, "seed": args.seed, "threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": {"load": round(t1 - t0, 1), "trace": round(seconds, 1),
                    "per_prompt": round(seconds / len(rows), 1)},
        "p_clean_mean": round(sum(r["p_clean"] for r in rows) / len(rows), 4),
        "p_star_mean": round(sum(r["p_star"] for r in rows) / len(rows), 4),
        "aie": summary, "prompts": rows,
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(out.with_suffix(".png"), summary, spec.num_layers,
         f"{spec.name}: causal trace of {len(rows)} CounterFact facts (p_clean >= {args.min_p}, {args.samples} noise draws)")
    print_table(summary, spec.num_layers)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({seconds:.0f} s tracing)")
    return result


if __name__ == "__main__":
    main()
