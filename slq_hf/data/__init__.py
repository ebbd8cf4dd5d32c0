"""Image+text data: one record type (:class:`Record` of :class:`Item` s) and one table of readers.

``read_records(path, format)`` reads ``jsonl``, ``karpathy``, ``karr`` or ``hf`` data (:data:`READERS`); training
(``slq_hf.training.load_training_data``), evaluation (``slq_hf.evaluation.load_retrieval_dataset``) and
``slq-hf karr-build`` all read through it, so a file means the same thing to each of them. In every JSONL form a
plain string is a text.
"""

from .readers import FORMATS, READERS, TEXT_KEYS, detect_format, load_hf, read_records
from .records import DataFormatError, DatasetImage, ImageSource, Item, Record, image_key

__all__ = [
    "FORMATS",
    "READERS",
    "TEXT_KEYS",
    "DataFormatError",
    "DatasetImage",
    "ImageSource",
    "Item",
    "Record",
    "detect_format",
    "image_key",
    "load_hf",
    "read_records",
]
