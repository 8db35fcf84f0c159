"""The registry of trained stages (``mcis_dist.train.runner.STAGES``), filled in one place."""

from __future__ import annotations

from mcis_dist.train.runner import STAGES, Stage


def _register() -> None:
    from mcis_dist.affinity import train as affinity
    from mcis_dist.seg import train as seg
    from mcis_dist.train.classifier import check_classifier, classifier_stage, run_url

    STAGES["cls"] = Stage("cls", lambda cfg: cfg.train, run_url, classifier_stage,
                          check_classifier, terms=("single", "coattention", "contrastive"),
                          label="train-cls")  # fmt: skip
    STAGES["affinity"] = Stage("affinity", lambda cfg: cfg.affinity.train, affinity.run_url,
                               affinity.affinity_stage, affinity.check_affinity,
                               terms=("bg_pos", "fg_pos", "neg"))  # fmt: skip
    STAGES["seg"] = Stage("seg", lambda cfg: cfg.seg.train, seg.run_url, seg.seg_stage,
                          seg.check_seg, terms=("ce",))  # fmt: skip


_register()
