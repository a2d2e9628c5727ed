"""The site's side of the merge rules (`common.merging`): its statistics, and the upload its rule declares.

After training, when the run's merge rule needs statistics (`fisher`: the diagonal Fisher, `regmean`: the input
Gram matrices), `compute_statistics` forms them on the site's own train data with its fine-tuned DENSE model (a
LoRA model with its adapters merged in), on the first `merge-examples` rows of its train blocks, and stores them
beside the vector (`merge-stats.safetensors`, whose metadata names the rule, its parameters and the number of
examples used). That file is the site's declaration of the rule for this vector: every upload of it is then exactly
the rule's parts (`upload_layout`, `upload_vector`), and the privacy guard refuses a request for any other layout
(a subset of the parts, or the bare vector of a weighted sum), so the server learns only the sums the rule names.
No file: the vector was trained for a weighted sum, and its upload is the vector.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from feddem.common.errors import FeddemError
from feddem.common.site_context import SiteContext, vector_file
from feddem.common.stored_tensors import float32_arrays, read_header

log = logging.getLogger("feddem.site")



def stats_path(site: SiteContext, run_id: int) -> Path:
    return site.stats_path(run_id)


def compute_statistics(cfg, site: SiteContext, model, train_data, names: list[str], run_id: int, device) -> dict:
    """The rule's statistics of the trained `model` (a PeftModel is merged into its dense weights, in place) on the
    first `cfg.merge_examples` rows of the site's train data (all of them when it has fewer), stored beside the
    vector with that count in their metadata; returns what the site's result reports of them
    (`merge_stats_seconds`, `merge_stats_examples`; nothing for weighted-sum, whose stale statistics of an earlier
    try of this run are removed)."""
    import time

    from feddem.common.merging.parts import rule_of
    from feddem.common.vector_io import save_vector

    merge_rule, path = rule_of(cfg), stats_path(site, run_id)
    path.unlink(missing_ok=True)
    if merge_rule.statistics is None:
        return {}
    started = time.perf_counter()
    if hasattr(model, "merge_and_unload"):  # LoRA: the dense weights the vector changes
        model = model.merge_and_unload()
    examples = min(cfg.merge_examples, len(train_data))  # as `common.merging.statistics` takes the rows
    stats = merge_rule.compute_statistics(model, train_data, names, cfg.merge_examples, device)
    save_vector(stats, path, metadata={"rule": merge_rule.name, "parameters": json.dumps(merge_rule.parameters()),
                                       "examples": str(examples)})
    seconds = time.perf_counter() - started
    log.info("%s: %s statistics of %d tensor(s) on %d example(s) in %.1f s", site.name, merge_rule.statistics,
             len(stats), examples, seconds)
    return {"merge_stats_seconds": seconds, "merge_stats_examples": examples}


def declared_rule(site: SiteContext, run_id: int):
    """The merge rule this site's vector of the run was trained for (with the parameters stored then)."""
    from feddem.common.merging.rules import rule

    vector_file(site, run_id)  # an error when there is no vector
    path = stats_path(site, run_id)
    if not path.is_file():
        return rule("weighted-sum")
    meta = read_header(path)[2]
    try:
        return rule(str(meta["rule"]), **json.loads(meta.get("parameters", "{}")))
    except (KeyError, TypeError, ValueError) as exc:
        raise FeddemError(f"{site.name}: the merge statistics of run {run_id} ({path}) name no valid rule: "
                          f"{exc}") from None


def check_declared(site: SiteContext, run_id: int, merge: str):
    """The declared rule, after checking that the server's settings name the same one."""
    from feddem.client.guard import GuardRefusal

    declared = declared_rule(site, run_id)
    if declared.name != merge:
        raise GuardRefusal(site.name, f"the server asks for a '{merge}' upload, but this site's vector of run "
                                      f"{run_id} was trained for the '{declared.name}' merge rule: it sends only "
                                      f"that rule's parts")
    return declared


def upload_layout(site: SiteContext, run_id: int) -> list[str]:
    """The sorted tensor names of the declared rule's upload (for weighted-sum, the vector's names), read from the
    files' headers, not their data."""
    from feddem.common.merging.parts import layout

    merge_rule = declared_rule(site, run_id)
    header = read_header(vector_file(site, run_id))[0]
    shapes = {name: tuple(spec["shape"]) for name, spec in header.items()}
    if merge_rule.statistics is None:
        return layout(merge_rule, shapes, {})
    stats = {key: tuple(spec["shape"]) for key, spec in read_header(stats_path(site, run_id))[0].items()}
    return layout(merge_rule, shapes, stats)


def upload_vector(site: SiteContext, run_id: int, lazy_numpy: bool = False):
    """The declared rule's upload at weight 1 (`common.merging.parts.site_upload`): for weighted-sum the stored
    vector itself (numpy arrays read on access with `lazy_numpy`, else a lazy torch vector), else the parts formed
    in memory from the vector and the statistics."""
    merge_rule = declared_rule(site, run_id)
    if merge_rule.statistics is None:
        if lazy_numpy:
            return float32_arrays(vector_file(site, run_id))
        from feddem.common.site_context import stored_vector

        return stored_vector(site, run_id)
    from feddem.common.merging.parts import site_upload
    from feddem.common.vector_io import load_vector

    vector = {name: t.float() for name, t in load_vector(vector_file(site, run_id)).items()}
    stats = dict(load_vector(stats_path(site, run_id)).items())
    upload = site_upload(merge_rule, vector, stats)
    if sorted(upload) != upload_layout(site, run_id):
        raise FeddemError(f"{site.name}: the {merge_rule.name} parts of run {run_id} do not match their layout")
    return {name: t.contiguous() for name, t in upload.items()}
