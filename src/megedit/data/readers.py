"""Readers for the public knowledge-editing formats, with format detection and precise errors.

Formats (``FORMATS``):
- ``counterfact_easyedit``: EasyEdit CounterFact (``prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``)
- ``counterfact_rome``: ROME/MEMIT CounterFact (``requested_rewrite`` with a ``{}`` template,
  ``paraphrase_prompts``, ``neighborhood_prompts``)
- ``zsre_mend``: MEND ZsRE (``src, alt, rephrase, loc, loc_ans``)
- ``zsre_knowedit``: KnowEdit ZsRE (``prompt, target_new, ground_truth[], rephrase_prompt, locality{}``)
- ``mquake``: MQuAKE (``requested_rewrite[]`` plus multi-hop ``questions``)
- ``paraphrase_groups``: PokeMQA-style ``{edit, questions[]}`` paraphrase corpus
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from megedit.data.records import EditRecord, ParaphraseGroup, Probe


class DataFormatError(ValueError):
    """One malformed file or record: says which file, which record, which field and what was expected."""

    def __init__(self, file: str | Path, message: str, record: int | None = None, record_id: Any = None,
                 field: str | None = None):
        where = str(file)
        if record is not None:
            where += f": record {record}"
            if record_id is not None:
                where += f" ({record_id})"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.file, self.record, self.record_id, self.field = str(file), record, record_id, field


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


class _Ctx:
    """Field access for one record that raises DataFormatError with full context."""

    def __init__(self, file: str, index: int, record: Any, id_field: str | None = None):
        self.file, self.index, self.record = file, index, record
        rid = record.get(id_field) if (id_field and isinstance(record, dict)) else None
        self.record_id = f"{id_field}={rid}" if rid is not None else None
        if not isinstance(record, dict):
            self.fail(None, f"expected a JSON object, got {type(record).__name__}")

    def fail(self, field: str | None, message: str):
        raise DataFormatError(self.file, message, self.index, self.record_id, field)

    def get(self, obj: dict, key: str, path: str, optional: bool = False):
        if not isinstance(obj, dict):
            self.fail(path.rsplit(".", 1)[0], f"expected an object, got {type(obj).__name__}")
        if key not in obj or obj[key] is None:
            if optional:
                return None
            self.fail(path, "is missing")
        return obj[key]

    def string(self, obj: dict, key: str, path: str | None = None, optional: bool = False) -> str | None:
        path = path or key
        value = self.get(obj, key, path, optional)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type(value).__name__} {_describe(value)}")
        if not value.strip():
            self.fail(path, "expected a non-empty string, got an empty one")
        return value.strip()

    def string_list(self, obj: dict, key: str, path: str | None = None, optional: bool = False) -> list[str]:
        path = path or key
        value = self.get(obj, key, path, optional)
        if value is None:
            return []
        if isinstance(value, str):  # several formats store one paraphrase as a bare string
            value = [value]
        if not isinstance(value, list):
            self.fail(path, f"expected a list of strings, got {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.fail(f"{path}[{i}]", f"expected a non-empty string, got {_describe(item)}")
            out.append(item.strip())
        return out

    def first_answer(self, obj: dict, key: str, path: str | None = None, optional: bool = False) -> str | None:
        """A ground truth given either as a string or as a non-empty list of strings (first one wins)."""
        path = path or key
        value = self.get(obj, key, path, optional)
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                self.fail(path, "expected a string or a non-empty list of strings, got []")
            value, path = value[0], f"{path}[0]"
            if isinstance(value, list) and value:  # KnowEdit nests [[answer]] in places
                value = value[0]
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {_describe(value)}")
        return value.strip()

    def template(self, obj: dict, key: str, path: str) -> str:
        value = self.string(obj, key, path)
        if "{}" not in value:
            self.fail(path, f"expected a template with '{{}}' where the subject goes, got {_describe(value)}")
        return value

    def subject_in(self, subject: str, text: str, path: str):
        if subject not in text:
            self.fail(path, f"expected the subject {subject!r} to occur in the prompt {_describe(text)}")


def load_json_list(path: Path) -> list:
    """Read a JSON (list of records) or JSONL file; a syntax error names the line and column."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataFormatError(path, f"expected a JSON list of records at the top level, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- readers

def _probes(ctx: _Ctx, groups: Any, path: str, kind: str) -> list[Probe]:
    """KnowEdit-style ``{name: [{prompt, ground_truth}]}`` (or a bare list) into Probes."""
    if groups is None:
        return []
    if isinstance(groups, list):
        groups = {"": groups}
    if not isinstance(groups, dict):
        ctx.fail(path, f"expected an object of lists, got {type(groups).__name__}")
    out = []
    for name, items in groups.items():
        gpath = f"{path}.{name}" if name else path
        if not isinstance(items, list):
            ctx.fail(gpath, f"expected a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            ipath = f"{gpath}[{i}]"
            out.append(Probe(ctx.string(item, "prompt", f"{ipath}.prompt"),
                             ctx.first_answer(item, "ground_truth", f"{ipath}.ground_truth", optional=True), kind))
    return out


def _gpt4_portability(ctx: _Ctx, raw: dict, kind: str) -> list[Probe]:
    port = raw.get("portability")
    if port is None:
        return []
    if isinstance(port, dict) and "New Question" in port:
        return [Probe(ctx.string(port, "New Question", "portability.New Question"),
                      ctx.string(port, "New Answer", "portability.New Answer"), kind)]
    return _probes(ctx, port, "portability", kind)


def read_counterfact_easyedit(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        subject, prompt = ctx.string(raw, "subject"), ctx.string(raw, "prompt")
        ctx.subject_in(subject, prompt, "prompt")
        loc_prompt = ctx.string(raw, "locality_prompt", optional=True)
        locality = [Probe(loc_prompt, ctx.string(raw, "locality_ground_truth", optional=True))] if loc_prompt else []
        native = raw.get("case_id", i)
        out.append(EditRecord(
            id=f"{Path(file).stem}:{native}", subject=subject, prompt=prompt, prompt_kind="completion",
            target_new=ctx.first_answer(raw, "target_new"), target_true=ctx.first_answer(raw, "ground_truth", optional=True),
            paraphrases=ctx.string_list(raw, "rephrase_prompt", optional=True), locality=locality,
            portability=_gpt4_portability(ctx, raw, "completion"), source=file, index=i))
    return out


def read_counterfact_rome(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        rw = ctx.get(raw, "requested_rewrite", "requested_rewrite")
        if not isinstance(rw, dict):
            ctx.fail("requested_rewrite", f"expected an object, got {type(rw).__name__}")
        template = ctx.template(rw, "prompt", "requested_rewrite.prompt")
        subject = ctx.string(rw, "subject", "requested_rewrite.subject")
        target_new = ctx.string(ctx.get(rw, "target_new", "requested_rewrite.target_new"), "str",
                                "requested_rewrite.target_new.str")
        true_obj = rw.get("target_true")
        target_true = ctx.string(true_obj, "str", "requested_rewrite.target_true.str") if true_obj else None
        locality = [Probe(p, target_true) for p in ctx.string_list(raw, "neighborhood_prompts", optional=True)]
        out.append(EditRecord(
            id=f"{Path(file).stem}:{raw.get('case_id', i)}", subject=subject, prompt=template.replace("{}", subject),
            prompt_kind="completion", target_new=target_new, target_true=target_true,
            paraphrases=ctx.string_list(raw, "paraphrase_prompts", optional=True), locality=locality,
            portability=_gpt4_portability(ctx, raw, "question"), source=file, index=i))
    return out


def read_zsre_mend(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw)
        loc = ctx.string(raw, "loc", optional=True)
        locality = [Probe(loc, ctx.string(raw, "loc_ans", optional=True), "question")] if loc else []
        out.append(EditRecord(
            id=f"{Path(file).stem}:{i}", subject=ctx.string(raw, "subject"), prompt=ctx.string(raw, "src"),
            prompt_kind="question", target_new=ctx.first_answer(raw, "alt"),
            target_true=ctx.first_answer(raw, "answers", optional=True),
            paraphrases=ctx.string_list(raw, "rephrase", optional=True), locality=locality,
            portability=_gpt4_portability(ctx, raw, "question"), source=file, index=i))
    return out


def read_zsre_knowedit(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw)
        out.append(EditRecord(
            id=f"{Path(file).stem}:{i}", subject=ctx.string(raw, "subject"), prompt=ctx.string(raw, "prompt"),
            prompt_kind="question", target_new=ctx.first_answer(raw, "target_new"),
            target_true=ctx.first_answer(raw, "ground_truth", optional=True),
            paraphrases=ctx.string_list(raw, "rephrase_prompt", optional=True),
            locality=_probes(ctx, raw.get("locality"), "locality", "completion"),
            portability=_probes(ctx, raw.get("portability"), "portability", "question"), source=file, index=i))
    return out


def read_mquake(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    """One record per requested rewrite; the case's multi-hop questions ride on its first rewrite."""
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        rewrites = ctx.get(raw, "requested_rewrite", "requested_rewrite")
        if not isinstance(rewrites, list) or not rewrites:
            ctx.fail("requested_rewrite", "expected a non-empty list of rewrites")
        answer = ctx.string(raw, "new_answer", optional=True)
        hops = [Probe(q, answer, "question") for q in ctx.string_list(raw, "questions", optional=True)]
        for j, rw in enumerate(rewrites):
            p = f"requested_rewrite[{j}]"
            template = ctx.template(rw, "prompt", f"{p}.prompt")
            subject = ctx.string(rw, "subject", f"{p}.subject")
            true_obj = rw.get("target_true")
            question = ctx.string(rw, "question", f"{p}.question", optional=True)
            out.append(EditRecord(
                id=f"{Path(file).stem}:{raw.get('case_id', i)}/{j}", subject=subject,
                prompt=template.replace("{}", subject), prompt_kind="completion",
                target_new=ctx.string(ctx.get(rw, "target_new", f"{p}.target_new"), "str", f"{p}.target_new.str"),
                target_true=ctx.string(true_obj, "str", f"{p}.target_true.str") if true_obj else None,
                paraphrases=[question] if question else [], multi_hop=hops if j == 0 else [],
                source=file, index=i))
    return out


def read_paraphrase_groups(rows: list, file: str, start: int = 0) -> list[ParaphraseGroup]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw)
        texts = ctx.string_list(raw, "questions")
        statement = ctx.string(raw, "edit", optional=True)
        if len(texts) < 2:
            ctx.fail("questions", f"expected at least 2 paraphrased questions, got {len(texts)}")
        out.append(ParaphraseGroup(id=f"{Path(file).stem}:{i}", texts=texts + ([statement] if statement else []),
                                   source=file))
    return out


READERS: dict[str, Callable[..., list]] = {
    "counterfact_easyedit": read_counterfact_easyedit,
    "counterfact_rome": read_counterfact_rome,
    "zsre_mend": read_zsre_mend,
    "zsre_knowedit": read_zsre_knowedit,
    "mquake": read_mquake,
    "paraphrase_groups": read_paraphrase_groups,
}
FORMATS = tuple(READERS)

# Keys that identify each format in its first record (checked in this order).
_SIGNATURES: list[tuple[str, Callable[[dict], bool]]] = [
    ("mquake", lambda r: isinstance(r.get("requested_rewrite"), list)),
    ("counterfact_rome", lambda r: isinstance(r.get("requested_rewrite"), dict)),
    ("zsre_mend", lambda r: "src" in r and "alt" in r),
    ("zsre_knowedit", lambda r: "rephrase_prompt" in r and isinstance(r.get("locality"), dict)),
    ("counterfact_easyedit", lambda r: "prompt" in r and "target_new" in r and "subject" in r),
    ("paraphrase_groups", lambda r: "questions" in r and "edit" in r),
]


def detect_format(rows: list, file: str | Path) -> str:
    if not rows:
        raise DataFormatError(file, "the file holds no records")
    first = rows[0]
    if not isinstance(first, dict):
        raise DataFormatError(file, f"expected a JSON object, got {type(first).__name__}", record=0)
    for name, matches in _SIGNATURES:
        if matches(first):
            return name
    raise DataFormatError(
        file, f"cannot tell the format from the keys {sorted(first)}; expected one of {', '.join(FORMATS)} "
        "(pass the format explicitly to override detection)", record=0)


def read_file(path: str | Path, fmt: str = "auto", display_name: str | None = None,
              on_invalid: str = "error", invalid: list | None = None) -> tuple[str, list]:
    """Read one benchmark file into records; returns ``(format, records)``.

    ``on_invalid="error"`` (default) raises on the first malformed record. ``"drop"`` skips malformed
    records instead and appends ``(record index, error message)`` to ``invalid`` so the caller reports them.
    """
    if on_invalid not in ("error", "drop"):
        raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
    path = Path(path)
    name = display_name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file")
    rows = load_json_list(path)
    if fmt == "auto":
        fmt = detect_format(rows, name)
    elif fmt not in READERS:
        raise ValueError(f"{name}: unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    reader = READERS[fmt]
    if on_invalid == "error":
        return fmt, reader(rows, name)
    if invalid is None:
        raise ValueError("on_invalid='drop' needs a list to report the dropped records in")
    out = []
    for i, row in enumerate(rows):
        try:
            out.extend(reader([row], name, i))
        except DataFormatError as exc:
            invalid.append((i, str(exc)))
    return fmt, out
