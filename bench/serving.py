"""The served champion over HTTP vs the same pyfunc called in-process, one image per request.

Server: `mlflow models serve -m models:/<name>@champion --env-manager local` on 127.0.0.1 (a free port), as
README shows it; `--clients` threads each post single-image `dataframe_split` requests on a kept-alive
connection for `--seconds`. In-process: `mlflow.pyfunc.load_model` of the same version, one image per
`predict` call, from `--clients` threads (the same concurrency), then from one, `--seconds` each. Images: rps
photos as files, base64 (decoding is part of every arm). Overhead per image = served seconds per image
(1 / requests per second) over in-process seconds per image at the same concurrency.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import common


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def concurrently(work: Any, count: int, seconds: float) -> float:
    """`count` threads run work(index, deadline) until `seconds` from now; returns the wall seconds taken."""
    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i, start + seconds)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def in_process(model: Any, images: list[bytes], seconds: float, threads: int) -> dict[str, Any]:
    """`threads` callers of the loaded pyfunc, one image per predict call, for `seconds`."""
    import pandas as pd

    frames = [pd.DataFrame({"image": [base64.b64encode(b).decode("ascii")]}) for b in images]
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(offset: int, deadline: float) -> None:
        n = offset
        while time.perf_counter() < deadline:
            begin = time.perf_counter()
            model.predict(frames[n % len(frames)])
            with lock:
                latencies.append(time.perf_counter() - begin)
            n += threads

    wall = concurrently(caller, threads, seconds)
    return {"threads": threads, "requests": len(latencies), "wall_seconds": round(wall, 2),
            "images_per_second": round(len(latencies) / wall, 2), **percentiles(latencies)}


def served(port: int, images: list[bytes], seconds: float, clients: int) -> dict[str, Any]:
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode("ascii")]]}})
              for b in images]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(offset: int, deadline: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = offset
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            connection.request("POST", "/invocations", bodies[n % len(bodies)], {"Content-Type": "application/json"})
            answer = connection.getresponse()
            body = answer.read()
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if answer.status != 200 or json.loads(body)["predictions"][0]["error"]:
                    errors.append(body.decode()[:200])
            n += clients
        connection.close()

    warm = threading.Thread(target=client, args=(0, time.perf_counter() + 2))  # first requests trace the graph
    warm.start()
    warm.join()
    latencies.clear()
    wall = concurrently(client, clients, seconds)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_seconds": round(wall, 2),
            "requests_per_second": round(len(latencies) / wall, 2), **percentiles(latencies)}


def wait_up(port: int, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow models serve exited with {server.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {seconds} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registered", default="image-classifier-rps", help="registered model whose champion is served")
    parser.add_argument("--photos", type=Path, default=common.RPS, help="a folder of .jpg photos to send")
    parser.add_argument("--images", type=int, default=20, help="distinct photos cycled through")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each arm")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    from pipeline import tracking

    store = tracking.tracking_uri(common.params())
    uri = f"models:/{args.registered}@champion"
    images = [p.read_bytes() for p in common.spread_photos(args.photos, args.images)]
    port = common.free_port()
    env = {**common.venv_env(), "MLFLOW_TRACKING_URI": store}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        wait_up(port, server)
        startup = time.perf_counter() - started
        over_http = served(port, images, args.seconds, args.clients)
    finally:
        server.terminate()
        server.wait(timeout=60)
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(store)
    version = mlflow.MlflowClient().get_model_version_by_alias(args.registered, "champion")
    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"image": [base64.b64encode(images[0]).decode("ascii")]}))  # warm-up: tracing
    same_concurrency = in_process(model, images, args.seconds, args.clients)
    sequential = in_process(model, images, args.seconds, 1)
    common.write_result("serving", {
        "model": {"uri": uri, "version": version.version, "name": version.tags.get("model")},
        "photos": {"folder": str(args.photos), "distinct": len(images), "mean_bytes": round(statistics.fmean(map(len, images)))},
        "server_startup_seconds": round(startup, 2),
        "served": over_http,
        "in_process": same_concurrency,
        "in_process_sequential": sequential,
        # Seconds per image served over those in-process at the same concurrency: what HTTP, JSON and base64 add.
        "overhead_ratio_per_image": round(same_concurrency["images_per_second"] / over_http["requests_per_second"], 3),
        "latency_ratio_p50": round(over_http["p50_ms"] / same_concurrency["p50_ms"], 3),
    })


if __name__ == "__main__":
    main()
