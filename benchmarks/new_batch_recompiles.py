"""How many graphs the fastest mode compiles at a new batch size: batch 1, then batch 4, in one process.

    PYTHONPATH=src python benchmarks/new_batch_recompiles.py static none CACHE_DIR    # SpeedOptions() as shipped
    PYTHONPATH=src python benchmarks/new_batch_recompiles.py dynamic 1 CACHE_DIR      # dynamic=True, decode_batch=1

The built-in model on the CPU (fp32, 64², 2 steps: the graphs' count does not depend on the size), Dynamo's count of
graphs it compiled during each call (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``) and the call's time.
"""

import argparse
import time

from torch._dynamo.utils import counters

from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.speed import SpeedOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", choices=("static", "dynamic"), help="SpeedOptions.dynamic False or True")
    ap.add_argument("decode_batch", help="SpeedOptions.decode_batch: 'none' or a number")
    ap.add_argument("cache_dir", help="the compile cache folder")
    args = ap.parse_args()
    dynamic = args.shapes == "dynamic"
    chunk = None if args.decode_batch == "none" else int(args.decode_batch)
    speed = SpeedOptions(compile=True, dynamic=dynamic, decode_batch=chunk, cache_dir=args.cache_dir)
    pipe = load_pipeline("default", device="cpu", dtype="fp32", speed=speed)
    for b in (1, 4):
        before = counters["stats"]["unique_graphs"]
        p = GenerationParams(prompt="a red circle above a blue square", steps=2, width=64, height=64, seed=1,
                             batch_size=b)
        t = time.time()
        pipe.txt2img(p)
        print(f"dynamic={dynamic} decode_batch={chunk} batch {b}: {time.time() - t:.1f} s, "
              f"{counters['stats']['unique_graphs'] - before} graphs compiled", flush=True)


if __name__ == "__main__":
    main()
