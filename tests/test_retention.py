"""`client.retention`: pruning a run's vector takes what lies beside it (its merge statistics, the base's evaluation
of that run) and the run's folder, and keeps the guard's record of it."""

import os

import torch

from feddem.client import ledger
from feddem.client.retention import prune
from feddem.common.site_context import BASE_EVAL_NAME, STATS_NAME, SiteContext
from feddem.common.vector_io import save_vector


def _run(site: SiteContext, run_id: int, mtime: float, beside: bool) -> None:
    path = site.vector_path(run_id)
    path.parent.mkdir(parents=True)
    save_vector({"w": torch.full((4,), float(run_id))}, path)
    if beside:
        save_vector({"w": torch.ones(4)}, site.stats_path(run_id))
        path.with_name(BASE_EVAL_NAME).write_text("{}")
    os.utime(path, (mtime, mtime))


def test_prune_removes_a_runs_statistics_and_base_evaluation_with_its_vector(tmp_path):
    site = SiteContext(0, "site-0", tmp_path / "site-0")
    _run(site, 1, 1_000, beside=True)  # the older run: pruned
    _run(site, 2, 2_000, beside=True)  # the newest: kept with what lies beside it
    old_bytes = sum(p.stat().st_size for p in site.vector_path(1).parent.iterdir())
    result = prune(site, keep=1)
    assert result.deleted == [site.vector_path(1)] and result.freed == old_bytes
    assert not site.vector_path(1).parent.exists()  # nothing of run 1 is left, so neither is its folder
    assert site.stats_path(2).is_file() and site.vector_path(2).with_name(BASE_EVAL_NAME).is_file()
    assert [e["event"] for e in ledger.entries(site)][-1] == "pruned"
    assert STATS_NAME == site.stats_path(2).name
