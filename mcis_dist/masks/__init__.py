"""Per-pixel labels from CAMs: AffinityNet's confident labels and the pseudo masks.

* :mod:`mcis_dist.formats.labels` -- the label shard format ``mcis-labels/1`` (read and write);
* :mod:`mcis_dist.masks.modes` -- one image's label map in each mode (confident, random_walk,
  saliency, cams): plain numpy / PyTorch;
* :mod:`mcis_dist.masks.stage` -- ``make_labels`` / ``make_masks``: whole splits on Ray actors,
  resumable;
* :mod:`mcis_dist.masks.evaluate` -- ``evaluate_masks``: mIoU against the split's masks.
"""
