"""Serving: OpenAI-compatible chat on vLLM, one adapter per task (issue #3).

It reads only what training publishes: adapter directories with a guardtune.json manifest
(kernel.manifest). Nothing here imports training code.
"""
