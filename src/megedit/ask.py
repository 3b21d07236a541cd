"""``megedit ask --run DIR "question" ...``: answer questions with an edited model and show why.

Questions come from the arguments, from ``--file`` (one per line) or from stdin. For each one it
prints the answer and its provenance: routed to a generated neuron or not, the router's
entropy against the threshold, and the nearest edit (id, prompt, target, cosine similarity).
"""

from __future__ import annotations

import argparse
import json
import sys

from megedit.defaults import DEFAULT_STEPS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megedit ask", description=__doc__.split("\n\n")[0])
    p.add_argument("questions", nargs="*", help="questions; none: read --file or stdin, one per line")
    p.add_argument("--run", required=True, help="run directory with prepare/ encoder/ familiarity/ diffusion/")
    p.add_argument("--version", type=int, default=None,
                   help="run version (megedit edits list); default: the latest, 0: the run as first built")
    p.add_argument("--file", help="read questions from this file, one per line")
    p.add_argument("--kind", choices=["question", "completion"], default="question",
                   help="question / completion: wrap in the model's question / completion template")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--no-router", action="store_true", help="attach a generated neuron to every query")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (10 to 1000 give the same answers; docs/ablations.md)")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="sampling temperature (initial-noise scale, 0..1); default: the generator's own")
    p.add_argument("--value-scale", type=float, default=None,
                   help="factor on the generated neurons' value vectors; default: the generator's own")
    p.add_argument("--json", action="store_true", help="one JSON object per question instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    questions = list(args.questions)
    if not questions:
        stream = open(args.file, encoding="utf-8") if args.file else sys.stdin
        questions = [line.strip() for line in stream if line.strip()]
    if not questions:
        print("megedit ask: no questions given (arguments, --file or stdin)", file=sys.stderr)
        return 2
    from megedit.edited_model import EditedLM

    lm = EditedLM.load(args.run, version=args.version, use_router=not args.no_router, steps=args.steps,
                       noise_scale=args.noise_scale, value_scale=args.value_scale)
    routing = lm.route(questions)
    answers = lm.generate(questions, kind=args.kind, max_new_tokens=args.max_new_tokens, routing=routing)
    nearest = lm.nearest_edits(routing.embeddings)
    rows = zip(questions, answers, routing.familiar.tolist(), routing.removed.tolist(), routing.entropy.tolist(),
               nearest)
    for q, a, fam, removed, ent, near in rows:
        record = {"question": q, "answer": a, "routed": bool(fam), "nearest_is_removed": bool(removed),
                  "router": lm.router.kind, "entropy": round(ent, 4), "threshold": lm.router.threshold,
                  "nearest_edit": near}
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            how = "edited neuron" if fam else "unedited LM" + (" (nearest edit removed)" if removed else "")
            where = ("no edit left" if near is None else f"nearest edit {near['id']} ({near['similarity']:.3f}): "
                     f"{near['prompt']!r} -> {near['target_new']!r}")
            score = f"{lm.router.kind} score {ent:.4f} vs threshold {lm.router.threshold:.4f}"
            print(f"Q: {q}\nA: {a}\n   [{how}; {score}; {where}]")
    return 0
