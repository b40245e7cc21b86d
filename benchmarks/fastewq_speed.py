"""How fast FastEWQ decides, against the EWQ analysis it stands in for.

After import (and one warm-up call, which loads the shipped classifier), times:

* FastEWQ from config.json alone: features (shape table) + classifier prediction
  for Llama-3.1-8B's 32 blocks and Llama-3.1-405B's 126 blocks;
* FastEWQ from headers: the default model's GGUF header + prediction;
* the baseline: the EWQ analysis of the default model (reads every weight).

Prints medians and the ratio.

    .venv/bin/python benchmarks/fastewq_speed.py
"""

from __future__ import annotations

import statistics
import time

from ewq import api
from ewq.fast.classify import load_model, predict
from ewq.fast.dataset import paper_configs
from ewq.fast.features import features_from_config
from ewq.types import Precision


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    configs = paper_configs()
    doc = load_model()
    for name in (
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-405B-Instruct",
    ):
        cfg = configs[name]

        def decide(cfg=cfg, name=name):
            feats = features_from_config(cfg, name)
            return predict(doc, "fast", feats.rows())

        decide()
        ms = median_ms(decide, 50)
        n = len(decide())
        print(f"FastEWQ from config, {name} ({n} blocks): {ms:.2f} ms")

    def from_headers():
        feats = api.features("default")
        return api.fast_decision(feats, "fast", Precision.Q8)

    from_headers()
    fast_ms = median_ms(from_headers, 20)
    api.analyze("default")
    ewq_ms = median_ms(lambda: api.analyze("default"), 3)
    print(f"FastEWQ from the default model's GGUF header: {fast_ms:.2f} ms")
    print(f"EWQ analysis of the default model (every weight): {ewq_ms:.0f} ms")
    print(f"EWQ / FastEWQ time: {ewq_ms / fast_ms:.0f}x")


if __name__ == "__main__":
    main()
