"""Where the CPU goes under a closed loop at concurrency 16: the API process, the engine's processes, the client.

From the repository root (the run's LLM path forced on with fusion weight 1):

    python -m benchmarks.cpu_split '[["aiohttp", 3000, 45]]'        # [client, deadline_ms, seconds] per level
    PROBE_ENV='{"DPO4REC_ENGINE_SLOTS": "4"}' python -m benchmarks.cpu_split   # service settings to try

Starts the service on ``runs/small`` (``PROBE_RUN`` to change), runs each level and prints one JSON line:
answers, LLM-scored, shed, timeouts, CPU seconds of every process of the service (from ``/proc``) and of
this client, and the engine's idle share, mean rate and pending tokens sampled from ``/metrics``.
A diagnostic next to ``benchmarks/service_bench.py`` (which measures what users feel), not a replacement.
"""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.service_bench import UserStream
from benchmarks.support import Server, cpu_between, cpu_ticks, free_port, steal_between, tree_cpu


async def level(kind, base, payloads, conc, secs):
    import aiohttp
    import httpx

    n = {"n": 0, "scored": 0, "shed": 0}
    it = iter(payloads)
    t0 = time.perf_counter()
    if kind == "httpx":
        client = httpx.AsyncClient(
            base_url=base, limits=httpx.Limits(max_connections=40, max_keepalive_connections=40), trust_env=False
        )

        async def post(p):
            r = await client.post("/rerank", json=p, timeout=10)
            return r.json()
    else:
        client = aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=40))

        async def post(p):
            async with client.post("/rerank", json=p) as r:
                return await r.json()

    async def worker():
        for p in it:
            if time.perf_counter() - t0 > secs:
                return
            b = await post(p)
            n["n"] += 1
            d = b.get("degraded", [])
            if not any(x.startswith("llm_") for x in d):
                n["scored"] += 1
            if "llm_shed" in d:
                n["shed"] += 1
            if "llm_timeout" in d:
                n["timeout"] = n.get("timeout", 0) + 1

    samples = []

    async def sampler():
        import aiohttp

        async with aiohttp.ClientSession(base) as sess:
            while time.perf_counter() - t0 < secs:
                async with sess.get("/metrics") as r:
                    txt = await r.text()
                row = {}
                for line in txt.splitlines():
                    for g in (
                        "dpo4rec_engine_pending_tokens",
                        "dpo4rec_engine_token_rate",
                        "dpo4rec_engine_unfinished_requests",
                    ):
                        if line.startswith(g + " "):
                            row[g.split("_", 2)[2]] = float(line.split()[1])
                samples.append(row)
                await asyncio.sleep(0.25)

    st = asyncio.create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(conc)))
    await st
    import statistics as S

    if samples:
        n["idle_frac"] = round(sum(1 for r in samples if r.get("unfinished_requests", 0) == 0) / len(samples), 3)
        n["rate_mean"] = round(S.fmean(r.get("token_rate", 0) for r in samples))
        n["rate_min"] = round(min(r.get("token_rate", 0) for r in samples))
        n["pending_mean"] = round(S.fmean(r.get("pending_tokens", 0) for r in samples))
    wall = time.perf_counter() - t0
    if kind == "httpx":
        await client.aclose()
    else:
        await client.close()
    return n, wall


_servers: list[Server] = []  # started, to stop whatever happens


async def main():
    run = Path(os.environ.get("PROBE_RUN", "runs/small"))
    env = {"DPO4REC_FUSION_WEIGHT": "1", **json.loads(os.environ.get("PROBE_ENV", "{}"))}
    server = Server(
        run, free_port(), Path(os.environ.get("PROBE_LOG", "benchmarks/results/cpu_split.server.log")), env=env
    )
    server.start()
    _servers.append(server)
    import httpx

    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as c:
        await server.wait_ready(c, 600)
    stream = UserStream(run)

    def pl(deadline):
        u, h = stream.next()
        body = {"user_id": u, "top_n": 10, "explain": True, "deadline_ms": deadline}
        return body | ({"history": h} if h else {})

    plan = (
        json.loads(sys.argv[1])
        if len(sys.argv) > 1
        else [["httpx", 3000, 10], ["httpx", 30, 20], ["aiohttp", 30, 20], ["httpx", 3000, 30], ["aiohttp", 3000, 30]]
    )
    for kind, deadline, secs in plan:
        before = tree_cpu(server.proc.pid)
        mine = time.process_time()
        ticks = cpu_ticks()
        n, wall = await level(kind, server.base_url, [pl(deadline) for _ in range(5000)], 16, secs)
        procs = cpu_between(before, tree_cpu(server.proc.pid))
        mine = time.process_time() - mine
        row = dict(
            kind=kind,
            deadline=deadline,
            wall=round(wall, 1),
            **n,
            rps=round(n["n"] / wall, 1),
            scored_rps=round(n["scored"] / wall, 2),
            client_cpu=round(mine, 2),
            procs=procs,
            client_ms_per_req=round(mine / max(n["n"], 1) * 1000, 2),
            api_ms_per_req=round(procs.get("root", 0.0) / max(n["n"], 1) * 1000, 2),
            steal=round(steal_between(ticks, cpu_ticks()) or 0.0, 3),
        )
        print(json.dumps(row), flush=True)


async def run_and_stop() -> None:
    try:
        await main()
    finally:
        for server in list(_servers):
            server.stop()


if __name__ == "__main__":
    asyncio.run(run_and_stop())
