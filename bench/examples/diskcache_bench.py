"""The peer of the disk backend's benchmark (bench/examples/bench.rs, section 8): Python's diskcache,
the engine seed 003 moved to, on the same ~200-byte JSON value, in a directory the benchmark
gives. Sets of distinct keys with a TTL, then gets of them, one process, one thread, as that
team measured. Prints one JSON line. Needs `pip install diskcache`.

    python3 bench/examples/diskcache_bench.py DIR KEYS
"""

import json
import sys
import time

import diskcache

QUOTE = {
    "symbol": "D0",
    "exchange": "XNAS",
    "currency": "USD",
    "bid": 150.24,
    "ask": 150.26,
    "last": 150.25,
    "volume": 48213377,
    "open_interest": 1204551,
    "timestamp_ms": 1763769600000,
    "source": "consolidated-feed-primary-a",
}


def main():
    directory, keys = sys.argv[1], int(sys.argv[2])
    cache = diskcache.Cache(directory)
    values = [json.dumps(dict(QUOTE, symbol=f"D{i}")) for i in range(keys)]
    started = time.perf_counter()
    for i in range(keys):
        cache.set(f"market:quote:D{i}", values[i], expire=600)
    sets = keys / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(keys):
        raw = cache.get(f"market:quote:D{i}")
        assert json.loads(raw)["symbol"] == f"D{i}"
    gets = keys / (time.perf_counter() - started)
    print(json.dumps({"set_per_s": round(sets), "get_per_s": round(gets)}))


if __name__ == "__main__":
    main()
