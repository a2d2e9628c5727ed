"""How a merge rule's parts travel between a site and the server: as ONE vector.

A site's upload for a rule with several parts is one vector whose tensors are named `<part>/<name>` (e.g.
`fisher-num/model.layers.0.mlp.up_proj.weight`), each part formed at weight 1 and multiplied by the rule's
`part_scale(part)` (`site_upload`); the usual `w_i *` of the upload makes it `w_i` times the rule's `site_parts`
(every part is linear in the weight). So a secure run sums all the parts in ONE secure sum (one spending of the
site's budgets), and a plain run sends them in one upload. The server lays the sum out with `upload_shapes` (each
part's shape from the base's: the rule's `part_shape`), and `combine_upload` divides the scales out and calls the
rule's `combine` with the sum of the weights in the sum. A secure sum of parts uses a finer ring (`ring_finer`:
the 64-bit ring in practice), since parts are scaled down to fit the clip.

`weighted-sum` has one part whose names are the vector's own (no prefix): its upload is the vector itself, as in
protocol 1.0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from feddem.common.errors import FeddemError
from feddem.common.merging.rules import WEIGHTED, Vector, rule

SEP = "/"


def rule_of(settings) -> object:
    """The merge rule a run config or site settings names (`merge`; weighted-sum when they name none)."""
    return rule(getattr(settings, "merge", "weighted-sum"))


def plain_rule(merge_rule) -> bool:
    """Whether the rule's upload is the vector itself (weighted-sum)."""
    return merge_rule.parts_names == (WEIGHTED,)


def ring_finer(merge_rule) -> float:
    """How much finer than a vector's the secure sum's ring must be for the rule's parts: a part scaled down by
    `part_scale` keeps the vector's relative precision only on a ring finer by 1 / scale, and statistics spread over
    decades (a Fisher's small entries times d) need 2^8 more; in practice the 64-bit ring (twice the bytes of a
    32-bit masked upload). 1 for weighted-sum."""
    if plain_rule(merge_rule):
        return 1.0
    return 256.0 / min(merge_rule.part_scale(part) for part in merge_rule.parts_names)


def site_upload(merge_rule, vector: Vector, stats: Mapping[str, torch.Tensor] | None) -> Vector:
    """The site's parts at weight 1, each multiplied by the rule's part scale, as one vector (`<part>/<name>`)."""
    if plain_rule(merge_rule):
        return vector
    parts = merge_rule.site_parts(vector, stats, 1.0)
    return {f"{part}{SEP}{name}": t * merge_rule.part_scale(part)
            for part, tensors in parts.items() for name, t in tensors.items()}


def layout(merge_rule, vector_shapes: Mapping[str, tuple], stats_shapes: Mapping[str, tuple]) -> list[str]:
    """The sorted tensor names of a site's upload (`site_upload`), from the shapes of its vector and statistics alone
    (the files' headers): each tensor under every part the rule's `parts_of` sends it to."""
    if plain_rule(merge_rule):
        return sorted(vector_shapes)
    return sorted(f"{part}{SEP}{name}" for name, shape in vector_shapes.items()
                  for part in merge_rule.parts_of(name, tuple(shape), stats_shapes))


def split_name(merge_rule, key: str) -> tuple[str, str]:
    """(part, parameter name) of one tensor name of an upload; a FeddemError for a part the rule does not have."""
    if plain_rule(merge_rule):
        return WEIGHTED, key
    part, sep, name = key.partition(SEP)
    if not sep or part not in merge_rule.parts_names or not name:
        raise FeddemError(f"merge rule {merge_rule.name}: '{key}' is not <part>/<name> with a part in "
                          f"{', '.join(merge_rule.parts_names)}")
    return part, name


def upload_shapes(merge_rule, layout: list[str], base_shapes: Mapping) -> dict[str, tuple]:
    """Each upload tensor's shape, from the base model's shape of its parameter and the rule's `part_shape`."""
    shapes = {}
    for key in layout:
        part, name = split_name(merge_rule, key)
        if name not in base_shapes:
            raise FeddemError(f"the upload names parameter '{name}' ('{key}'), which the base model lacks")
        shapes[key] = merge_rule.part_shape(part, tuple(base_shapes[name]))
    return shapes


def vector_names(merge_rule, layout: list[str]) -> list[str]:
    """The parameter names of the vector an upload layout was formed from (every part's names together)."""
    return sorted({split_name(merge_rule, key)[1] for key in layout})


def split_upload(merge_rule, upload: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """An upload (or a sum of uploads) as the rule's parts, each part's scale divided out."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in merge_rule.parts_names}
    for key, t in upload.items():
        part, name = split_name(merge_rule, key)
        scale = merge_rule.part_scale(part)
        parts[part][name] = t.to(torch.float32) / scale if scale != 1.0 else t
    return parts


def combine_upload(merge_rule, summed: Mapping[str, torch.Tensor], weight_sum: float) -> Vector:
    """The merge from the sum of the sites' uploads (`w_i * site_upload`) and the sum of their weights."""
    if plain_rule(merge_rule):
        return dict(summed)
    return merge_rule.combine(split_upload(merge_rule, summed), float(weight_sum))


def element_count(shapes: Mapping[str, tuple]) -> int:
    return sum(int(torch.Size(shape).numel()) for shape in shapes.values())


def upload_size(merge_rule, layout: list[str], base_shapes: Mapping) -> float:
    """Elements of the upload relative to those of the vector it was formed from (1 for weighted-sum)."""
    vector = element_count({n: tuple(base_shapes[n]) for n in vector_names(merge_rule, layout)})
    return element_count(upload_shapes(merge_rule, layout, base_shapes)) / max(vector, 1)
