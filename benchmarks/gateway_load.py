"""Load on the gateway over loopback: N simulated researchers, each sending one
single-prompt trace after another for a fixed time, with and without cross-user
batching. Prints throughput and p50/p99 latency, and checks what batching must not
change: every prompt's answer (top-5 ids and logits) and its charge equal the one-by-one
run's, and the ledger balances. Bounded in users, time and requests.

    python -m benchmarks.gateway_load                     # smollm2-135m, 16 users, 20 s
    python -m benchmarks.gateway_load --model tiny-llama --users 8 --seconds 10

Every request goes the whole way a researcher's does: authentication, validation with
the tier's limits, a hold in the SQLite ledger, (merged) run with the tier's limits, the
hold settled as a charge.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("TPMLAB_HOME", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".tpmlab-home"))

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Japan is",
           "Water boils at a temperature of", "The largest planet in the solar system is"]


def plan_blobs(lab_model):
    from tpmlab.ir.codec import encode_plan

    blobs = []
    for p in PROMPTS:
        tr = lab_model.trace(p)
        with tr.recording():
            lab_model.output.logits[:, -1].topk(5).save()
        blobs.append(encode_plan(tr.plan()))
    return blobs


def run_load(url, keys, blobs, model, seconds, max_requests):
    import httpx

    from tpmlab.ir.codec import decode_result

    latencies, batch_sizes, errors = [], [], []
    answers: dict[int, tuple] = {}  # prompt index -> (top-5 values, indices), units
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def user(i):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[i]}"},
                          timeout=120) as c:
            k = 0
            while time.monotonic() < stop_at and len(latencies) < max_requests:
                t = time.perf_counter()
                r = c.post(f"/v1/models/{model}/run", content=blobs[(i + k) % len(blobs)])
                dt = time.perf_counter() - t
                j = (i + k) % len(blobs)
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        batch_sizes.append(int(r.headers["x-tpmlab-batch-size"]))
                        if j not in answers:
                            values, meta = decode_result(r.content)
                            answers[j] = (next(iter(values.values())),
                                          float(r.headers["x-tpmlab-units"]))
                    else:
                        errors.append(r.status_code)
                k += 1

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(keys)) as pool:
        list(pool.map(user, range(len(keys))))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    return {"requests": len(latencies), "errors": len(errors), "seconds": wall,
            "throughput": len(latencies) / wall, "p50": statistics.median(latencies),
            "p99": q[98], "mean_batch": statistics.mean(batch_sizes), "answers": answers}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--window-ms", type=float, default=10.0)
    args = ap.parse_args()

    import torch

    import tpmlab
    from tpmlab.gateway.app import create_app
    from tpmlab.gateway.core import Gateway, GatewayConfig
    from tpmlab.gateway.ledger import Ledger
    from tpmlab.gateway.server import ServerThread
    from tpmlab.runtime.backend import LocalBackend

    backend = LocalBackend(device="cpu", dtype=torch.float32)
    tmp = tempfile.mkdtemp(prefix="tpmlab-gw-load-")
    results = {}
    cost = None
    audits = {}
    for mode in ("one by one", "batched"):
        ledger = Ledger(f"sqlite:///{tmp}/{mode.replace(' ', '_')}.db")
        keys = []
        for i in range(args.users):
            ledger.create_user(f"r{i}", "query", units=1e9)
            keys.append(ledger.create_key(f"r{i}"))
        cfg = GatewayConfig(models=[args.model], batching=mode == "batched",
                            batch_window=args.window_ms / 1000, max_concurrent_per_user=4,
                            cost_models={args.model: cost} if cost else {})
        gw = Gateway(backend, ledger, cfg)
        cost = gw.models[args.model].cost
        with ServerThread(create_app(gw)) as srv:
            lab = tpmlab.connect(gateway=srv.url, token=keys[0])
            blobs = plan_blobs(lab.model(args.model))
            run_load(srv.url, keys[:2], blobs, args.model, 2.0, 50)  # warm-up
            results[mode] = run_load(srv.url, keys, blobs, args.model, args.seconds,
                                     args.max_requests)
            lab.close()
        audits[mode] = ledger.audit()
        ledger.close()
    print(f"model {args.model}, {args.users} concurrent researchers, {args.seconds:g} s each, "
          f"torch threads {torch.get_num_threads()}, cost model {cost}")
    print(f"{'mode':<12} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    for mode, r in results.items():
        print(f"{mode:<12} {r['requests']:>8} {r['throughput']:>8.2f} {r['p50'] * 1e3:>8.1f} "
              f"{r['p99'] * 1e3:>8.1f} {r['mean_batch']:>6.1f}  errors={r['errors']}")
    speedup = results["batched"]["throughput"] / results["one by one"]["throughput"]
    print(f"throughput, batched / one by one: {speedup:.1f}x")
    alone, together = results["one by one"]["answers"], results["batched"]["answers"]
    same, charged = [], []
    for j in sorted(set(alone) & set(together)):
        (va, ua), (vt, ut) = alone[j], together[j]
        same.append(torch.equal(va.indices, vt.indices)
                    and torch.allclose(va.values, vt.values, atol=1e-4, rtol=1e-4))
        charged.append((ua, ut))
    print(f"answers equal to one by one: {sum(same)}/{len(same)} prompts; charges "
          + ", ".join(f"{ua:.3f}/{ut:.3f}" for ua, ut in charged)
          + " SU (one by one / batched: forward by the cost model, plus each plan's own "
          "measured nodes)")
    print(f"ledger audit: {audits}")


if __name__ == "__main__":
    main()
