"""Scale-out on Ray Serve: aggregate tok/s of `pellucid serve --replicas N` at 16 clients.

    .venv/bin/python benchmarks/ray_serve.py                          # 1 and 2 replicas x 1 thread, plain serve too
    .venv/bin/python benchmarks/ray_serve.py --replicas 1 2 4 --threads 1 --requests 2 --max-tokens 64
    .venv/bin/python benchmarks/ray_serve.py --no-plain --stream-interval-ms 0 100   # stream batching off and on
    .venv/bin/python benchmarks/ray_serve.py --ingress pellucid      # pellucid's own HTTP front only

The chat workload of benchmarks/server.py (every client sends --requests streaming
requests one after another, greedy, end-of-generation tokens banned so each makes exactly
--max-tokens) against: plain `pellucid serve --threads T` (no Ray), then `pellucid serve
--replicas N --threads T --ingress I` for each N and each I. Per run: aggregate output
tok/s, TTFT and inter-token gaps, and the CPU seconds of the relay per generated token (read
from /proc: the `pellucid serve` process, which is the HTTP front with `--ingress pellucid`,
plus Ray's HTTP proxy and pellucid's ingress deployment with `--ingress ray-proxy`): the
cost one front pays to relay a token, which bounds what one front can serve however many
machines stand behind it. The paper estimate for N machines is printed from these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import TOPICS, Server, eog_ban, run_level, summarize  # noqa: E402

RELAY_TITLES = ("ray::ProxyActor", "ray::ServeReplica:pellucid:ingress")
REPLICA_TITLE = "ray::ServeReplica:pellucid:engine"


def cpu_by_role(front_pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of every process on the machine, by role: the engine
    replicas, the relay (the `pellucid serve` process, which is the HTTP front with --ingress
    pellucid, plus Ray's HTTP proxy and pellucid's ingress deployment with --ingress
    ray-proxy), the rest of Ray (raylet, GCS, Serve's controller, ...), this load generator,
    and everything else."""
    roles = {"replicas": 0.0, "relay": 0.0, "ray": 0.0, "client": 0.0, "other": 0.0}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        secs = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pid = int(d.name)
        if pid == front_pid or any(cmd.startswith(t) for t in RELAY_TITLES):
            roles["relay"] += secs
        elif cmd.startswith(REPLICA_TITLE):
            roles["replicas"] += secs
        elif pid == os.getpid():
            roles["client"] += secs
        elif "ray" in cmd.split(" ")[0] or cmd.startswith("ray::") or "/ray/" in cmd:
            roles["ray"] += secs
        else:
            roles["other"] += secs
    return roles


def wait_replicas(url: str, n: int, timeout: float = 300) -> None:
    """Until the ingress's /metrics shows n loaded replicas."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            if f"pellucid_replicas {n}\n" in httpx.get(f"{url}/metrics", timeout=30).text:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{n} replicas not ready after {timeout} s")


def run(name: str, cmd_extra: list[str], replicas: int | None, args, ban, logs: Path) -> dict:
    cmd = [sys.executable, "-m", "pellucid", "serve", "--model", str(args.model_file), "--served-model-name", "bench",
           "--port", "{port}", "--max-batch", str(args.slots), "--threads", str(args.threads), "--log-level", "warning",
           *cmd_extra]  # fmt: skip

    def messages(k: int, j: int) -> list[dict]:
        return [{"role": "user", "content": f"Write a long story about {TOPICS[(k + j) % len(TOPICS)]}."}]

    with Server(name, cmd, "/health", logs / f"bench-{name.replace(' ', '-')}.log") as s:
        if replicas:
            wait_replicas(s.url, replicas)
        asyncio.run(run_level(s.url, min(args.clients, 2 * (replicas or 1)), messages, 1, 8, ban))  # warm up
        cpu0 = cpu_by_role(s.proc.pid)
        results, wall = asyncio.run(run_level(s.url, args.clients, messages, args.requests, args.max_tokens, ban))
        cpu = {k: v - cpu0[k] for k, v in cpu_by_role(s.proc.pid).items()}
        if not replicas:  # plain pellucid serve: the engine is the front's own process
            cpu["replicas"], cpu["relay"] = cpu["relay"], 0.0
        row = summarize(results, wall, args.clients) | {"server": name, "relay_cpu_s": cpu["relay"],
                                                         "cores": {k: v / wall for k, v in cpu.items()}}  # fmt: skip
    row["relay_ms_per_token"] = 1000 * row["relay_cpu_s"] / max(1, row["tokens"])
    err = f"  [{row['errors']} errors: {row['first_error']}]" if row["errors"] else ""
    print(f"  {name:<26} {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50']:.2f} s  ITL p50 {row['itl_p50_ms']:.1f} ms "
          f"p99 {row['itl_p99_ms']:.1f}  relay CPU {row['relay_ms_per_token']:.2f} ms/token{err}", flush=True)  # fmt: skip
    print("    cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in row["cores"].items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", type=Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica (and of the plain server)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16, help="--max-batch of each replica")
    ap.add_argument("--no-plain", action="store_true", help="skip plain pellucid serve (no Ray)")
    ap.add_argument("--stream-interval-ms", type=int, nargs="+", default=[100],
                    help="the replicas' stream batching interval(s); each is run for every replica count")
    ap.add_argument("--ingress", nargs="+", choices=["pellucid", "ray-proxy"], default=["pellucid", "ray-proxy"],
                    help="who answers HTTP (pellucid serve --ingress); each is run for every replica count")
    ap.add_argument("--machine-cores", type=int, default=os.cpu_count() or 2, help="cores per machine in the paper estimate")
    args = ap.parse_args()
    if args.model_file is None:
        from pellucid import registry

        args.model_file = registry.resolve(registry.DEFAULT_MODEL)
    ban = eog_ban(args.model_file)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; "
          f"{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens", flush=True)  # fmt: skip
    rows = []
    if not args.no_plain:
        rows.append(run(f"plain serve x {args.threads}t", [], None, args, ban, logs) | {"replicas": 0})
    for ingress in args.ingress:
        for interval in args.stream_interval_ms:
            for n in args.replicas:
                flags = ["--replicas", str(n), "--stream-interval-ms", str(interval), "--ingress", ingress]
                rows.append(run(f"{ingress}: {n} replica(s) x {args.threads}t, {interval} ms", flags, n, args, ban, logs)
                            | {"replicas": n, "interval": interval, "ingress": ingress})  # fmt: skip

    print("\n| server | clients | tok/s | vs 1 replica | TTFT p50 s | ITL p50 ms | ITL p99 ms | errors | relay CPU ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next((o for o in rows if o["replicas"] == 1 and o.get("interval") == r.get("interval")
                    and o.get("ingress") == r.get("ingress")), None)  # fmt: skip
        ratio = f"{r['tok_s'] / one['tok_s']:.2f}x" if one and r["replicas"] else "-"
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {ratio} | {r['ttft_p50']:.2f} | {r['itl_p50_ms']:.1f} | "
              f"{r['itl_p99_ms']:.1f} | {r['errors']} | {r['relay_ms_per_token']:.2f} |")  # fmt: skip
    best = max((r for r in rows if r["replicas"] and r["ingress"] == args.ingress[0]), key=lambda r: (r["replicas"], r["tok_s"]),
               default=None)  # fmt: skip
    if best and best["relay_ms_per_token"] > 0:
        # Paper estimate: each machine like the one measured gives best tok/s x (its cores / cores used here);
        # the single HTTP front (the first --ingress) needs relay_ms_per_token of one core per token.
        per_machine = best["tok_s"] * args.machine_cores / (best["replicas"] * args.threads)
        ceiling = 1000 / best["relay_ms_per_token"]
        print(f"\npaper estimate, machines of {args.machine_cores} cores, 1 thread per replica: "
              f"{per_machine:.0f} tok/s each; one ingress relays at most {ceiling:.0f} tok/s per core it gets")
        print("| machines | replicas | tok/s (replicas) | ingress cores needed |")
        print("|---|---|---|---|")
        for m in (1, 2, 4, 8, 16, 32):
            total = per_machine * m
            print(f"| {m} | {m * args.machine_cores // args.threads} | {total:.0f} | {total / ceiling:.2f} |")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
