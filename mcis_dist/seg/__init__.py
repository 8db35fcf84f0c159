"""Segmentation stage: DeepLab trained on the pseudo masks, evaluated, exported and applied.

* :mod:`mcis_dist.seg.infer` -- ``predict_scores`` / ``predict_labels`` for one image
  (multi-scale × flip, optional dense CRF).
* :mod:`mcis_dist.seg.export` -- TorchScript and ONNX export, each checked against PyTorch.
* :mod:`mcis_dist.seg.train`, :mod:`mcis_dist.seg.evaluate`, :mod:`mcis_dist.seg.predict` --
  ``mcis seg``, ``mcis eval seg`` and ``mcis predict``.

The networks themselves live in :mod:`mcis_dist.models.deeplab`.
"""
