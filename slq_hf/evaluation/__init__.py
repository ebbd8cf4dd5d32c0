"""Retrieval evaluation for SLQ (and any other embedding model): metrics, dataset readers, reports.

Typical use::

    from slq_hf.evaluation import load_retrieval_dataset, evaluate_retrieval, format_results_table

    data = load_retrieval_dataset("dataset_flickr30k.json", split="test", image_root="flickr30k-images")
    result = evaluate_retrieval(model, data, batch_size=32, cache_dir=".slq_cache", gap_plot="gap.png")
    print(format_results_table(result))        # result["metrics"]["t2i"]["R@1"] is a fraction
    # rerank_top_k=10: also recall after reranking the top 10 with the model's own backbone (result["rerank"])

Only torch and PIL are needed at import; matplotlib (plot) and datasets (``hf`` reader) are imported on use.
"""

from .data import (
    FORMATS,
    ComposedQuery,
    DataFormatError,
    DatasetImage,
    RetrievalDataset,
    detect_format,
    load_retrieval_dataset,
    read_hf,
    read_jsonl,
    read_karpathy,
    read_karr,
)
from .encoding import encode_inputs, inputs_fingerprint, model_fingerprint, model_settings
from .evaluate import encode_dataset, evaluate_embeddings, evaluate_retrieval
from .metrics import (
    DEFAULT_KS,
    composed_retrieval_metrics,
    cosine_similarity_matrix,
    duplicate_positives,
    image_text_retrieval_metrics,
    modality_gap,
    normalize_caption,
    ranks_from_similarity,
    recall_from_ranks,
    retrieval_metrics,
)
from .report import format_comparison_table, format_results_table, pca_2d, plot_modality_gap, save_results_json
from .reranking import rerank_retrieval_metrics, rerank_similarity

__all__ = [
    "DEFAULT_KS",
    "FORMATS",
    "ComposedQuery",
    "DataFormatError",
    "DatasetImage",
    "RetrievalDataset",
    "composed_retrieval_metrics",
    "cosine_similarity_matrix",
    "detect_format",
    "duplicate_positives",
    "encode_dataset",
    "encode_inputs",
    "evaluate_embeddings",
    "evaluate_retrieval",
    "format_comparison_table",
    "format_results_table",
    "image_text_retrieval_metrics",
    "inputs_fingerprint",
    "load_retrieval_dataset",
    "modality_gap",
    "model_fingerprint",
    "model_settings",
    "normalize_caption",
    "pca_2d",
    "plot_modality_gap",
    "ranks_from_similarity",
    "read_hf",
    "read_jsonl",
    "read_karpathy",
    "read_karr",
    "recall_from_ranks",
    "rerank_retrieval_metrics",
    "rerank_similarity",
    "retrieval_metrics",
    "save_results_json",
]
