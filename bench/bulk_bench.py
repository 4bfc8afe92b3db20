"""Bulk migrate against independent safe migrates, in one run (docs/performance.md).

Ten organizations of 50 endpoints each are migrated by one ``POST /v1/webhooks/migrate`` per
organization (``max_concurrency`` 50: every child may run at once, so what is measured is the
cost of the bulk machinery, not its throttle), next to 500 independent
``POST /v1/webhooks/{id}/migrate`` of one organization's 500 endpoints, on the same `rotator
api`, the same worker (prefork, two processes) and the same receiver, which accepts every test
delivery. Each phase is timed from its first request to its last migration finished; the
phases alternate (independent, bulk, independent, bulk, …) and the ratio is bulk over the mean
of the independent phases around it. **Goal: bulk ≤ 1.2× the independent migrates.**

    python -m bench.bulk_bench [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    HOST,
    BenchError,
    find_bin,
    free_port,
    vacuum_analyze,
)
from bench.migrate_bench import (
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    Org,
    Proc,
    _raise_on_sigterm,
    create_endpoints,
    create_org,
    prepare,
    run_migrations,
    start_receiver,
)

GOAL_RATIO = 1.2
ORGS, PER_ORG = 10, 50


def start_bulks(port: int, orgs: Sequence[Org]) -> list[str]:
    """One bulk migrate per organization, all at once; their operation ids."""

    def post(org: Org) -> str:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            body = json.dumps({"max_concurrency": 50, "endpoint_ids": org.endpoint_ids})
            headers = {"Authorization": f"Bearer {org.api_key}", "Content-Type": "application/json"}
            conn.request("POST", "/v1/webhooks/migrate", body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.status != 202:
            raise BenchError(f"bulk migrate answered {response.status}: {raw[:300]!r}")
        return str(json.loads(raw)["id"])

    with ThreadPoolExecutor(len(orgs)) as pool:
        return list(pool.map(post, orgs))


def run_bulk(port: int, orgs: list[Org], pg: object, timeout: float, checks: list[Proc]) -> float:
    """Seconds from the first request to the last child finished; every child must succeed."""
    t0 = time.time()
    parents = start_bulks(port, orgs)
    deadline = time.monotonic() + timeout
    while True:
        row = pg.execute(  # type: ignore[attr-defined]
            "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL), count(*),"
            " max(finished_at) FROM operations WHERE id = ANY(%s::uuid[])",
            (parents,),
        ).fetchone()
        if row[0] == len(parents):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{row[0]} of {len(parents)} bulk migrates finished in {timeout}s")
        for proc in checks:
            proc.check()
        time.sleep(0.05)
    states = pg.execute(  # type: ignore[attr-defined]
        "SELECT state, count(*), max(finished_at) FROM operations"
        " WHERE parent_id = ANY(%s::uuid[]) GROUP BY state",
        (parents,),
    ).fetchall()
    counts = {str(state): int(count) for state, count, _ in states}
    if counts != {"succeeded": sum(len(org.endpoint_ids) for org in orgs)}:
        raise BenchError(f"children did not all succeed: {counts}")
    last = max(row[2] for row in states).timestamp()
    return last - t0


def next_sources(pg: object, org: Org) -> Org:
    """The organization's live endpoints (the next round migrates what this one created)."""
    rows = pg.execute(  # type: ignore[attr-defined]
        "SELECT id FROM webhook_endpoints WHERE org_id = %s AND deleted_at IS NULL ORDER BY id",
        (org.org_id,),
    ).fetchall()
    return Org(org.org_id, org.api_key, [str(row[0]) for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL.replace("migrate", "bulk"))
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    rotator = find_bin("rotator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    procs: list[Proc] = []
    independent: list[float] = []
    bulk: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rotator-bulk-bench-") as tmp:
        log_dir = Path(tmp)
        try:
            prepare(rotator, env, args.database_url, args.broker_url, "WARNING")
            receiver, receiver_port = start_receiver(env, log_dir, procs)
            api_port = free_port()
            url = f"http://{HOST}:{receiver_port}"
            single = create_endpoints(
                [(*create_org(rotator, env, "independent"), ORGS * PER_ORG)], url
            )[0]
            many = create_endpoints(
                [(*create_org(rotator, env, f"bulk-{n}"), PER_ORG) for n in range(ORGS)], url
            )
            vacuum_analyze(args.database_url)
            api = Proc(
                "api",
                [rotator, "api", "--host", HOST, "--port", str(api_port), "--workers", "1"],
                env,
                log_dir,
            )
            worker = Proc(
                "worker",
                [rotator, "worker", "--pool", "prefork", "--concurrency", "2"],
                env,
                log_dir,
            )
            procs += [api, worker]
            api.start()
            worker.start()
            api.wait_http(api_port, "/readyz")
            checks = [worker, api, receiver]

            import psycopg
            import redis

            redis_client = redis.Redis.from_url(args.broker_url)

            with psycopg.connect(args.database_url, autocommit=True) as pg:
                database = args.database_url.rsplit("/", 1)[-1]
                groups = {"worker": worker.pid, "api": api.pid, "receiver": receiver.pid}

                def independent_phase(index: int, sources: Org) -> Org:
                    """500 independent migrates; the organization's endpoints afterwards."""
                    phase = run_migrations(
                        f"independent-{index}",
                        sources,
                        api_port,
                        16,
                        pg,
                        redis_client,
                        groups,
                        database,
                        args.timeout,
                        checks,
                    )
                    independent.append(phase.total_s)
                    print(f"independent-{index}: {phase.total_s:.2f} s", flush=True)
                    return Org(sources.org_id, sources.api_key, phase.next_sources)

                for index in range(args.rounds):
                    single = independent_phase(index, single)
                    seconds = run_bulk(api_port, many, pg, args.timeout, checks)
                    bulk.append(round(seconds, 3))
                    print(f"bulk-{index}: {seconds:.2f} s", flush=True)
                    many = [next_sources(pg, org) for org in many]
                independent_phase(args.rounds, single)
        except KeyboardInterrupt:
            return 130
        except BenchError as exc:
            print(f"bulk_bench: {exc}", file=sys.stderr)
            for proc in procs:
                print(f"--- {proc.name} log tail ---\n{proc.log_tail(15)}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                proc.stop()
    ratios = [bulk[i] / ((independent[i] + independent[i + 1]) / 2) for i in range(len(bulk))]
    ratio = statistics.median(ratios)
    print(f"\n{ORGS} bulk migrates of {PER_ORG} endpoints vs {ORGS * PER_ORG} independent ones")
    print(f"independent s: {independent}")
    print(f"bulk s:        {bulk}")
    print(
        f"ratios: {[round(r, 2) for r in ratios]}; median {ratio:.2f}x: goal <= {GOAL_RATIO}x "
        f"{'met' if ratio <= GOAL_RATIO else 'NOT MET'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
