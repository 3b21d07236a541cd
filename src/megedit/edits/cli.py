"""``megedit edits add | remove | list``: change a run's edits without a full retrain (docs/incremental.md)."""

from __future__ import annotations

import argparse
import json
import sys

from megedit.artifacts import ArtifactError
from megedit.data.readers import DataFormatError
from megedit.edits.budget import GeneratorBudget
from megedit.edits.new_edits import EditsError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megedit edits", description=__doc__.split(":", 1)[1].strip())
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add the edits of FILE(s) in a new run version (prepare, collect, fine-tune)")
    add.add_argument("--run", required=True, help="the run folder (its latest version is extended)")
    add.add_argument("files", nargs="+", metavar="FILE", help="edits in any format the prepare stage reads")
    add.add_argument("--replace", action="store_true",
                     help="an edit with the subject and prompt of one of the run's, but another target, replaces it "
                          "(default: refused)")
    budget = GeneratorBudget()  # one place for the defaults
    add.add_argument("--draws-per-new-edit", type=int, default=budget.draws_per_new_edit,
                     help=f"generator fine-tuning budget: how often each new edit is drawn (default {budget.draws_per_new_edit})")
    add.add_argument("--new-share", type=float, default=budget.new_share,
                     help=f"share of every generator batch that goes to the new edits (default {budget.new_share})")
    add.add_argument("--lr-scale", type=float, default=budget.lr_scale,
                     help=f"generator fine-tuning peak learning rate, as a factor on the parent's (default {budget.lr_scale})")
    add.add_argument("--quiet", action="store_true", help="no progress bars")
    rm = sub.add_parser("remove", help="make edits answer as before editing, at once, in a new run version")
    rm.add_argument("--run", required=True)
    rm.add_argument("ids", nargs="+", metavar="ID", help="edit ids (prepare/edits.jsonl; megedit ask shows them)")
    rm.add_argument("--reason", help="recorded in removed.json")
    ls = sub.add_parser("list", help="the run's versions")
    ls.add_argument("--run", required=True)
    ls.add_argument("--json", action="store_true", help="one JSON object per version instead of a table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "add":
            from megedit.edits.add import add_edits

            budget = GeneratorBudget(draws_per_new_edit=args.draws_per_new_edit, new_share=args.new_share,
                                     lr_scale=args.lr_scale)
            add_edits(args.run, args.files, replace=args.replace, budget=budget, quiet=args.quiet)
        elif args.command == "remove":
            from megedit.edits.remove import remove_edits

            remove_edits(args.run, args.ids, reason=args.reason)
        else:
            from megedit.edits.listing import table, version_rows

            if args.json:
                for row in version_rows(args.run):
                    print(json.dumps(row))
            else:
                print(table(args.run))
    except (ArtifactError, DataFormatError, EditsError, FileNotFoundError) as exc:
        print(f"megedit edits {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
