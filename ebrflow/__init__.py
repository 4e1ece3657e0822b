"""ebrflow: streaming, incremental training of embedding-based retrieval (Kafka → SSMTL model → Milvus)."""

__version__ = "0.1.0"
