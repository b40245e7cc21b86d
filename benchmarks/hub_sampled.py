"""A sampled error pass over a hub GGUF, read through the range mirror, against the
same pass over the local file, in one run: seconds, range requests and bytes the
(local test) hub served, for two merge gaps of the mirror (4 KiB, the gap before
this change, and the default).

    .venv/bin/python benchmarks/hub_sampled.py [--fraction 0.01]

The hub is tests/hubserver.py on 127.0.0.1: its latency is a fraction of a
millisecond, a real hub's 50-100 ms, so the request counts say more than the
seconds about a real download. Run alone (2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--requests", type=int, help="requests in flight (ewq's default)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ewq-hub-bench-"))
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    import huggingface_hub.constants as hc
    from hubserver import FakeHub

    import ewq.sources.hub as hub
    from ewq import api
    from ewq.sampling import Sampling
    from ewq.sources import default_model_path, ranged

    repo = tmp / "repo"
    repo.mkdir()
    os.symlink(default_model_path(), repo / default_model_path().name)
    sample = Sampling(fraction=args.fraction)
    if args.requests:
        ranged.REQUESTS = args.requests
    requests = [0]
    plain = hub._range

    def counted(*a, **k):
        requests[0] += 1
        return plain(*a, **k)

    hub._range = counted

    def run(source: str, name: str) -> float:
        # a cache of its own: nothing measured or fetched before is reused
        os.environ["EWQ_CACHE"] = str(tmp / f"cache-{name}")
        hc.HF_HUB_CACHE = str(tmp / f"hub-{name}")
        started = time.perf_counter()
        api.sensitivity(source, "error", sample=sample)
        return time.perf_counter() - started

    size = (repo / default_model_path().name).stat().st_size
    with FakeHub({"bench/model": repo}) as server:
        os.environ["HF_ENDPOINT"] = server.url
        run("default", "warm")  # ggml's quantizer grids, once per process
        local = run("default", "local")
        print(f"local file: {local:.1f} s ({size / 1e6:.1f} MB)")
        for gap in (1 << 12, ranged._GAP):
            ranged._GAP, saved = gap, ranged._GAP
            server.sent.clear()
            requests[0] = 0
            try:
                seconds = run("bench/model", f"gap{gap}")
            finally:
                ranged._GAP = saved
            served = sum(server.sent.values())
            print(
                f"hub, gap {gap // 1024} KiB: {seconds:.1f} s ({seconds / local:.2f}x "
                f"local), {requests[0]:,} requests, {served / 1e6:.1f} of "
                f"{size / 1e6:.1f} MB served ({served / size:.0%})"
            )


if __name__ == "__main__":
    main()
