"""How should a neuron be collected so that it also fires on paraphrases? A study on pseudo edits.

For each recipe (layer, key init, stopping rule, optimiser, prompt wrapper, training views) this
collects one neuron per sampled pseudo edit (records that are never edited; their paraphrases are
never training data) and measures, each rate with its n and a 95% Wilson interval:

* prompt success: the engine's teacher-forced check, and real greedy decoding (AG) on the prompt;
* paraphrase transfer: greedy exact match (AG), teacher-forced exact match and token accuracy (TF)
  on the record's own paraphrases, with the record's own neuron attached;
* damage: how often the neuron, attached anyway, changes the base LM's greedy answer (10 tokens)
  on an unrelated prompt (one pseudo-irrelevant prompt per neuron);
* seconds per edit of the collection (1 thread; the machine's load average is recorded).

    python bench/neuron_recipe.py --prepare_dir runs/smollm2-counterfact-256/prepare --n 256 \
        --variants base margin3 layer27 --out bench/results/neuron_recipe.json --tag counterfact

Results of several runs (datasets) go into one JSON under their ``--tag``; ``--plot`` redraws the PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megedit.artifacts import atomic_write_json
from megedit.collect.engine import CollectItem, CollectOptions, collect, generate_prefixes, with_prefix
from megedit.collect.transfer import sample_pseudo
from megedit.collect.views import LeakGuard, relation_views
from megedit.components.neuron import DynamicNeuron
from megedit.loading import load_lm
from megedit.prepare.artifact import load_prepared
from megedit.scoring import greedy_match, greedy_tokens, teacher_forced

# The authors' instruction for CounterFact (their Phi-2 template, here inside the LM's own chat template).
INSTRUCTION = "Answer the following question in less than 5 words. {prompt}"


@dataclass(frozen=True)
class Recipe:
    layer: int = 24
    key_init: str = "last"
    stop_margin: float = 10.0
    stop_rule: str = "pass"  # pass | budget
    max_steps: int = 100
    optimizer: str = "adam"
    lr: float = 0.05
    wrapper: str = "plain"  # plain | chat (the LM's chat template) | qa (the model's question template)
    views: str = "prompt"  # prompt | prefixes | relation
    n_views: int = 4  # extra views for prefixes / relation


BASE = Recipe()
VARIANTS: dict[str, Recipe] = {
    "base": BASE,  # layer 24, margin 10, <= 100 Adam steps, plain prompt only
    "margin3": dataclasses.replace(BASE, stop_margin=3.0),
    "margin6": dataclasses.replace(BASE, stop_margin=6.0),
    "budget40": dataclasses.replace(BASE, stop_rule="budget", max_steps=40, stop_margin=0.0),
    "budget80": dataclasses.replace(BASE, stop_rule="budget", max_steps=80, stop_margin=0.0),
    "sgd_authors": dataclasses.replace(BASE, optimizer="sgd", lr=1.0, key_init="random", stop_rule="budget",
                                       max_steps=80, stop_margin=0.0),
    "sgd_margin10": dataclasses.replace(BASE, optimizer="sgd", lr=1.0),
    "key_subject": dataclasses.replace(BASE, key_init="subject"),
    "key_mean": dataclasses.replace(BASE, key_init="mean"),
    "key_random": dataclasses.replace(BASE, key_init="random"),
    "chat": dataclasses.replace(BASE, wrapper="chat"),
    "qa": dataclasses.replace(BASE, wrapper="qa"),
    "qa_margin3": dataclasses.replace(BASE, wrapper="qa", stop_margin=3.0),
    "prefixes4": dataclasses.replace(BASE, views="prefixes"),
    "relation4": dataclasses.replace(BASE, views="relation"),
    "relation4_margin3": dataclasses.replace(BASE, views="relation", stop_margin=3.0),
    "current_default": dataclasses.replace(BASE, layer=9, stop_margin=3.0, max_steps=50),
}
LAYER_SWEEP = (3, 6, 9, 12, 15, 18, 21, 27, 29)  # every third layer of SmolLM2's 30 beside the default 24
for _layer in LAYER_SWEEP:
    VARIANTS[f"layer{_layer}"] = dataclasses.replace(BASE, layer=_layer)
# A larger Adam step reaches the margin in fewer steps: collection cost is steps x rows x layers above.
for _name in ("base", "margin3", "margin6", "layer27", "layer29", "relation4_margin3", "qa", "qa_margin3", "budget40"):
    VARIANTS[f"{_name}_lr0.2"] = dataclasses.replace(VARIANTS[_name], lr=0.2)
# App. A.4's question (which layer?) asked with the stage's own recipes: CounterFact's (qa wrapper) and
# ZsRE's (plain), margin 3 at Adam 0.2, at every third layer. The plot draws one line per recipe.
LAYER_FAMILIES = ("base", "margin3_lr0.2", "qa_margin3_lr0.2")
for _family in LAYER_FAMILIES[1:]:
    for _layer in LAYER_SWEEP:
        VARIANTS[f"{_family}_layer{_layer}"] = dataclasses.replace(VARIANTS[_family], layer=_layer)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(hits) -> dict:
    hits = [bool(h) for h in hits]
    k, n = sum(hits), len(hits)
    return {"rate": round(k / max(n, 1), 4), "n": n, "ci95": wilson(k, n)}


class Study:
    def __init__(self, prepare_dir: str, n: int, seed: int, capacity: int):
        self.prepared = load_prepared(prepare_dir)
        self.spec = self.prepared.spec
        self.lm, self.tok = load_lm(self.spec)
        self.records = sample_pseudo(self.prepared.pseudo_edits, n, seed)
        sampled = {r.id for r in self.records}
        # Never a training view: any evaluation text of the run, nor a sampled record's own paraphrase.
        banned = [p for r in self.prepared.edits for p in r.paraphrases]
        banned += [q.prompt for r in self.prepared.edits for q in r.locality]
        banned += [p for r in self.records for p in r.paraphrases]
        self.guard = LeakGuard(banned)
        self.pool = [r for r in self.prepared.pseudo_edits if r.id not in sampled]
        irrelevant = list(self.prepared.pseudo_irrelevant)
        random.Random(f"{seed}:damage").shuffle(irrelevant)
        self.unrelated = [(r["prompt"], r.get("prompt_kind", "completion")) for r in irrelevant[: len(self.records)]]
        self.capacity = capacity
        self._base_answers: dict[str, list] = {}
        self._prefixes = generate_prefixes(self.lm, self.tok, 8, 10, 0)

    def wrap(self, recipe: Recipe, spec, text: str, kind: str) -> str:
        # The recipes name their wrapper themselves, so completions start from the bare text here.
        formatted = dataclasses.replace(spec, completion_template="{prompt}").format_prompt(text, kind)
        if recipe.wrapper == "plain":
            return formatted
        message = INSTRUCTION.format(prompt=formatted) if kind == "completion" else formatted
        if recipe.wrapper == "qa":  # completions asked like questions, so every prompt ends like the others
            return spec.question_template.format(question=message) if kind == "completion" else formatted
        return self.tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                            tokenize=False)

    def views(self, recipe: Recipe, spec) -> tuple[list[list[str]], int]:
        """Per record, the LM strings it is trained on (the prompt first), and how many extra views were dropped."""
        recs = self.records
        if recipe.views == "prompt":
            extra = [[] for _ in recs]
        elif recipe.views == "prefixes":
            extra = [[with_prefix(p, r.prompt) for p in self._prefixes[: recipe.n_views]] for r in recs]
        elif recipe.views == "relation":
            extra = relation_views(recs, self.pool, recipe.n_views, self.guard)
        else:
            raise ValueError(f"unknown views {recipe.views!r}")
        kept = []
        for r, texts in zip(recs, extra):
            assert not any(self.guard.leaks(t) for t in texts), "a training view equals an evaluation text"
            kept.append([self.wrap(recipe, spec, t, r.prompt_kind) for t in [r.prompt, *texts]])
        return kept, sum(len(e) for e in extra)

    def base_answers(self, recipe: Recipe, spec, prompts: list[str]) -> list:
        if recipe.wrapper not in self._base_answers:
            self._base_answers[recipe.wrapper] = greedy_tokens(self.lm, self.tok, None, prompts, None, 10, 64)
        return self._base_answers[recipe.wrapper]

    def measure(self, recipe: Recipe) -> dict:
        spec = dataclasses.replace(self.spec, edit_layer=recipe.layer)
        neuron = DynamicNeuron(self.lm, spec)
        try:
            return self._measure(recipe, spec, neuron)
        finally:
            neuron.remove()

    def _measure(self, recipe: Recipe, spec, neuron) -> dict:
        views, n_extra = self.views(recipe, spec)
        items = [CollectItem(i, v, r.target_new, r.subject) for i, (r, v) in enumerate(zip(self.records, views))]
        opts = CollectOptions(lr=recipe.lr, optimizer=recipe.optimizer, max_steps=recipe.max_steps,
                              capacity=self.capacity, key_init=recipe.key_init, stop_margin=recipe.stop_margin,
                              stop_rule=recipe.stop_rule)
        t0 = time.perf_counter()
        results = collect(self.lm, self.tok, spec, items, opts, neuron=neuron, progress=True)
        seconds = time.perf_counter() - t0
        W = torch.stack([r.weights for r in results])
        targets = [r.target_new for r in self.records]
        prompts = [v[0] for v in views]
        prompt_ag = greedy_match(self.lm, self.tok, neuron, prompts, targets, W, batch_size=64)
        para, rows = [], []
        for i, r in enumerate(self.records):
            for p in r.paraphrases:
                para.append(self.wrap(recipe, spec, p, r.prompt_kind))
                rows.append(i)
        para_targets = [targets[i] for i in rows]
        ag = greedy_match(self.lm, self.tok, neuron, para, para_targets, W[rows], batch_size=64)
        tf = teacher_forced(self.lm, self.tok, neuron, para, para_targets, W[rows], batch_size=64)
        unrelated = [self.wrap(recipe, spec, p, k) for p, k in self.unrelated]
        base = self.base_answers(recipe, spec, unrelated)
        edited = greedy_tokens(self.lm, self.tok, neuron, unrelated, W[: len(unrelated)], 10, 64)
        return {
            "recipe": dataclasses.asdict(recipe),
            "n_edits": len(self.records), "n_extra_views": n_extra,
            "prompt_success_tf": rate(r.success for r in results),
            "reached_margin": rate(r.reached_margin for r in results),
            "prompt_success_ag": rate(prompt_ag.tolist()),
            "paraphrase_ag": rate(ag.tolist()),
            "paraphrase_tf_exact": rate(tf["exact"].tolist()),
            "paraphrase_tf_token_acc": round(float(tf["token_acc"].mean()), 4),
            "unrelated_changed": rate(a != b for a, b in zip(base, edited)),
            "steps_mean": round(sum(r.steps for r in results) / len(results), 2),
            "seconds_per_edit": round(seconds / len(results), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


def layer_family(name: str) -> str | None:
    """The recipe a layer-sweep variant varies (``base`` for ``layer9``), or None for other variants."""
    if name.startswith("layer") and name[5:].isdigit():
        return "base"
    family, _, layer = name.rpartition("_layer")
    if family in LAYER_FAMILIES and layer.isdigit():
        return family
    return name if name in LAYER_FAMILIES else None


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(out["runs"])
    fig, axes = plt.subplots(len(tags), 2, figsize=(13, 4.2 * len(tags)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3]})
    for row, tag in zip(axes, tags):
        variants = out["runs"][tag]["variants"]
        names = [n for n in variants if layer_family(n) is None or n in LAYER_FAMILIES]
        ag = [variants[n]["paraphrase_ag"] for n in names]
        err = [[a["rate"] - a["ci95"][0] for a in ag], [a["ci95"][1] - a["rate"] for a in ag]]
        row[0].bar(names, [a["rate"] for a in ag], yerr=err, capsize=3, color="tab:blue", label="paraphrase AG")
        row[0].plot(names, [variants[n]["unrelated_changed"]["rate"] for n in names], "rv", label="unrelated changed")
        row[0].plot(names, [variants[n]["prompt_success_ag"]["rate"] for n in names], "k_", ms=14,
                    label="prompt AG")
        row[0].set_title(f"{tag}: recipes (n={out['runs'][tag]['n_edits']} pseudo edits, 95% CI)")
        row[0].set_ylim(0, 1.02)
        row[0].tick_params(axis="x", rotation=60)
        row[0].legend(fontsize=8)
        for family in LAYER_FAMILIES:
            layers = sorted(((v["recipe"]["layer"], v) for n, v in variants.items() if layer_family(n) == family),
                            key=lambda lv: lv[0])
            if len(layers) < 2:
                continue
            xs = [l for l, _ in layers]
            line = row[1].errorbar(xs, [v["paraphrase_ag"]["rate"] for _, v in layers], fmt="o-",
                                   yerr=[[v["paraphrase_ag"]["rate"] - v["paraphrase_ag"]["ci95"][0] for _, v in layers],
                                         [v["paraphrase_ag"]["ci95"][1] - v["paraphrase_ag"]["rate"] for _, v in layers]],
                                   label=f"{family}: paraphrase AG")
            row[1].plot(xs, [v["prompt_success_ag"]["rate"] for _, v in layers], ".--",
                        color=line[0].get_color(), label=f"{family}: prompt AG")
        row[1].set_xlabel("edit layer")
        row[1].set_ylim(0, 1.02)
        if row[1].get_legend_handles_labels()[0]:
            row[1].legend(fontsize=7)
        else:
            row[1].axis("off")
            row[1].text(0.5, 0.5, "no layer sweep for this run", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(out: dict) -> str:
    lines = []
    for tag, run in out["runs"].items():
        lines.append(f"\n{tag} (n={run['n_edits']} pseudo edits; rates with 95% Wilson intervals)")
        lines.append(f"{'variant':20s} {'prompt AG':>10} {'para AG':>18} {'para TF':>8} {'unrel chg':>10} "
                     f"{'steps':>6} {'s/edit':>7}")
        for name, v in run["variants"].items():
            a = v["paraphrase_ag"]
            lines.append(f"{name:20s} {v['prompt_success_ag']['rate']:>10.3f} {a['rate']:>7.3f} "
                         f"[{a['ci95'][0]:.2f},{a['ci95'][1]:.2f}] {v['paraphrase_tf_token_acc']:>8.3f} "
                         f"{v['unrelated_changed']['rate']:>10.3f} {v['steps_mean']:>6.1f} {v['seconds_per_edit']:>7.2f}")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    """One Markdown table per run: every rate as a percentage with its 95% interval."""
    def pct(r):
        return f"{100 * r['rate']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"

    lines = []
    for tag, run in out["runs"].items():
        lines += [f"**{tag}**, n = {run['n_edits']} pseudo edits (seed {run['seed']}, {run['threads']} thread):", "",
                  "| variant | layer | key | stop | lr | wrapper | views | prompt AG | paraphrase AG | paraphrase TF "
                  "tok. acc | unrelated changed | mean steps | s / edit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in run["variants"].items():
            r = v["recipe"]
            stop = (f"margin {r['stop_margin']:g}" if r["stop_rule"] == "pass" else f"{r['max_steps']} steps")
            views = r["views"] if r["views"] == "prompt" else f"{r['views']} ({v['n_extra_views']})"
            lines.append(f"| {name} | {r['layer']} | {r['key_init']} | {stop} | {r['optimizer']} {r['lr']:g} | "
                         f"{r['wrapper']} | {views} | {pct(v['prompt_success_ag'])} | {pct(v['paraphrase_ag'])} | "
                         f"{100 * v['paraphrase_tf_token_acc']:.1f} | {pct(v['unrelated_changed'])} | "
                         f"{v['steps_mean']:.1f} | {v['seconds_per_edit']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare_dir")
    ap.add_argument("--tag", help="name of this run in the JSON (e.g. the dataset)")
    ap.add_argument("--n", type=int, default=256, help="pseudo edits to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    ap.add_argument("--out", default="bench/results/neuron_recipe.json")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG and print the table from --out")
    ap.add_argument("--markdown", action="store_true", help="with --plot: print Markdown tables instead")
    args = ap.parse_args(argv)
    out_path = Path(args.out)
    png = out_path.with_suffix(".png")
    if args.plot:
        out = json.loads(out_path.read_text())
        plot(out, png)
        print(markdown(out) if args.markdown else table(out))
        return out
    if not args.prepare_dir or not args.tag:
        ap.error("--prepare_dir and --tag are needed unless --plot")
    torch.manual_seed(args.seed)
    study = Study(args.prepare_dir, args.n, args.seed, args.capacity)
    command = "python bench/neuron_recipe.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    for name in args.variants:
        row = study.measure(VARIANTS[name])
        out = update_results(out_path, args.tag, name, row, study, args, command)
        print(f"{args.tag} {name:20s} para AG {row['paraphrase_ag']['rate']:.3f} {row['paraphrase_ag']['ci95']} "
              f"prompt AG {row['prompt_success_ag']['rate']:.3f} unrelated changed "
              f"{row['unrelated_changed']['rate']:.3f} {row['seconds_per_edit']:.2f} s/edit", flush=True)
    plot(out, png)
    print(table(out))
    return out


def update_results(out_path: Path, tag: str, name: str, row: dict, study: Study, args, command: str) -> dict:
    """Add one variant's row under ``tag``; locked, because runs of other tags write the same file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = json.loads(out_path.read_text()) if out_path.is_file() else {"runs": {}}
        run = out["runs"].setdefault(tag, {})
        run.update({"prepare_dir": args.prepare_dir, "model": study.spec.name, "n_edits": len(study.records),
                    "seed": args.seed, "threads": torch.get_num_threads()})
        run.setdefault("commands", [])
        if command not in run["commands"]:
            run["commands"].append(command)
        run.setdefault("variants", {})[name] = row
        atomic_write_json(out_path, out)
    return out


if __name__ == "__main__":
    main()
