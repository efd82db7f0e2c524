"""The approved-script store: a library of approved replies (and stage fallbacks) embedded into FAISS.

Scores are exact cosine similarities: unit vectors in an inner-product flat index, wrapped in an id
map so a hit resolves to its script. The store directory holds the index, a metadata sidecar and a
version; it is written atomically and can be reloaded by a running server.

Library (YAML or JSON):
    version: 3
    scripts:   [{id, stage, intent, text}, ...]      # stage "*" = global, valid in every stage
    fallbacks: {stage: [variant text, ...], "*": [universal fallback, ...]}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernel.configfile import explain, read_mapping
from kernel.encoder import embed
from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_dir

GLOBAL = "*"
STORE_FORMAT = 1


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    stage: str = Field(min_length=1)
    intent: str = ""
    text: str = Field(min_length=1)


class Library(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | int = 1
    scripts: list[Script] = Field(min_length=1)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("scripts")
    @classmethod
    def _unique(cls, scripts):
        seen = set()
        for s in scripts:
            if s.id in seen:
                raise ValueError(f"duplicate script id '{s.id}'")
            seen.add(s.id)
        return scripts

    @field_validator("fallbacks")
    @classmethod
    def _variants(cls, fallbacks):
        for stage, variants in fallbacks.items():
            if not variants or any(not v.strip() for v in variants):
                raise ValueError(f"fallbacks for stage '{stage}' need at least one non-empty variant")
        return fallbacks


def load_library(path: str | Path) -> Library:
    raw = read_mapping(path, "script library")
    try:
        return Library.model_validate(raw)
    except ValidationError as exc:
        raise GuardtuneError(f"script library {path}: {explain(exc.errors()[0], Library.model_fields)}") from None


def build_store(library_path: str | Path, out_dir: str | Path, *, log=print) -> dict:
    import faiss

    lib = load_library(library_path)
    t0 = time.time()
    vectors = embed([s.text for s in lib.scripts])
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(lib.scripts), dtype=np.int64))
    digest = hashlib.sha256(Path(library_path).read_bytes()).hexdigest()[:16]
    meta = {"format": STORE_FORMAT, "library_version": str(lib.version), "library_sha256": digest,
            "built_at": time.time(), "embedding": "all-MiniLM-L6-v2", "dim": int(vectors.shape[1]),
            "scripts": [s.model_dump() for s in lib.scripts], "fallbacks": lib.fallbacks}
    with atomic_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / "scripts.faiss"))
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
    log(f"scripts: {len(lib.scripts)} scripts, {sum(map(len, lib.fallbacks.values()))} fallback variants, "
        f"version {lib.version}, built in {time.time() - t0:.1f} s -> {out_dir}")
    return meta


@dataclass(frozen=True)
class Match:
    script: Script
    score: float


class ScriptStore:
    def __init__(self, index, meta: dict, path: Path):
        self.index, self.meta, self.path = index, meta, path
        self.scripts = [Script(**s) for s in meta["scripts"]]
        self.fallbacks: dict[str, list[str]] = meta["fallbacks"]
        self.version = meta["library_version"]

    @classmethod
    def load(cls, path: str | Path) -> "ScriptStore":
        import faiss

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            index = faiss.read_index(str(path / "scripts.faiss"))
        except (OSError, ValueError, RuntimeError) as exc:
            raise GuardtuneError(f"script store {path}: missing or corrupt ({type(exc).__name__}); "
                                 "rebuild it with `guardtune scripts build`") from None
        if meta.get("format") != STORE_FORMAT or index.ntotal != len(meta.get("scripts", [])):
            raise GuardtuneError(f"script store {path}: metadata does not match the index; rebuild it")
        return cls(index, meta, path)

    def nearest(self, vector: np.ndarray, stage: str | None) -> Match | None:
        """Best script in `stage` or global. Exact search over all, then filter: libraries are small."""
        k = self.index.ntotal
        scores, ids = self.index.search(vector.reshape(1, -1), k)
        for score, i in zip(scores[0], ids[0]):
            if i < 0:
                continue
            s = self.scripts[i]
            if s.stage == GLOBAL or stage is None or s.stage == stage:
                return Match(s, float(score))
        return None

    def fallback(self, stage: str | None, session_id: str | None) -> tuple[str, int, str]:
        """(text, variant number, stage used): sticky per session so variants can be compared."""
        used = stage if stage in self.fallbacks else GLOBAL
        variants = self.fallbacks.get(used)
        if not variants:
            raise GuardtuneError(f"script store {self.path}: no fallback for stage '{stage}' and no universal '*'")
        key = (session_id or "").encode()
        variant = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % len(variants)
        return variants[variant], variant, used
