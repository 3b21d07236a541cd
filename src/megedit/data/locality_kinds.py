"""What a locality prompt is, relative to its edit: unrelated, another fact about the edited subject,
or a restatement of the edited fact itself.

KnowEdit's ZsRE locality prompts are all "relation specificity" prompts about the edit's subject
("The taxon rank of Epaspidoceras is" beside the edit "Which family does Epaspidoceras belong
to?"). In 40 of ZsRE-1024's 225 such edits the "other" relation is the edited one: "The
constellation of 32 Pegasi is" beside "What constellation is 32 Pegasi in?", with the edit's
original answer as its expected answer. An edit that generalises must change those; they are
paraphrases, not locality, and reports count them apart.
"""

from __future__ import annotations

from megedit.data.records import EditRecord, Probe

LOCALITY_KINDS = ("other", "same_subject", "restates_edit")


def mentions_subject(subject: str, prompt: str) -> bool:
    """Whether a locality prompt asks about the edit's own subject (KnowEdit's relation specificity)."""
    return bool(subject) and subject.lower() in prompt.lower()


def normalise(text: str | None) -> str:
    """Lower case, single spaces: what an uncased encoder cannot tell apart is one text."""
    return " ".join((text or "").lower().split())


def restates_edit(edit: EditRecord, probe: Probe) -> bool:
    """A locality prompt about the edit's subject whose expected answer is the edit's original answer:
    it asks the edited fact again."""
    return (mentions_subject(edit.subject, probe.prompt) and bool(normalise(edit.target_true))
            and normalise(probe.answer) == normalise(edit.target_true))


def locality_kind(edit: EditRecord, probe: Probe) -> str:
    """``restates_edit`` | ``same_subject`` (another fact about the edited subject) | ``other``."""
    if restates_edit(edit, probe):
        return "restates_edit"
    return "same_subject" if mentions_subject(edit.subject, probe.prompt) else "other"
