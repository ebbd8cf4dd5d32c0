"""The slq_hf release, kept inside ``slq_hf/modeling`` so the code copied into every checkpoint knows it too.

``slq_hf.__version__`` reads this constant; the configuration stamps it into config.json and compares it on load.
"""

SLQ_HF_VERSION = "0.1.0"
