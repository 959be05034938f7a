"""lorakit.vllm.push against a fake vLLM server (http.server on 127.0.0.1 in a thread):
the requests it sends, the folder the server reads, every error path. The real server
is scripts/vllm_push_check.py (``nox -s vllm_push``)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter
from lorakit.transformers import peft_export
from lorakit.vllm import PushError, push

BASE = "tiny-llama"


class FakeVLLM(ThreadingHTTPServer):
    """vLLM's routes as 0.32 answers them; ``runtime=False`` drops the load/unload routes
    (VLLM_ALLOW_RUNTIME_LORA_UPDATING unset); ``refuse`` makes every load fail with it."""

    def __init__(self, runtime: bool = True, refuse: str | None = None, unload_fails: bool = False):
        super().__init__(("127.0.0.1", 0), Handler)
        self.runtime, self.refuse, self.unload_fails = runtime, refuse, unload_fails
        self.served: dict[str, str] = {}  # lora name -> path
        self.requests: list[tuple[str, str, dict | None]] = []
        self.seen: dict[str, dict] = {}  # lora name -> {"files", "config", "tensors"} read at load time

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeVLLM

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

    def do_GET(self):
        self.server.requests.append(("GET", self.path, None))
        if self.path != "/v1/models":
            return self._send(404, {"detail": "Not Found"})
        self._send(200, {"object": "list", "data": [{"id": n} for n in [BASE, *self.server.served]]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, body))
        if not self.server.runtime or self.path not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self._send(404, {"detail": "Not Found"})
        name = body.get("lora_name")
        if self.path == "/v1/unload_lora_adapter":
            if not name:
                return self._error(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
            if name not in self.server.served or self.server.unload_fails:
                return self._error(404, f"The lora adapter '{name}' cannot be found.")
            del self.server.served[name]
            return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.")
        if name in self.server.served:
            return self._error(400, f"The lora adapter '{name}' has already been loaded.")
        if self.server.refuse:
            return self._error(500, self.server.refuse)
        path = Path(body["lora_path"])  # what vLLM reads: a complete folder, already in place
        self.server.seen[name] = {"files": sorted(p.name for p in path.iterdir()),
                                  "config": json.loads((path / "adapter_config.json").read_text()),
                                  "tensors": load_file(str(path / "adapter_model.safetensors")),
                                  "absolute": path.is_absolute()}
        self.server.served[name] = str(path)
        self._send(200, f"Success: LoRA adapter '{name}' added successfully.")


@pytest.fixture
def server():
    made = []

    def start(**kw) -> FakeVLLM:
        s = FakeVLLM(**kw)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        made.append(s)
        return s

    yield start
    for s in made:
        s.shutdown()
        s.server_close()


def adapted(recipe: str = "lora", seed: int = 0):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    Adapter.from_recipe(recipe, rank=2, seed=seed).apply(model, targets=["q_proj", "v_proj"])
    with torch.no_grad():  # a trained-looking adapter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_push_loads_then_unloads_previous(server, tmp_path):
    s = server()
    model = adapted()
    first = push(model, s.url, "policy-v1", folder=tmp_path / "v1")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    second = push(model, s.url + "/", "policy-v2", folder=tmp_path / "v2", previous="policy-v1")
    loads = [(m, r, b) for m, r, b in s.requests if m == "POST" and b["lora_name"]]
    assert loads == [("POST", "/v1/load_lora_adapter", {"lora_name": "policy-v1", "lora_path": str(tmp_path / "v1")}),
                     ("POST", "/v1/load_lora_adapter", {"lora_name": "policy-v2", "lora_path": str(tmp_path / "v2")}),
                     ("POST", "/v1/unload_lora_adapter", {"lora_name": "policy-v1"})]  # the new one first
    assert list(s.served) == ["policy-v2"]
    assert (first.name, first.path, second.path) == ("policy-v1", tmp_path / "v1", tmp_path / "v2")
    assert second.unload_s > 0 and first.unload_s == 0 and second.total_s >= second.load_s
    expected = peft_export(model, task_type="CAUSAL_LM")
    got = s.seen["policy-v2"]
    assert got["files"] == ["adapter_config.json", "adapter_model.safetensors"] and got["absolute"]
    assert got["config"] == json.loads(json.dumps(expected.config))
    assert got["tensors"].keys() == expected.tensors.keys()
    assert all(torch.equal(got["tensors"][k], v) for k, v in expected.tensors.items())
    assert entries(tmp_path) == ["v1", "v2"]  # no staging leftovers beside the folders


def test_dora_is_folded_default_folder(server, tmp_path, monkeypatch):
    import lorakit.vllm.client as module

    monkeypatch.setattr(module, "DEFAULT_ROOT", tmp_path / "root")
    s = server()
    model = adapted("dora")
    pushed = push(model, s.url, "dora-1")
    assert pushed.path == tmp_path / "root" / "dora-1"
    config = s.seen["dora-1"]["config"]
    assert config["use_dora"] is False and not any("magnitude" in k for k in s.seen["dora-1"]["tensors"])
    folded = peft_export(model, task_type="CAUSAL_LM", fold_magnitude=True)
    assert all(torch.equal(s.seen["dora-1"]["tensors"][k], v) for k, v in folded.tensors.items())


def test_push_replaces_an_existing_folder_as_a_unit(server, tmp_path):
    s = server()
    folder = tmp_path / "live"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")  # a stale export
    (folder / "README.md").write_text("notes")  # not the export's: kept
    push(adapted(), s.url, "a1", folder=folder)
    assert s.seen["a1"]["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert s.seen["a1"]["config"]["peft_type"] == "LORA"
    assert entries(tmp_path) == ["live"]


def test_server_down(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PushError, match=rf"127.0.0.1:{port} is not reachable .*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        push(adapted(), f"http://127.0.0.1:{port}", "a1", folder=tmp_path / "a1", timeout=5)
    assert entries(tmp_path) == []


def test_runtime_updating_disabled(server, tmp_path):
    s = server(runtime=False)
    with pytest.raises(PushError, match="runtime LoRA updating disabled.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        push(adapted(), s.url, "a1", folder=tmp_path / "a1")
    assert entries(tmp_path) == [] and not s.served


def test_load_refused_quotes_the_server_and_removes_the_folder(server, tmp_path):
    s = server(refuse="LoRA rank 64 is greater than max_lora_rank 16.")
    with pytest.raises(PushError, match=r"refused to load 'a1' .*HTTP 500: LoRA rank 64 is greater than max_lora_rank"):
        push(adapted(), s.url, "a1", folder=tmp_path / "a1")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("name,previous,match", [
    ("a1", None, r"already serves 'a1': push under a new name \(e.g. 'a1-2'\) with previous='a1'"),
    ("a2", "a0", r"previous='a0': .* does not serve it \(it serves tiny-llama, a1\)"),
    ("a2", "a2", "is the name being pushed"),
    ("../x", None, r"name='../x': use letters"),
])
def test_bad_names_change_nothing(server, tmp_path, name, previous, match):
    s = server()
    s.served["a1"] = "/elsewhere"
    with pytest.raises(PushError, match=match):
        push(adapted(), s.url, name, folder=tmp_path / "x", previous=previous)
    assert entries(tmp_path) == [] and list(s.served) == ["a1"]
    assert not [r for r in s.requests if r[1] == "/v1/load_lora_adapter"]


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h/", "http://h:1/v1/models"])
def test_bad_url(url):
    with pytest.raises(PushError, match=r"push url=.*give the server's root"):
        push(adapted(), url, "a1")


def test_unload_failure_says_the_new_version_is_served(server, tmp_path):
    s = server(unload_fails=True)
    s.served["a1"] = "/elsewhere"
    with pytest.raises(PushError, match=r"'a2' is served, but unloading previous='a1' failed: HTTP 404"):
        push(adapted(), s.url, "a2", folder=tmp_path / "a2", previous="a1")
    assert "a2" in s.served
