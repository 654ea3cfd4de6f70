"""bench/serving.py --http: the same closed loop through `edgellm serve` (a process of its own on loopback,
so the clients' Python does not share the server's interpreter), each client a thread with one keep-alive
connection (StreamClient: a raw socket, so that 64 client threads cost their process little) streaming
/v1/completions: token ids as the prompt, greedy, ignore_eos (every request runs its full length, as the
in-process rows). TTFT: the request sent -> its first streamed text, on the client (and the server's own
mean from /metrics: arrival -> first token on the engine); ITL: between streamed chunks; tokens: each
stream's usage chunk."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer for a random-weights directory (token i is "t{i}"), so that the server
    streams text: both paths then detokenize every token, as they do for a real model."""
    if (model_dir / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def start_server(model_dir, *, max_batch: int, max_input: int, capacity: int, prefill_budget: int | None, device: str = "cuda",
                 timeout: float = 300, options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "edgellm.cli", "serve", str(model_dir), "--port", str(port), "--device", device,
               "--dtype", "float16" if device == "cuda" else "float32", "--max-batch-size", str(max_batch), "--max-input-length", str(max_input),
               "--max-kv-cache-capacity", str(capacity), "--served-model-name", "bench", "--drain-timeout", "10"]
    if prefill_budget:
        command += ["--prefill-budget", str(prefill_budget)]
    command += list(options)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if json.loads(connection.getresponse().read()).get("status") == "ready":
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"edgellm serve did not become ready:\n{process.stdout.read()}")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    return process.returncode


class StreamClient:
    """One keep-alive HTTP/1.1 connection streaming /v1/completions, read straight off the socket: the
    clients share this process's interpreter, so each received piece costs a recv() and a byte search,
    no per-event parsing (only the usage chunk is decoded). Events are timed when their bytes arrive."""

    _TEXT = b'"text":"'

    def __init__(self, port: int, timeout: float = 600):
        self.port, self.timeout = port, timeout
        self.sock = None

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stream(self, body: bytes) -> tuple[float, list[float], int]:
        """(send time, arrival time of each streamed text event, completion tokens from the usage chunk)."""
        if self.sock is None:
            self._connect()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body)) + body
        sent = time.perf_counter()
        self.sock.sendall(request)
        data, arrivals = b"", []
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, data = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {(head + data)[:300]!r}")
        found = 0  # where to look for the next text marker
        while True:
            now = time.perf_counter()
            while (i := data.find(self._TEXT, found)) >= 0 and i + len(self._TEXT) < len(data):
                if data[i + len(self._TEXT)] != ord('"'):  # (an empty text: a finish chunk)
                    arrivals.append(now)
                found = i + 1
            if i >= 0:
                found = i  # (a marker at the very end: judged once the next byte arrives)
            else:
                found = max(found, len(data) - len(self._TEXT))
            if data.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: the stream is over
                break
            data += self._recv()
        tokens = 0
        usage = data.rfind(b'"usage":{')
        if usage >= 0:
            tokens = json.loads(data[data.rfind(b"data: ", 0, usage) + 6:data.find(b"\n", usage)])["usage"]["completion_tokens"]
        return sent, arrivals, tokens

    def _recv(self) -> bytes:
        piece = self.sock.recv(1 << 16)
        if not piece:
            raise ConnectionError("the server closed the connection")
        return piece


def run_clients(client, count: int) -> tuple[float, float]:
    """`count` threads running client() until each returns: (start time, wall seconds)."""
    threads = [threading.Thread(target=client) for _ in range(count)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return began, time.perf_counter() - began


def server_ttft_totals(port: int) -> tuple[float, float]:
    """(sum of seconds, count) of the server's TTFT histogram (GET /metrics)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    values = {}
    for line in text.splitlines():
        if line.startswith("edgellm_time_to_first_token_seconds_"):
            name, _, value = line.partition(" ")
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", 0.0), values.get("count", 0.0)


def http_closed_loop(port: int, jobs: list[dict], clients: int, percentile) -> dict:
    """bench/serving.py's closed_loop over HTTP: each client sends its next job when the last one is done."""
    queue = list(reversed(jobs))
    lock = threading.Lock()
    ttft, itl, tokens, errors, chunks = [], [], [0], [], []
    last_taken = [None]

    def client():
        connection = StreamClient(port)
        while True:
            with lock:
                if not queue:
                    break
                job = queue.pop()
                if not queue:
                    last_taken[0] = time.perf_counter()
            body = json.dumps({"model": "bench", "prompt": job["input_ids"], "max_tokens": job["max_tokens"],
                               "temperature": 0, "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
            try:
                sent, arrivals, count = connection.stream(body)
            except Exception as exc:  # noqa: BLE001 - reported in the result
                errors.append(repr(exc))
                connection.close()
                continue
            with lock:
                tokens[0] += count
                chunks.append((arrivals, count))
                if arrivals:
                    ttft.append((arrivals[0] - sent) * 1e3)
                    itl.extend((b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:]))
        connection.close()

    before = server_ttft_totals(port)
    began, wall = run_clients(client, clients)
    after = server_ttft_totals(port)
    steady_end = last_taken[0] or began + wall
    # Tokens per chunk: a stream's tokens spread over its chunks (one token each unless the server joined some).
    steady = sum(count / max(len(arrivals), 1) * sum(began <= t <= steady_end for t in arrivals)
                 for arrivals, count in chunks)
    return dict(clients=clients, http=True, requests=len(jobs), wall_s=wall, tokens=tokens[0],
                tokens_per_s=tokens[0] / wall, steady_tokens_per_s=steady / max(steady_end - began, 1e-9),
                ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
                ttft_mean_ms=sum(ttft) / max(len(ttft), 1),
                server_ttft_mean_ms=1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1),
                itl_p50_ms=percentile(itl, 0.5), itl_p99_ms=percentile(itl, 0.99), itl_max_ms=max(itl, default=0),
                chunks_per_token=sum(len(a) for a, _ in chunks) / max(tokens[0], 1), errors=errors[:5])
