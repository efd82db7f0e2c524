"""GET /v1/models: the base (when it is served), every task and the embedding models, in OpenAI's model-list shape."""

from __future__ import annotations

from serving.state import ServerState


def model_list(state: ServerState) -> dict:
    cfg, now = state.cfg, int(state.started_at)
    data = [{"id": cfg.base_model, "object": "model", "created": now, "owned_by": "guardtune", "kind": "base"}
            ] if state.serves_base() else []
    # No filesystem paths here: /admin/tasks shows them to the admin.
    data += [{"id": t, "object": "model", "created": now, "owned_by": "guardtune", "kind": "task",
              "parent": cfg.base_model, **{k: v for k, v in s.summary().items() if k != "path"}}
             for t, s in state.registry.tasks.items()]
    data += [{"id": m, "object": "model", "created": now, "owned_by": "guardtune", "kind": "embedding"}
             for m in cfg.embedding_models()]  # /v1/embeddings
    return {"object": "list", "data": data}
