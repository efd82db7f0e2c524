"""RAG: embeddings and FAISS indexes of a knowledge base, a library that serving calls."""
