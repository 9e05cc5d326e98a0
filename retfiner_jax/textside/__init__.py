"""The refined model's text side: the API (embeddings, matching, attention maps), zero-shot classification,
retrieval and the attention/Grad-CAM maps."""
