"""The HTTP surface as one router per audience: OpenAI's API (/v1), the admin API (/admin), and the ops
pages and probes. Each route checks its caller, then hands the work to a service."""
