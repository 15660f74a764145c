"""FEMNIST-sized LEAF loading and FedAvg speed (issue 12's measurements).

Writes a synthetic LEAF FEMNIST tree in LEAF's own format (``train/`` and ``test/`` JSON files
of 100 writers each, ``{"users", "num_samples", "user_data"}``, 28x28 pixels as multiples of
1/255 with a white background as LEAF writes them), then, each in a fresh process:

* the first load (JSON -> memory-mapped cache), time and peak resident memory;
* ``--loads`` later loads (the cache), time and peak resident memory, and the time to read 100
  clients' data;
* ``--versions`` versions of FedAvg with 100 writers per version (sequential in-process
  backend, LEAF's CNN, one local epoch, batch 10, lr 0.06), seconds per version.

Targets (issue 12): later loads under 5 s and under 1 GB resident for the whole tree. Full
size is ``--writers 3500 --images 800000`` (about 4 GB of JSON); the default is a tenth.

    python benchmarks/leaf_load.py --out /tmp/leaf-bench --writers 3500 --images 800000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_FILE = 100
TEST_SHARE = 0.1


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def generate(root: Path, writers: int, images: int, seed: int) -> dict[str, float]:
    """LEAF-format JSON for ``writers`` writers and about ``images`` images in all."""
    gen = np.random.default_rng(seed)
    # FEMNIST's writers hold 20-400 images each (median ~230): lognormal, scaled to the total.
    raw = gen.lognormal(0.0, 0.35, writers)
    counts = np.maximum(2, np.round(raw / raw.sum() * images)).astype(int)
    table = np.array([repr(v / 255) if v < 255 else "1.0" for v in range(256)])
    start = time.perf_counter()
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for f in range(0, writers, PER_FILE):
        blobs: dict[str, list[str]] = {"train": [], "test": []}
        users = {"train": [], "test": []}  # type: dict[str, list[str]]
        sizes = {"train": [], "test": []}  # type: dict[str, list[int]]
        for w in range(f, min(f + PER_FILE, writers)):
            user = f"f{w:04d}_{w % 97:02d}"
            n = int(counts[w])
            n_test = max(1, round(n * TEST_SHARE))
            # Ink on a white page: most pixels 255, a random stroke band darker.
            pixels = np.full((n, 784), 255, dtype=np.uint8)
            ink = gen.random((n, 784)) < 0.15
            pixels[ink] = gen.integers(0, 255, int(ink.sum()), dtype=np.uint8)
            labels = gen.integers(0, 62, n)
            text = table[pixels]
            for split, rows in (("train", slice(0, n - n_test)), ("test", slice(n - n_test, n))):
                xs = ",".join("[" + ",".join(r) + "]" for r in text[rows].tolist())
                ys = ",".join(str(int(v)) for v in labels[rows])
                blobs[split].append(f'"{user}": {{"x": [{xs}], "y": [{ys}]}}')
                users[split].append(user)
                sizes[split].append(len(labels[rows]))
        for split in ("train", "test"):
            body = (
                f'{{"users": {json.dumps(users[split])}, '
                f'"num_samples": {json.dumps(sizes[split])}, '
                f'"user_data": {{{", ".join(blobs[split])}}}}}'
            )
            name = f"all_data_{f // PER_FILE}_niid_0_keep_0_{split}_9.json"
            (root / split / name).write_text(body)
    size = sum(p.stat().st_size for p in root.rglob("*.json"))
    return {
        "seconds": time.perf_counter() - start,
        "json_gb": size / 1e9,
        "images": int(counts.sum()),
        "writers": writers,
    }


def load(data_dir: str, writers: int) -> dict[str, float]:
    """One load in this process: time, peak RSS, and the time to read 100 clients."""
    import torch  # noqa: F401 - imported first, so its memory is in the baseline

    from fedlab.data import make_workload

    base = _peak_mb()
    start = time.perf_counter()
    w = make_workload("femnist", num_clients=writers, seed=0, data_dir=data_dir)
    seconds = time.perf_counter() - start
    loaded_peak = _peak_mb()
    start = time.perf_counter()
    examples = sum(len(w.client_data(k)) for k in range(0, writers, max(1, writers // 100)))
    read = time.perf_counter() - start
    return {
        "converted": bool(w.data.converted),  # type: ignore[attr-defined]
        "load_seconds": seconds,
        "peak_rss_mb_after_imports": base,
        "peak_rss_mb_after_load": loaded_peak,
        "read_100_clients_seconds": read,
        "examples_read": examples,
        "peak_rss_mb_after_reading": _peak_mb(),
    }


def fedavg(data_dir: str, writers: int, versions: int) -> dict[str, float]:
    """Seconds per version of FedAvg, 100 writers per version, sequential backend."""
    from fedlab.config import RunConfig
    from fedlab.run import build_engine

    config = RunConfig(
        workload="femnist",
        data_dir=data_dir,
        clients=writers,
        fraction=min(1.0, 100 / writers),
        rounds=versions,
        local_epochs=1.0,
        batch_size=10,
        lr=0.06,
        cache_mb=0,
    )
    engine = build_engine(config)  # no evaluator: the loop and the clients only
    start = time.perf_counter()
    engine.run(versions)
    wall = time.perf_counter() - start
    return {"versions": versions, "seconds_per_version": wall / versions}


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/fedlab-leaf-bench", help="where the tree goes")
    parser.add_argument("--writers", type=int, default=350)
    parser.add_argument("--images", type=int, default=80_000)
    parser.add_argument("--loads", type=int, default=3, help="later loads to time")
    parser.add_argument("--versions", type=int, default=2, help="FedAvg versions (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the tree afterwards")
    parser.add_argument("--phase", choices=["load", "fedavg"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "load":
        print(json.dumps(load(args.out, args.writers)))
        return
    if args.phase == "fedavg":
        print(json.dumps(fedavg(args.out, args.writers, args.versions)))
        return
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    report: dict[str, object] = {"generate": generate(root, args.writers, args.images, 0)}
    common = ["--out", str(root), "--writers", str(args.writers)]
    report["first_load"] = _child(*common, "--phase", "load")
    report["later_loads"] = [_child(*common, "--phase", "load") for _ in range(args.loads)]
    cache = sum(p.stat().st_size for p in (root / ".fedlab-cache").rglob("*") if p.is_file())
    report["cache_gb"] = cache / 1e9
    if args.versions:
        report["fedavg"] = _child(*common, "--versions", str(args.versions), "--phase", "fedavg")
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
