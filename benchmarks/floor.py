"""The floor under W3: what four process hops cost on this machine with no job-queue logic.

    python benchmarks/floor.py

A job of ezpq_mgr crosses client -> server -> worker -> server -> client;
this sends 100 bytes around that chain over bare multiprocessing pipes,
with the server relaying from one thread and from two (one per direction,
like ezpq_mgr's serving and supervisor threads), and one bare round trip
(client -> worker -> client, the two hops of ProcessPoolExecutor). p50 of
5,000 rounds each.
"""

import multiprocessing
import threading
import time


def _echo(conn):
    while True:
        msg = conn.recv_bytes()
        if msg == b"q":
            return
        conn.send_bytes(msg)


def _relay(client, worker, threaded):
    if threaded:
        def back():
            while True:
                try:
                    client.send_bytes(worker.recv_bytes())
                except EOFError:
                    return
        threading.Thread(target=back, daemon=True).start()
    while True:
        msg = client.recv_bytes()
        worker.send_bytes(msg)
        if msg == b"q":
            return
        if not threaded:
            client.send_bytes(worker.recv_bytes())


def _p50_us(conn, rounds=5000):
    lat = []
    for _ in range(rounds):
        t = time.perf_counter()
        conn.send_bytes(b"x" * 100)
        conn.recv_bytes()
        lat.append(time.perf_counter() - t)
    conn.send_bytes(b"q")
    return sorted(lat)[rounds // 2] * 1e6


def chain_p50_us(hops, threaded=True, rounds=5000):
    """p50 of a bare round trip of 2 hops (to a worker) or 4 (via a relay)."""
    a, b = multiprocessing.Pipe()
    if hops == 2:
        procs = [multiprocessing.Process(target=_echo, args=(b,))]
    else:
        c, d = multiprocessing.Pipe()
        procs = [multiprocessing.Process(target=_echo, args=(d,)),
                 multiprocessing.Process(target=_relay, args=(b, c, threaded))]
    for p in procs:
        p.start()
    try:
        return _p50_us(a, rounds)
    finally:
        for p in procs:
            p.join(10)


def main():
    print(f"2 hops (client -> worker -> client):     p50 {chain_p50_us(2):6.1f} us")
    print(f"4 hops via a server, one relay thread:   p50 {chain_p50_us(4, threaded=False):6.1f} us")
    print(f"4 hops via a server, two relay threads:  p50 {chain_p50_us(4):6.1f} us")


if __name__ == "__main__":
    main()
