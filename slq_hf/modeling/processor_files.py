"""Whether an SLQ folder holds a copy of the backbone's processor, and what it writes when it does not.

The processor files are the bulk of a folder (Qwen3-VL's tokenizer: about 11 MB of 12; the queries of a 2B model:
328 KB). When the backbone is a Hub id pinned to a revision, the processor at that revision can always be fetched
again, so it is not copied: ``from_pretrained`` loads it from the backbone and applies the saved budgets to it, and
sentence-transformers is pointed at the backbone's processor (``tokenizer_name_or_path`` + ``processor_kwargs`` with
the revision and the budgeted image size). A local-path backbone keeps the copy, since the path may not exist on
another machine; ``bundle_processor=True`` keeps it for offline use anyway.

Ships inside every checkpoint (remote code): standard library only (the processor itself is passed in).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .budgets import image_rule
from .sentence_transformers_files import SENTENCE_BERT_CONFIG_NAME, read_json, write_json


def bundles_processor(backbone_name_or_path: str | None, backbone_revision: str | None,
                      bundle_processor: bool | None = None) -> bool:
    """True when the processor is copied into the folder: asked for, or the backbone is not a pinned Hub id."""
    if bundle_processor is not None:
        if not isinstance(bundle_processor, bool):
            raise ValueError(f"bundle_processor={bundle_processor!r} is invalid; expected True, False or None "
                             "(automatic: copy unless the backbone is a Hub id pinned to a revision).")
        return bundle_processor
    if not backbone_name_or_path or not backbone_revision:
        return True
    return Path(backbone_name_or_path).expanduser().exists() or os.path.isabs(backbone_name_or_path)


def save_processor(processor: Any, out: Path, config: Any, bundle_processor: bool | None = None) -> None:
    """Write the processor into ``out`` or, for an unbundled folder, point sentence-transformers at the backbone's
    processor (call after the sentence-transformers files are written)."""
    if processor is None:
        return
    file = Path(out) / SENTENCE_BERT_CONFIG_NAME
    settings = read_json(file) or {}
    if bundles_processor(config.backbone_name_or_path, config.backbone_revision, bundle_processor):
        processor.save_pretrained(out)
        # A re-save of an unbundled folder carried its pointer to the backbone's processor over: the copy wins now.
        for key in ("tokenizer_name_or_path", "processor_kwargs"):
            settings.pop(key, None)
    else:
        kwargs: dict[str, Any] = {"revision": config.backbone_revision}
        if image_rule(processor) is not None:  # the budgeted size, so sentence-transformers sizes images like encode
            kwargs["size"] = {k: int(v) for k, v in dict(processor.image_processor.size).items() if v is not None}
        settings.update({"tokenizer_name_or_path": config.backbone_name_or_path, "processor_kwargs": kwargs})
    write_json(settings, file)
