"""Words out of a VLM's answer and the forms a name takes, for scoring what it says."""

from __future__ import annotations


def first_word(answer: str) -> str:
    """The answer's first word, lower case, without punctuation ("Dog." -> "dog")."""
    for raw in answer.split():
        word = "".join(ch for ch in raw if ch.isalnum() or ch in "-'").strip("-'").lower()
        if word:
            return word
    return ""


def word_forms(word: str) -> set[str]:
    """The word and its plural or singular by the regular English rules ("bird" <-> "birds",
    "berry" <-> "berries", "box" <-> "boxes"): what counts as the same name."""
    forms = {word}
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    elif word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        forms.add(word[:-2])
    elif word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
    elif word.endswith("y") and word[-2:-1] not in "aeiou":
        forms.add(word[:-1] + "ies")
    elif word.endswith(("s", "x", "ch", "sh")):
        forms.add(word + "es")
    else:
        forms.add(word + "s")
    return forms
