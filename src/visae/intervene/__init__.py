"""Interventions: edit SAE latents inside a model's forward pass and read what changes in a
downstream head (`visae.heads`)."""

from visae.intervene.apply import MODES, Editor, MaxActivations, check_pair, intervene
from visae.intervene.edits import (
    OPS,
    Edit,
    Region,
    load_mask,
    parse_edit,
    parse_region,
    region_from_mask,
)

__all__ = [
    "MODES",
    "OPS",
    "Edit",
    "Editor",
    "MaxActivations",
    "Region",
    "check_pair",
    "intervene",
    "load_mask",
    "parse_edit",
    "parse_region",
    "region_from_mask",
]
