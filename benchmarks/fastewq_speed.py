"""How fast FastEWQ decides, against the EWQ analysis it stands in for.

After import (and one warm-up call, which loads the shipped classifier), times:

* FastEWQ from config.json alone: features (shape table) + classifier prediction
  for Llama-3.1-8B's 32 blocks and Llama-3.1-405B's 126 blocks;
* FastEWQ from headers: the default model's GGUF header + prediction;
* the baseline: the EWQ analysis of the default model (reads every weight).

Prints medians and the ratio. Then what a user waits for: `ewq plan CONFIG --method
fast` as a fresh process (start-up and loading the classifier included), with the
shipped classifier (numpy arrays, predicted by ewq) against the same two forests
stored as skops and loaded through scikit-learn (the path before), three runs each.

    .venv/bin/python benchmarks/fastewq_speed.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    cli_runs(configs["meta-llama/Meta-Llama-3.1-8B-Instruct"])


def cli_runs(cfg: dict) -> None:
    import skops.io as sio

    from ewq.fast.classify import VARIANTS, study
    from ewq.fast.dataset import read_dataset

    root = Path(__file__).parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        # the shipped forests again, as the skops file an older ewq wrote
        st = study(read_dataset(root / "results" / "fastewq" / "dataset.csv"))
        shipped = load_model()
        meta = {k: v for k, v in shipped.items() if k not in VARIANTS}
        old = Path(tmp) / "fastewq.skops"
        sio.dump(meta | {v: st.variants[v] for v in VARIANTS}, old)
        rows = features_from_config(cfg, "llama").rows()
        same = all(
            predict(load_model(old), v, rows) == predict(shipped, v, rows)
            for v in VARIANTS
        )
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(cfg))
        ewq = str(Path(sys.executable).parent / "ewq")
        times = {}
        for label, classifier in (("arrays", None), ("skops", old)):
            argv = [ewq, "plan", str(config), "--memory", "14GiB", "--method", "fast"]
            if classifier is not None:
                argv += ["--classifier", str(classifier)]
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                runs.append(time.perf_counter() - t)
            times[label] = statistics.median(runs)
        print(
            "ewq plan --method fast, fresh process (median of 3): "
            f"{times['arrays']:.2f} s with the shipped arrays, {times['skops']:.2f} s "
            f"through scikit-learn and skops ({times['skops'] / times['arrays']:.1f}x); "
            f"same decisions: {same}"
        )


if __name__ == "__main__":
    main()
