"""The OpenAI-compatible HTTP door: /v1/chat/completions, /v1/models, /v1/embeddings."""
