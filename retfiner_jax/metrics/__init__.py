"""Measures shared by validation, retrieval, the probe's companions and the demo: ranking (recall@k) and the
spread of embeddings. Pure numpy; imports nothing else of the project."""
