"""Load benchmark of ``megedit serve``: MeG against the plain LM through the same server, in one run.

    python bench/serve.py --run runs/smollm2-counterfact-1024 [--clients 1 8 32 128] [--requests 32]
        [--out bench/results/serve.json]

For each mode (MeG, then the same run with ``--plain``: no router, no neuron) it starts ``megedit serve``
on a free localhost port, warms it up, then for each concurrency level c sends max(--requests, c)
requests from c concurrent clients (asyncio + httpx; a client sends its next request when its last one
is answered). The queries are a fixed mix of the run's edit prompts and paraphrases (the router should
route them) and locality prompts (it should not), one third each, each through the endpoint of its kind
(question: chat completions, completion: completions). Reports per mode and level: QPS, p50/p95
latency, failed requests, the mean batch the server formed and the share routed per group; prints a
table and writes JSON with the machine's core count and load and the exact command. Exits 1 if any
request failed. The clients run on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from megedit.artifacts import atomic_write_json, git_commit
from megedit.defaults import DEFAULT_STEPS
from megedit.prepare.artifact import load_prepared
from megedit.serve.process import ServerProcess

GROUPS = ("edit", "paraphrase", "locality")


@dataclass(frozen=True)
class BenchQuery:
    group: str  # edit / paraphrase (should be routed) / locality (should not)
    text: str
    kind: str  # question / completion: the endpoint and template it goes through


@dataclass
class Outcome:
    query: BenchQuery
    seconds: float
    status: int | str  # HTTP status, or the exception's name when no response came
    routed: bool | None = None
    batch_size: int | None = None


def bench_queries(run: Path, n: int, seed: int) -> list[BenchQuery]:
    """n queries cycling edit prompt, paraphrase, locality prompt over the run's edits in a seeded order."""
    edits = load_prepared(run / "prepare").edits
    order = list(range(len(edits)))
    random.Random(seed).shuffle(order)
    out = []
    for k in range(n):
        e = edits[order[(k // len(GROUPS)) % len(order)]]
        group = GROUPS[k % len(GROUPS)]
        if group == "edit" or (group == "paraphrase" and not e.paraphrases):
            out.append(BenchQuery("edit", e.prompt, e.prompt_kind))
        elif group == "paraphrase":
            out.append(BenchQuery(group, e.paraphrases[0], e.prompt_kind))
        elif e.locality:
            out.append(BenchQuery(group, e.locality[0].prompt, e.locality[0].kind))
        else:
            out.append(BenchQuery("edit", e.prompt, e.prompt_kind))
    return out


def request_for(query: BenchQuery, max_tokens: int) -> tuple[str, dict]:
    if query.kind == "question":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": query.text}], "max_tokens": max_tokens}
    return "/v1/completions", {"prompt": query.text, "max_tokens": max_tokens}


async def ask(client: httpx.AsyncClient, query: BenchQuery, max_tokens: int) -> Outcome:
    path, body = request_for(query, max_tokens)
    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return Outcome(query, time.perf_counter() - t0, type(exc).__name__)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return Outcome(query, seconds, r.status_code)
    reply = r.json()
    return Outcome(query, seconds, 200, reply["choices"][0]["megedit"]["routed"], reply["megedit"]["batch_size"])


async def drive(url: str, queries: list[BenchQuery], clients: int, max_tokens: int) -> tuple[list[Outcome], float]:
    """All queries from ``clients`` concurrent clients, each sending its next when its last is answered."""
    pending = list(reversed(queries))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def one_client():
            while pending:
                outcomes.append(await ask(client, pending.pop(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return outcomes, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarise(outcomes: list[Outcome], wall: float, clients: int) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.seconds for o in ok]
    routed = {g: [o.routed for o in ok if o.query.group == g] for g in GROUPS}
    return {"clients": clients, "requests": len(outcomes), "failed": len(outcomes) - len(ok),
            "failures": dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
            "wall_s": round(wall, 3), "qps": round(len(ok) / wall, 3),
            "latency_s": {"p50": _round(percentile(latencies, 50)), "p95": _round(percentile(latencies, 95)),
                          "max": _round(max(latencies, default=None))},
            "mean_batch_size": _round(statistics.fmean([o.batch_size for o in ok]) if ok else None, 2),
            "routed_percent": {g: round(100.0 * sum(v) / len(v), 1) if v else None for g, v in routed.items()}}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def bench_mode(args, plain: bool, queries: list[BenchQuery]) -> dict:
    server_args = ["--steps", str(args.steps), "--max-batch", str(args.max_batch), "--batch-window-ms",
                   str(args.batch_window_ms), "--log-level", "warning", *(["--plain"] if plain else [])]
    if args.torch_threads:
        server_args += ["--torch-threads", str(args.torch_threads)]
    name = "plain" if plain else "meg"
    t0 = time.perf_counter()
    with ServerProcess(args.run, server_args) as server:
        startup = time.perf_counter() - t0
        print(f"[{name}] serving on {server.url} after {startup:.1f} s", flush=True)
        asyncio.run(drive(server.url, queries[: args.warmup], 1, args.max_tokens))  # first-call costs
        levels = []
        for clients in args.clients:
            n = max(args.requests, clients)
            outcomes, wall = asyncio.run(drive(server.url, queries[:n], clients, args.max_tokens))
            levels.append(summarise(outcomes, wall, clients))
            row = levels[-1]
            print(f"[{name}] {clients:>4} clients: {row['qps']:.2f} req/s, p50 {row['latency_s']['p50']} s, "
                  f"p95 {row['latency_s']['p95']} s, {row['failed']} failed", flush=True)
        batching = httpx.get(server.url + "/health", timeout=30).json()["batching"]
    return {"mode": name, "server_command": shlex.join(server.command), "startup_s": round(startup, 1),
            "server_batching": batching, "levels": levels}


def table(modes: dict) -> str:
    lines = ["| clients | mode | requests | failed | QPS | p50 s | p95 s | mean batch | routed % edit / para / loc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, clients in enumerate(row["clients"] for row in modes["meg"]["levels"]):
        for name, mode in modes.items():
            r = mode["levels"][i]
            routed = " / ".join("-" if r["routed_percent"][g] is None else f"{r['routed_percent'][g]:.0f}"
                                for g in GROUPS)
            lines.append(f"| {clients} | {name} | {r['requests']} | {r['failed']} | {r['qps']:.2f} | "
                         f"{r['latency_s']['p50']} | {r['latency_s']['p95']} | {r['mean_batch_size']} | {routed} |")
    return "\n".join(lines)




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least one per client)")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests before the levels, per mode")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of the MeG server (its default)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None, help="the server's torch threads (default torch's)")
    p.add_argument("--seed", type=int, default=0, help="order of the edits the queries are drawn from")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = p.parse_args(argv)

    queries = bench_queries(args.run, max(args.requests, max(args.clients), args.warmup), args.seed)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    modes = {"meg": bench_mode(args, plain=False, queries=queries),
             "plain": bench_mode(args, plain=True, queries=queries)}
    failed = sum(r["failed"] for m in modes.values() for r in m["levels"])
    result = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/serve.py", *argv]),
        "commit": git_commit(short=False), "run": str(args.run), "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "settings": {"clients": args.clients, "requests_per_level": [max(args.requests, c) for c in args.clients],
                     "max_tokens": args.max_tokens, "ddim_steps": args.steps, "max_batch": args.max_batch,
                     "batch_window_ms": args.batch_window_ms, "queries": "edit prompt, paraphrase, locality prompt "
                     "in turn over the run's edits (seeded order)", "seed": args.seed},
        "failed_requests": failed,
        "modes": modes,
        "meg_qps_over_plain": [round(m["qps"] / pl["qps"], 3) if pl["qps"] else None
                               for m, pl in zip(modes["meg"]["levels"], modes["plain"]["levels"])],
    }
    atomic_write_json(args.out, result)
    print(table(modes))
    print(f"MeG QPS / plain QPS per level: {result['meg_qps_over_plain']}; failed requests: {failed}")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
