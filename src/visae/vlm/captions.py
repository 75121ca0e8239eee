"""Captions and one-word answers for the concept scenes, from their exact labels: the text side
of the projector's training pairs (LLaVA stage 1 captions; the instruction stage's one-word
answer to "What is shown in this image? Use exactly one word!").

An object is named by its stamp's own English caption ("A crowned crane." -> "a crowned
crane"), or, for a shape without one, by its item name ("shapes/round/circle-2" -> "a circle").
The background is named by its kind: "in front of a photo", "on a <texture> pattern",
"on a plain background". Objects are listed in drawing order: "a frog and a crow on a dots
pattern". The one-word answer is the last word of the largest visible object's name.
"""

from __future__ import annotations

import re
from typing import Any

from visae.data.scene_dataset import SceneDataset

_TRAILING_NUMBER = re.compile(r"[-_]?[a-z]?\d+[a-z]?$")
_LEADING_NUMBER = re.compile(r"^\d+[-_ ]*")
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


def one_word_answer(scenes: SceneDataset, image: int) -> str:
    """The last word of the largest visible object's name (ties: the earlier object)."""
    objects = scenes.records[image]["objects"]
    if not objects:
        return "background"
    largest = max(range(len(objects)), key=lambda j: (objects[j]["area"], -j))
    obj = objects[largest]
    return object_phrase(obj["item"], scenes.taxonomy.node(obj["item"]).caption).split()[-1]
