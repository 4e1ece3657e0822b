"""Publishing embeddings to Milvus and reading them back: collections, upserts, mirror and query client."""
