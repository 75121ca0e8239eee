"""A category tree (e.g. tuxpaint's folder tree `animals/mammals/bovines`) with the object items
at its leaves, so hierarchy analyses can ask how far apart two objects are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from visae.errors import VisaeError

ROOT = ""


@dataclass
class TaxonomyNode:
    """One node: a category (folder) or an item (one object photo / shape) under a category."""

    path: str
    kind: str  # "root" | "category" | "item"
    parent: str | None
    children: list[str] = field(default_factory=list)
    caption: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def depth(self) -> int:
        return 0 if self.path == ROOT else self.path.count("/") + 1


class Taxonomy:
    """Tree of `/`-separated paths. Items are leaves; every prefix of an item path is a category.

    Depth counts path components: the root has depth 0, `animals` 1, `animals/mammals` 2.
    """

    def __init__(self, items: Mapping[str, str | None]):
        """`items` maps an item path (`animals/mammals/bovines/bison`) to its caption."""
        self.nodes: dict[str, TaxonomyNode] = {ROOT: TaxonomyNode(ROOT, "root", None)}
        for item in sorted(items):
            parts = item.split("/")
            if len(parts) < 2 or any(not p for p in parts):
                raise VisaeError(f"taxonomy item {item!r} needs a category: 'category/.../item'")
            parent = ROOT
            for depth in range(1, len(parts)):
                path = "/".join(parts[:depth])
                node = self.nodes.get(path)
                if node is None:
                    self.nodes[path] = TaxonomyNode(path, "category", parent)
                    self.nodes[parent].children.append(path)
                elif node.kind == "item":
                    raise VisaeError(f"taxonomy path {path!r} is both an item and a category")
                parent = path
            if item in self.nodes:
                raise VisaeError(f"taxonomy item {item!r} is also a category")
            self.nodes[item] = TaxonomyNode(item, "item", parent, caption=items[item])
            self.nodes[parent].children.append(item)
        for node in self.nodes.values():
            node.children.sort()

    def __contains__(self, path: object) -> bool:
        return path in self.nodes

    def node(self, path: str) -> TaxonomyNode:
        try:
            return self.nodes[path]
        except KeyError:
            raise VisaeError(f"{path!r} is not in the taxonomy") from None

    def categories(self) -> list[str]:
        """Every category path, parents before children (sorted)."""
        return sorted(p for p, n in self.nodes.items() if n.kind == "category")

    def items(self) -> list[str]:
        return sorted(p for p, n in self.nodes.items() if n.kind == "item")

    def category_of(self, item: str) -> str:
        """The finest category (folder) holding `item`."""
        node = self.node(item)
        if node.kind != "item" or node.parent is None:
            raise VisaeError(f"{item!r} is not an item of the taxonomy")
        return node.parent

    def ancestors(self, path: str, include_self: bool = True) -> list[str]:
        """Category paths from the top level down to `path` (the root excluded)."""
        self.node(path)
        parts = path.split("/")
        stop = len(parts) if include_self else len(parts) - 1
        return ["/".join(parts[:d]) for d in range(1, stop + 1)]

    def depth(self, path: str) -> int:
        return self.node(path).depth

    def lca(self, a: str, b: str) -> str:
        """Deepest common ancestor (a node is its own ancestor); the root `""` if none."""
        self.node(a)
        self.node(b)
        common: list[str] = []
        for x, y in zip(a.split("/"), b.split("/"), strict=False):
            if x != y:
                break
            common.append(x)
        return "/".join(common)

    def lca_depth(self, a: str, b: str) -> int:
        lca = self.lca(a, b)
        return 0 if lca == ROOT else lca.count("/") + 1

    def items_under(self, path: str) -> list[str]:
        self.node(path)
        if self.nodes[path].kind == "item":
            return [path]
        prefix = path + "/" if path else ""
        return [p for p in self.items() if p.startswith(prefix)]

    def counts(self) -> dict[str, int]:
        """Number of items under every category."""
        out = {c: 0 for c in self.categories()}
        for item in self.items():
            for c in self.ancestors(item, include_self=False):
                out[c] += 1
        return out

    def render(self, max_depth: int | None = None) -> str:
        """Indented text tree of categories with item counts (for docs and `visae scenes`)."""
        counts = self.counts()
        lines = []
        for c in self.categories():
            d = self.nodes[c].depth
            if max_depth is None or d <= max_depth:
                lines.append(f"{'  ' * (d - 1)}{self.nodes[c].name}: {counts[c]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"items": {p: self.nodes[p].caption for p in self.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Taxonomy:
        return cls(d["items"])

    @classmethod
    def from_items(cls, items: Iterable[str]) -> Taxonomy:
        return cls({i: None for i in items})
