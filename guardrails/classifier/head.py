"""The classifier head: a small network over sentence embeddings, saved as plain arrays (no pickle),
with its decision threshold and the measurements it was shipped with.

Its first output is `unsafe` (any category), calibrated to the false-positive budget; the others
say which categories a flagged input belongs to. One threshold on one score keeps the budget exact:
fifteen per-category thresholds would each have to spend a fifteenth of it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guardrails.classifier.categories import CATEGORIES, OUTPUTS
from kernel.errors import GuardtuneError

WEIGHTS, CARD = "head.npz", "card.json"
COMMITTED = Path(__file__).resolve().parent / "model"
MEMBER = 0.5  # a flagged input belongs to every category scoring this much (and to its best one)


@dataclass
class Head:
    """Dense layers, ReLU between them, a sigmoid per output at the end."""
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    threshold: float = 0.5  # on `unsafe`
    card: dict = field(default_factory=dict)  # how it was trained and what it measured

    def scores(self, x: np.ndarray) -> np.ndarray:
        """[n, dim] features -> [n, outputs] probabilities (OUTPUTS order)."""
        h = np.asarray(x, dtype=np.float32)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                np.maximum(h, 0, out=h)
        return 1.0 / (1.0 + np.exp(-np.clip(h, -30, 30)))

    def flags(self, row: np.ndarray) -> list[str]:
        """The categories of one input's scores: none unless `unsafe` reaches the threshold."""
        if row[0] < self.threshold:
            return []
        cats = row[1:]
        return [c for c, s in zip(CATEGORIES, cats) if s >= MEMBER] or [CATEGORIES[int(cats.argmax())]]

    def save(self, out: Path) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        write_layers(out / WEIGHTS, self.weights, self.biases)
        card = {**self.card, "outputs": list(OUTPUTS), "threshold": self.threshold}
        (out / CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return card

    @classmethod
    def load(cls, path: Path | None, inputs: int) -> Head:
        """The head at `path` (the committed one for None), over `inputs`-wide features."""
        path = Path(path) if path is not None else COMMITTED
        try:
            card = json.loads((path / CARD).read_text(encoding="utf-8"))
            if tuple(card.get("outputs", ())) != OUTPUTS:
                raise ValueError(f"its outputs are not {', '.join(OUTPUTS)}")
            weights, biases = read_layers(path / WEIGHTS, inputs)
            threshold = float(card["threshold"])
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise GuardtuneError(f"classifier head at {path}: {e}") from None
        return cls(weights, biases, threshold, card)


def write_layers(file: Path, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
    arrays = {f"w{i}": w.astype(np.float32) for i, w in enumerate(weights)}
    arrays |= {f"b{i}": b.astype(np.float32) for i, b in enumerate(biases)}
    np.savez_compressed(file, **arrays)


def read_layers(file: Path, inputs: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The layers in `file`, checked to chain from `inputs` features to OUTPUTS: a head saved for
    another encoder fails here, by name, rather than in the first request."""
    with np.load(file, allow_pickle=False) as z:
        layers = len([k for k in z.files if k.startswith("w")])
        weights, biases = [z[f"w{i}"] for i in range(layers)], [z[f"b{i}"] for i in range(layers)]
    width = inputs
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(f"{file.name}: layer {i} is {w.shape} + {b.shape}, after {width} features")
        width = w.shape[1]
    if width != len(OUTPUTS):
        raise ValueError(f"{file.name}: {width} outputs, not {len(OUTPUTS)}")
    return weights, biases
