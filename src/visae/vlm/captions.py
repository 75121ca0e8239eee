"""Captions and one-word answers for the concept scenes, from their exact labels: the text side
of the projector's training pairs (LLaVA stage 1 captions; the instruction stage's one-word
answer to "What is shown in this image? Use exactly one word!").

An object is named by its stamp's own English caption ("A crowned crane." -> "a crowned
crane"), or, for a shape without one, by its item name ("shapes/round/circle-2" -> "a circle").
The background is named by its kind: "in front of a photo", "on a <texture> pattern",
"on a plain background". Objects are listed in drawing order: "a frog and a crow on a dots
pattern". The one-word answer names the kind of the largest visible object ("bird" for a crow):
with ~40 kinds instead of ~300 items, a 554k-parameter projector trained for minutes can learn it.
"""

from __future__ import annotations

import re
from typing import Any

from visae.data.scene_dataset import SceneDataset

_TRAILING_NUMBER = re.compile(r"[-_]?[a-z]?\d+[a-z]?$")
_LEADING_NUMBER = re.compile(r"^\d+[-_ ]*")
_NOT_PLURAL = {"christmas", "clothes", "people", "series", "species"}
_CLAUSE_END = re.compile(r"[.!?,;:(—–]| - ")


def object_phrase(item: str, caption: str | None) -> str:
    """`a <name>` for one object: its stamp caption's first clause when it names the object
    ("A dumper. It carries..." -> "a dumper"), else its item name ("circle-2" -> "a circle")."""
    text = _CLAUSE_END.split(caption or "", maxsplit=1)[0].strip().strip("\"'“”")
    first, _, rest = text.partition(" ")
    if first.lower() in ("a", "an", "the") and rest and len(rest.split()) <= 4:
        return f"{first.lower()} {rest.lower()}"
    text = (
        _LEADING_NUMBER.sub("", _TRAILING_NUMBER.sub("", item.rsplit("/", 1)[-1]))
        .replace("_", " ")
        .replace("-", " ")
    )
    text = text.lower().strip()
    article = "an" if text[:1] in "aeiou" else "a"
    return f"{article} {text}"


def background_phrase(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "photo":
        return "in front of a photo"
    if kind == "texture":
        return f"on a {str(spec.get('texture', 'textured')).replace('_', ' ')} pattern"
    return "on a plain background"


def _join(phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_caption(scenes: SceneDataset, image: int) -> str:
    """The caption of one scene image (module docstring)."""
    record = scenes.records[image]
    phrases = [
        object_phrase(o["item"], scenes.taxonomy.node(o["item"]).caption) for o in record["objects"]
    ]
    return f"{_join(phrases)} {background_phrase(record['spec']['background'])}"


def category_word(item: str) -> str:
    """One word for an object's kind: its second taxonomy level, or its first for a shallow
    item, in the singular ("animals/birds/crow" -> "bird", "plants/thyme" -> "plant")."""
    parts = item.split("/")
    level = parts[1] if len(parts) >= 3 else parts[0]
    word = level.lower().replace("_", " ").replace("-", " ").split()[-1]
    if word in _NOT_PLURAL:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def largest_object(scenes: SceneDataset, image: int) -> dict[str, Any] | None:
    """The largest visible object of an image (ties: the earlier one), or None."""
    objects = scenes.records[image]["objects"]
    if not objects:
        return None
    return objects[max(range(len(objects)), key=lambda j: (objects[j]["area"], -j))]


def one_word_answer(scenes: SceneDataset, image: int) -> str:
    """The kind of the largest visible object (`category_word`), "background" without one."""
    obj = largest_object(scenes, image)
    return "background" if obj is None else category_word(obj["item"])
