"""Serving: OpenAI-compatible chat on vLLM, one adapter per task.

It reads only what training publishes: adapter directories with a guardtune.json manifest
(kernel.manifest). Nothing here imports training code.
"""
