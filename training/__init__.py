"""Training: a base chat model plus a dataset in, an adapter directory with its guardtune.json out."""
