#!/usr/bin/env python3
"""Closed-loop HTTP load with exact client-observed latencies (used by balance-hedge.sh).

    closed-loop.py URL BODY_FILE CONNS SECONDS

CONNS keep-alive connections, each sending the next POST as soon as its previous answer
arrived, for SECONDS. Prints, in microseconds, the nearest-rank percentiles of every
request's latency (send to last byte) and the counts:

    P50 …  P99 …  P999 …  REQS …  ERRS …   (one per line)

Not wrk: wrk corrects for coordinated omission by adding, for each answer slower than
twice the mean interval between requests on a connection, made-up samples at that answer's
latency minus 1, 2, … intervals, as if the requests a connection did not send meanwhile had
queued behind it. Here the connections are independent (the gateway serves them
concurrently), so one 1 s answer became ~18 samples between 50 ms and 1 s, and one slow
call in 800 moved the p99 to ~600 ms.
"""
import http.client
import math
import sys
import threading
import time
import urllib.parse

url, body_file, conns, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
u = urllib.parse.urlsplit(url)
with open(body_file, "rb") as f:
    body = f.read()
headers = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-bench",
    "Cache-Control": "no-cache",
}
lat, errs, lock = [], [0], threading.Lock()
end = time.monotonic() + seconds


def worker():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    mine, bad = [], 0
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            c.request("POST", u.path, body, headers)
            r = c.getresponse()
            r.read()
            ok = r.status < 400
        except (OSError, http.client.HTTPException):
            ok = False
            c.close()
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        mine.append(time.perf_counter() - t)
        bad += not ok
    with lock:
        lat.extend(mine)
        errs[0] += bad


threads = [threading.Thread(target=worker) for _ in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat.sort()


def pct(p):
    return int(lat[max(0, math.ceil(p / 100 * len(lat)) - 1)] * 1e6) if lat else 0


print(f"P50 {pct(50)}\nP99 {pct(99)}\nP999 {pct(99.9)}\nREQS {len(lat)}\nERRS {errs[0]}")
