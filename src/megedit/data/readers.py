"""Readers for the public knowledge-editing formats, with format detection and precise errors.

Formats (``FORMATS``):
- ``counterfact_easyedit``: EasyEdit CounterFact (``prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``)
- ``counterfact_rome``: ROME/MEMIT CounterFact (``requested_rewrite`` with a ``{}`` template,
  ``paraphrase_prompts``, ``neighborhood_prompts``)
- ``zsre_mend``: MEND ZsRE (``src, alt, rephrase, loc, loc_ans``)
- ``zsre_knowedit``: KnowEdit ZsRE (``prompt, target_new, ground_truth[], rephrase_prompt, locality{}``)
- ``mquake``: MQuAKE (one record per case: ``requested_rewrite[]`` as atoms, multi-hop ``questions``,
  unedited ``single_hops`` as locality)
- ``paraphrase_groups``: PokeMQA-style ``{edit, questions[]}`` paraphrase corpus

Every field is checked against its format's schema (``docs/input-checks.md`` lists each check): a field is
either absent (where it is optional) or of its declared type. Nothing is coerced: a bare string is not a
list, null is not "absent", a number is not text. The readers only read: a bad record raises before any
record of the file is returned (``on_invalid="drop"`` instead skips it and reports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from megedit.data.records import Atom, EditRecord, ParaphraseGroup, Probe


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


def _got(value: Any) -> str:
    """What a wrong value was, as an error shows it: its type and (shortened) value; JSON null as 'null'."""
    return "null" if value is None else f"{type(value).__name__} {_describe(value)}"


_ABSENT = object()  # a key left out, which optional fields allow, unlike a key set to null (a type error)


class _Ctx:
    """The one validation helper: typed field access for one record.

    Each accessor checks one field against what its format declares and raises DataFormatError naming the
    file, the record (index and case id) and the field path; nothing is coerced into the expected type.
    """

    def __init__(self, file: str, index: int, record: Any, id_field: str | None = None):
        self.file, self.index, self.record = file, index, record
        rid = record.get(id_field) if (id_field and isinstance(record, dict)) else None
        self.record_id = f"{id_field}={rid}" if rid is not None else None
        if not isinstance(record, dict):
            self.fail(None, f"expected a JSON object, got {type(record).__name__}")

    def fail(self, field: str | None, message: str):
        raise DataFormatError(self.file, message, self.index, self.record_id, field)

    def expect(self, path: str, what: str, value: Any):
        self.fail(path, f"expected {what}, got {_got(value)}")

    def get(self, obj: Any, key: str, path: str, optional: bool = False) -> Any:
        """The raw value, or ``_ABSENT`` for an optional key that is left out."""
        if not isinstance(obj, dict):
            self.expect(path.rsplit(".", 1)[0], "an object", obj)
        if key not in obj:
            if optional:
                return _ABSENT
            self.fail(path, "is missing")
        return obj[key]

    def obj(self, obj: Any, key: str, path: str, optional: bool = False) -> dict | None:
        value = self.get(obj, key, path, optional)
        if value is _ABSENT:
            return None
        if not isinstance(value, dict):
            self.expect(path, "an object", value)
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.expect(path, "a string", value)
        if not value.strip():
            self.fail(path, "expected a non-empty string, got an empty one")
        return value.strip()

    def string(self, obj: Any, key: str, path: str | None = None, optional: bool = False) -> str | None:
        path = path or key
        value = self.get(obj, key, path, optional)
        return None if value is _ABSENT else self.text(value, path)

    def string_list(self, obj: Any, key: str, path: str | None = None, optional: bool = False) -> list[str]:
        path = path or key
        value = self.get(obj, key, path, optional)
        if value is _ABSENT:
            return []
        if not isinstance(value, list):  # a bare string here is a schema error, not a one-item list
            self.expect(path, "a list of strings", value)
        return [self.text(item, f"{path}[{i}]") for i, item in enumerate(value)]

    def first_answer(self, obj: Any, key: str, path: str | None = None, optional: bool = False) -> str | None:
        """A ground truth: a string, or a non-empty list of aliases (KnowEdit also nests ``[[alias, ...]]``).

        The first alias is the answer; every alias is still checked, so a bad one is never hidden behind a
        good one.
        """
        path = path or key
        value = self.get(obj, key, path, optional)
        if value is _ABSENT:
            return None
        if not isinstance(value, list):
            return self._answer_text(value, path)
        if not value:
            self.fail(path, "expected a string or a non-empty list of strings, got []")
        aliases = []
        for i, item in enumerate(value):
            if isinstance(item, list) and item:
                aliases += [self._answer_text(sub, f"{path}[{i}][{j}]") for j, sub in enumerate(item)]
            else:
                aliases.append(self._answer_text(item, f"{path}[{i}]"))
        return aliases[0]

    def _answer_text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {_describe(value)}")
        return value.strip()

    def template(self, obj: Any, key: str, path: str) -> str:
        """A CounterFact template: the subject goes where its single ``{}`` is (none or two would be ambiguous)."""
        value = self.string(obj, key, path)
        holes = value.count("{}")
        if holes != 1:
            self.fail(path, f"expected a template with '{{}}' exactly once, where the subject goes; "
                            f"got {holes} in {_describe(value)}")
        return value

    def case_id(self, obj: dict, default: int) -> Any:
        """The format's own case id: it becomes part of the record id, so it must be an integer or text."""
        value = self.get(obj, "case_id", "case_id", optional=True)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
            self.expect("case_id", "an integer or a non-empty string", value)
        return value

    def flat_probe(self, obj: dict, prompt_key: str, answer_key: str, kind: str = "completion") -> list[Probe]:
        """An optional (prompt, answer) pair stored as two flat fields; an answer without its prompt would be lost."""
        prompt, answer = self.string(obj, prompt_key, optional=True), self.string(obj, answer_key, optional=True)
        if prompt is None and answer is not None:
            self.fail(prompt_key, f"is missing, but '{answer_key}' is given")
        return [Probe(prompt, answer, kind)] if prompt else []

    def subject_in(self, subject: str, text: str, path: str):
        if subject not in text:
            self.fail(path, f"expected the subject {subject!r} to occur in the prompt {_describe(text)}")


# --------------------------------------------------------------------------- files

def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # skips a byte-order mark (Windows editors write one; json refuses it)
    except UnicodeDecodeError as exc:
        raise DataFormatError(name, f"expected UTF-8 text, got byte {data[exc.start]:#04x} at offset {exc.start}"
                              ) from None


def _json_lines(name: str, text: str, note: str = "") -> list:
    rows = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON keeps raw in strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataFormatError(name, f"invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}{note}"
                                  ) from None
    return rows


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def load_json_list(path: Path, name: str | None = None) -> list:
    """Read a JSON list of records or JSON Lines; a syntax error names the line and column.

    A ``.jsonl`` file is read line by line; so is a file of any other name whose content is plainly JSON
    Lines (its first line is a whole object and more follows), since every format here is a list of records.
    """
    path, name = Path(path), name or str(path)
    text = _read_text(path, name)
    if path.suffix == ".jsonl":
        return _json_lines(name, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_object(text):
            return _json_lines(name, text, " (the file looks like JSON Lines, one record per line, and was read so)")
        raise DataFormatError(name, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        hint = ""
        if isinstance(data, dict) and len([ln for ln in text.split("\n") if ln.strip()]) == 1:
            hint = " (if this is JSON Lines holding one record, name the file .jsonl)"
        raise DataFormatError(name, "expected a JSON list of records at the top level, "
                                    f"got {type(data).__name__}{hint}")
    return data


# --------------------------------------------------------------------------- readers

def _probes(ctx: _Ctx, obj: dict, key: str, kind: str) -> list[Probe]:
    """KnowEdit-style ``{name: [{prompt, ground_truth}]}`` (or one bare list of them) into Probes."""
    groups = ctx.get(obj, key, key, optional=True)
    if groups is _ABSENT:
        return []
    if isinstance(groups, list):
        groups = {"": groups}
    if not isinstance(groups, dict):
        ctx.expect(key, "an object of lists of {prompt, ground_truth}", groups)
    out = []
    for name, items in groups.items():
        gpath = f"{key}.{name}" if name else key
        if not isinstance(items, list):
            ctx.expect(gpath, "a list of {prompt, ground_truth} objects", items)
        for i, item in enumerate(items):
            ipath = f"{gpath}[{i}]"
            out.append(Probe(ctx.string(item, "prompt", f"{ipath}.prompt"),
                             ctx.first_answer(item, "ground_truth", f"{ipath}.ground_truth", optional=True), kind))
    return out


def _gpt4_portability(ctx: _Ctx, raw: dict, kind: str) -> list[Probe]:
    port = ctx.get(raw, "portability", "portability", optional=True)
    if isinstance(port, dict) and "New Question" in port:
        return [Probe(ctx.string(port, "New Question", "portability.New Question"),
                      ctx.string(port, "New Answer", "portability.New Answer"), kind)]
    return _probes(ctx, raw, "portability", kind)


def _rewrite(ctx: _Ctx, rw: dict, path: str) -> tuple[str, str, str, str | None]:
    """A ROME-style rewrite ``{prompt: template, subject, target_new{str}, target_true{str}}``."""
    template = ctx.template(rw, "prompt", f"{path}.prompt")
    subject = ctx.string(rw, "subject", f"{path}.subject")
    target_new = ctx.string(ctx.obj(rw, "target_new", f"{path}.target_new"), "str", f"{path}.target_new.str")
    true_obj = ctx.obj(rw, "target_true", f"{path}.target_true", optional=True)
    target_true = ctx.string(true_obj, "str", f"{path}.target_true.str") if true_obj is not None else None
    return subject, template.replace("{}", subject), target_new, target_true


def read_counterfact_easyedit(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        subject, prompt = ctx.string(raw, "subject"), ctx.string(raw, "prompt")
        ctx.subject_in(subject, prompt, "prompt")
        rephrase = ctx.string(raw, "rephrase_prompt", optional=True)
        out.append(EditRecord(
            id=f"{Path(file).stem}:{ctx.case_id(raw, i)}", subject=subject, prompt=prompt, prompt_kind="completion",
            target_new=ctx.first_answer(raw, "target_new"), target_true=ctx.first_answer(raw, "ground_truth", optional=True),
            paraphrases=[rephrase] if rephrase else [],
            locality=ctx.flat_probe(raw, "locality_prompt", "locality_ground_truth"),
            portability=_gpt4_portability(ctx, raw, "completion"), source=file, index=i))
    return out


def read_counterfact_rome(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        subject, prompt, target_new, target_true = _rewrite(ctx, ctx.obj(raw, "requested_rewrite", "requested_rewrite"),
                                                            "requested_rewrite")
        locality = [Probe(p, target_true) for p in ctx.string_list(raw, "neighborhood_prompts", optional=True)]
        out.append(EditRecord(
            id=f"{Path(file).stem}:{ctx.case_id(raw, i)}", subject=subject, prompt=prompt,
            prompt_kind="completion", target_new=target_new, target_true=target_true,
            paraphrases=ctx.string_list(raw, "paraphrase_prompts", optional=True), locality=locality,
            portability=_gpt4_portability(ctx, raw, "question"), source=file, index=i))
    return out


def _read_zsre(rows: list, file: str, start: int, keys: tuple[str, str, str, str],
               locality: Callable[[_Ctx, dict], list[Probe]],
               portability: Callable[[_Ctx, dict], list[Probe]]) -> list[EditRecord]:
    """The two ZsRE formats hold the same fields under other names (``keys``: rephrase, prompt, target,
    ground truth) and their probes in other shapes. ``locality`` and ``portability`` are readers called in
    turn, not lists read up front, so a record with several bad fields reports the first in field order."""
    rephrase_key, prompt_key, target_key, truth_key = keys
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw)
        rephrase = ctx.string(raw, rephrase_key, optional=True)
        out.append(EditRecord(
            id=f"{Path(file).stem}:{i}", subject=ctx.string(raw, "subject"), prompt=ctx.string(raw, prompt_key),
            prompt_kind="question", target_new=ctx.first_answer(raw, target_key),
            target_true=ctx.first_answer(raw, truth_key, optional=True),
            paraphrases=[rephrase] if rephrase else [], locality=locality(ctx, raw),
            portability=portability(ctx, raw), source=file, index=i))
    return out


def read_zsre_mend(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    return _read_zsre(rows, file, start, ("rephrase", "src", "alt", "answers"),
                      locality=lambda ctx, raw: ctx.flat_probe(raw, "loc", "loc_ans", "question"),
                      portability=lambda ctx, raw: _gpt4_portability(ctx, raw, "question"))


def read_zsre_knowedit(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    return _read_zsre(rows, file, start, ("rephrase_prompt", "prompt", "target_new", "ground_truth"),
                      locality=lambda ctx, raw: _probes(ctx, raw, "locality", "completion"),
                      portability=lambda ctx, raw: _probes(ctx, raw, "portability", "question"))


def _mquake_atoms(ctx: _Ctx, raw: dict) -> list[Atom]:
    """Every requested rewrite of an MQuAKE case, as an atom (its ``question`` is the atom's paraphrase)."""
    rewrites = ctx.get(raw, "requested_rewrite", "requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        ctx.expect("requested_rewrite", "a non-empty list of rewrites", rewrites)
    atoms = []
    for j, rw in enumerate(rewrites):
        p = f"requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            ctx.expect(p, "an object", rw)
        subject, prompt, target_new, target_true = _rewrite(ctx, rw, p)
        question = ctx.string(rw, "question", f"{p}.question", optional=True)
        atoms.append(Atom(prompt, subject, target_new, target_true, [question] if question else []))
    return atoms


def _mquake_multi_hop(ctx: _Ctx, raw: dict) -> list[Probe]:
    """The case's multi-hop questions, answered by ``new_answer`` or one of ``new_answer_alias``."""
    questions = ctx.string_list(raw, "questions", optional=True)
    answer = ctx.string(raw, "new_answer", optional=True)
    if questions and answer is None:
        ctx.fail("new_answer", "is missing, but 'questions' is given (a multi-hop question needs its new answer)")
    aliases = ctx.string_list(raw, "new_answer_alias", optional=True)
    return [Probe(q, answer, "question", list(aliases)) for q in questions]


def _mquake_locality(ctx: _Ctx, raw: dict, atoms: list[Atom]) -> list[Probe]:
    """The original chain's single hops that no rewrite of the case edits (their cloze is no rewrite's
    prompt): facts next to the edit that it must leave alone, judged against the pre-edit answer."""
    hops = ctx.get(raw, "single_hops", "single_hops", optional=True)
    if hops is _ABSENT:
        return []
    if not isinstance(hops, list):
        ctx.expect("single_hops", "a list of {question, cloze, answer} objects", hops)
    edited = {a.prompt for a in atoms}
    out = []
    for k, hop in enumerate(hops):
        cloze = ctx.string(hop, "cloze", f"single_hops[{k}].cloze")
        answer = ctx.string(hop, "answer", f"single_hops[{k}].answer")
        if cloze not in edited:
            out.append(Probe(cloze, answer, "completion"))
    return out


def read_mquake(rows: list, file: str, start: int = 0) -> list[EditRecord]:
    """One record per MQuAKE case (instance): its first rewrite is the record's prompt, the others its
    ``atoms``; the multi-hop ``questions`` (answer ``new_answer`` or an alias) are its ``multi_hop`` probes;
    the unedited hops of the original chain (``single_hops``) are its locality prompts."""
    out = []
    for i, raw in enumerate(rows, start):
        ctx = _Ctx(file, i, raw, "case_id")
        first, *rest = _mquake_atoms(ctx, raw)
        out.append(EditRecord(
            id=f"{Path(file).stem}:{ctx.case_id(raw, i)}", subject=first.subject, prompt=first.prompt,
            prompt_kind="completion", target_new=first.target_new, target_true=first.target_true,
            paraphrases=first.paraphrases, multi_hop=_mquake_multi_hop(ctx, raw),
            locality=_mquake_locality(ctx, raw, [first, *rest]), atoms=rest, source=file, index=i))
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
    rows = load_json_list(path, name)
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
