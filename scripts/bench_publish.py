#!/usr/bin/env python3
"""Publishing a model-sized payload over a link with latency: one PUBACK wait per
chunk versus ``MqttTransport.publish_many`` (a window of chunks in flight).

The publisher reaches a local Mosquitto through a TCP proxy on 127.0.0.1
that holds every segment for ``--delay-ms`` in each direction (order kept),
standing in for a board's uplink; the kernel here has no ``netem``. The time
measured is until the publisher has every PUBACK, which is what blocks a
client or the coordinator. Both ways run in one process, interleaved.

    python scripts/bench_publish.py [--delay-ms 25] [--size-mb 6.8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class DelayProxy:
    """TCP proxy on 127.0.0.1 adding ``delay`` seconds to each direction, in a thread."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.loop = asyncio.new_event_loop()
        self.port: int | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the delay proxy did not start")

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._connect, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _connect(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        asyncio.ensure_future(self._pipe(client_reader, server_writer))
        asyncio.ensure_future(self._pipe(server_reader, client_writer))

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + self.delay, data))
            queue.put_nowait(None)
            await sender
        except (asyncio.CancelledError, ConnectionError):
            sender.cancel()

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self._thread.join(5)


def run(args: argparse.Namespace) -> dict:
    from coordinator.broker import EmbeddedBroker
    from edge_client.chunks import split
    from edge_client.mqtt import MqttTransport
    from edge_client.transport import Message

    payload = os.urandom(int(args.size_mb * 1e6))
    chunks = split(payload)
    results: dict[str, list[float]] = {"one PUBACK wait per chunk": [], "publish_many (window)": []}
    with EmbeddedBroker(kind="mosquitto") as broker:
        proxy = DelayProxy(broker.port, args.delay_ms / 1000)
        publisher = MqttTransport(f"mqtt://127.0.0.1:{proxy.port}", "bench-pub", ack_timeout=120)
        subscriber = MqttTransport(broker.url, "bench-sub")
        publisher.connect(timeout=10)
        subscriber.connect(timeout=10)
        subscriber.subscribe("bench/#")
        for repeat in range(args.repeats):
            for name in results:
                messages = [Message(f"bench/{repeat}/{len(results[name])}", c) for c in chunks]
                started = time.perf_counter()
                if name.startswith("one"):
                    for m in messages:
                        publisher.publish(m.topic, m.payload)
                else:
                    publisher.publish_many(messages)
                results[name].append(time.perf_counter() - started)
                for _ in messages:  # every chunk also reached the subscriber
                    if subscriber.receive(timeout=30) is None:
                        raise SystemExit("the subscriber stopped receiving")
        publisher.close()
        subscriber.close()
        proxy.close()
    return {"chunks": len(chunks), "bytes": len(payload), "seconds": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay added to loopback (default 25)")
    parser.add_argument("--size-mb", type=float, default=6.8, help="payload size; the MNIST CNN .tflite is 6.8 MB")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each way (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "bench_publish.json")
    args = parser.parse_args()
    result = run(args)
    result.update(delay_ms=args.delay_ms, command=" ".join(["python", "scripts/bench_publish.py", *sys.argv[1:]]))
    rtt = 2 * args.delay_ms
    print(f"{result['bytes'] / 1e6:.1f} MB in {result['chunks']} chunks, {rtt:.0f} ms round trip, mosquitto")
    medians = {name: statistics.median(times) for name, times in result["seconds"].items()}
    for name, median in medians.items():
        print(f"  {name:28s} median {median:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in result['seconds'][name])})")
    slow, fast = medians.values()
    print(f"  speed-up {slow / fast:.1f}x")
    print(f"command: {result['command']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
