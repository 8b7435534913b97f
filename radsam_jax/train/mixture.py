"""Joint training on several datasets: a checkpointable iterator that draws each batch from one of
several Grain iterators with given weights.

Batch-level mixing (a whole batch comes from one dataset): every dataset keeps its own pipeline
(its own layout, windowing and caches) and the choice sequence is a pure function of (seed, batch
position), identical on every process, so multi-host runs stay in step and resumes are exact.
The state is JSON bytes holding the position and every sub-iterator's Grain state, so
`grain.checkpoint.CheckpointHandler` saves it beside the model like a single iterator.
"""

import json
from typing import Sequence

import numpy as np


def mixture_probabilities(weights: dict, datasets: Sequence[str]) -> np.ndarray:
    """The sampling probability of each of `weights`' datasets, in sorted name order; ValueError for a
    name `datasets` lacks or weights that are negative or sum to 0 (the training config's check too)."""
    unknown = sorted(set(weights) - set(datasets))
    if unknown:
        raise ValueError(f"data_mixture names {', '.join(map(repr, unknown))}, which datasets does not define "
                         f"(it has {', '.join(map(repr, sorted(datasets))) or 'none'})")
    w = np.asarray([float(weights[n]) for n in sorted(weights)])
    if not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"data_mixture weights must be >= 0 with a positive sum, got {dict(weights)}")
    return w / w.sum()


class MixedIterator:
    def __init__(self, iterators: dict, weights: dict, seed: int):
        if set(iterators) != set(weights):
            raise ValueError(f"mixture weights {sorted(weights)} do not match datasets {sorted(iterators)}")
        self.names: Sequence[str] = sorted(iterators)
        self.iterators = iterators
        self.probs = mixture_probabilities(weights, self.names)
        self.seed = seed
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.position])
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        batch = next(self.iterators[name])  # StopIteration of any dataset ends the epoch loop
        self.position += 1
        return batch

    def get_state(self) -> bytes:
        states = {}
        for n in self.names:
            s = self.iterators[n].get_state()
            states[n] = {"bytes": s.decode()} if isinstance(s, bytes) else {"json": s}
        return json.dumps({"position": self.position, "states": states}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.position = int(state["position"])
        for n in self.names:
            s = state["states"][n]
            self.iterators[n].set_state(s["bytes"].encode() if "bytes" in s else s["json"])

    def start_prefetch(self) -> None:
        for it in self.iterators.values():
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()
