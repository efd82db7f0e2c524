"""Training data: read JSONL conversations, tokenise them with label masks, cache the result."""
