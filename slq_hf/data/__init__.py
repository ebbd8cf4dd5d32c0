"""Image+text data: one record type (:class:`Record` of :class:`Item` s) and one table of readers (:data:`READERS`:
jsonl, karpathy, karr, hf). Training, evaluation and ``slq-hf karr-build`` all read through :func:`read_records`, so
a file means the same thing to each of them; in every JSONL form a plain string is a text."""

from .readers import FORMATS, READERS, TEXT_KEYS, detect_format, load_hf, read_records
from .records import DataFormatError, DatasetImage, ImageSource, Item, Record, image_key

__all__ = ["FORMATS", "READERS", "TEXT_KEYS", "DataFormatError", "DatasetImage", "ImageSource", "Item", "Record",
           "detect_format", "image_key", "load_hf", "read_records"]
