"""hf:ORG/NAME downloads once through huggingface_hub, from a local HTTP server on 127.0.0.1 standing in
for the hub (HF_ENDPOINT), then loads from the cache with HF_HUB_OFFLINE=1 and the server gone. Never the
network: the server answers the three kinds of request snapshot_download makes (repo info, file tree,
file resolve) for one tiny Llama repository."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from llmstages.tokenizer import train_bpe  # noqa: E402

REPO = "tiny-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(files: dict[str, bytes], requests: list[str]) -> ThreadingHTTPServer:
    """An HTTP server with the hub's routes for REPO at revision SHA; unknown paths are 404."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, code: int, body: bytes, headers: dict, head: bool) -> None:
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def answer(self, head: bool) -> None:
            path = urlparse(self.path).path
            requests.append(f"{self.command} {path}")
            as_json = {"Content-Type": "application/json"}
            if path == f"/api/models/{REPO}/revision/main":
                info = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
                return self.reply(200, json.dumps(info).encode(), as_json, head)
            if path.startswith(f"/api/models/{REPO}/tree/"):
                tree = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                        for name, data in files.items()]
                return self.reply(200, json.dumps(tree).encode(), as_json, head)
            prefix = f"/{REPO}/resolve/"
            if path.startswith(prefix) and (name := path[len(prefix):].split("/", 1)[-1]) in files:
                data = files[name]
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                return self.reply(200, data, {"X-Repo-Commit": SHA, "ETag": etag}, head)
            return self.reply(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, head)

        def do_GET(self) -> None:
            self.answer(head=False)

        def do_HEAD(self) -> None:
            self.answer(head=True)

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def repo_files(tmp_path) -> dict[str, bytes]:
    folder = tmp_path / "repo"
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    train_bpe(["a tiny text for a tiny tokenizer " * 5] * 10, 280).save(folder / "tokenizer.json")
    (folder / "pytorch_model.bin").write_bytes(b"never fetched: safetensors are there")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_hub_id_downloads_once_then_works_offline(cli, tmp_path, repo_files):
    requests: list[str] = []
    server = fake_hub(repo_files, requests)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    try:
        online = cli("generate", f"hf:{REPO}", "a tiny", "-t", "0", "-n", "4", "--json", cwd=tmp_path,
                     env=dict(hub, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}"))
    finally:
        server.shutdown()
        server.server_close()
    assert online.returncode == 0, online.stderr
    fetched = sorted(r.rsplit("/", 1)[-1] for r in requests if r.startswith("GET /tiny-org"))
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / SHA
    assert (snapshot / "model.safetensors").exists() and not (snapshot / "pytorch_model.bin").exists()

    offline = cli("generate", f"hf:{REPO}", "a tiny", "-t", "0", "-n", "4", "--json", cwd=tmp_path,
                  env=dict(hub, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"))  # nothing listens there
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["completion"] == json.loads(online.stdout)["completion"]


def test_unknown_repo_on_the_stand_in_hub_is_a_user_error(cli, tmp_path, repo_files):
    server = fake_hub(repo_files, [])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = cli("generate", "hf:tiny-org/no-such-model", "x", cwd=tmp_path,
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
                          "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tiny-org/no-such-model" in result.stderr
