"""Evaluation on labelled recordings (`e2v evaluate`): data set reader, metrics, report.

`read_labelled` is the public reader of labelled sets (manifests or label folders), for
any tool that needs recordings with their labels.
"""

from e2v.client.evaluation.dataset import DatasetError, LabelledItem, LabelledSet, read_labelled

__all__ = ["DatasetError", "LabelledItem", "LabelledSet", "read_labelled"]
