"""Push a Wasm artifact to Wharf with the oras Python SDK and pull it back.

Usage: oras_roundtrip.py HOST TOKEN WASM_FILE WORK_DIR CHUNKED(0|1)
Prints one JSON object: the pushed manifest digest and the pulled files.
"""

import json
import os
import shutil
import sys

import oras.client

host, token, wasm, work, chunked = sys.argv[1:]
os.makedirs(work, exist_ok=True)
name = "app.wasm"
shutil.copy(wasm, os.path.join(work, name))
with open(os.path.join(work, "config.json"), "w") as f:
    json.dump({"architecture": "wasm", "os": "wasip1"}, f)

os.chdir(work)
client = oras.client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
client.login(username="wharf", password=token, hostname=host)
target = f"{host}/oras/hello:v1"
response = client.push(
    target=target,
    files=[f"{name}:application/wasm"],
    manifest_config="config.json:application/vnd.wasm.config.v0+json",
    do_chunked=chunked == "1",
    chunk_size=16 * 1024,
    disable_path_validation=True,
)
response.raise_for_status()
digest = response.headers.get("Docker-Content-Digest")
files = client.pull(target=target, outdir=os.path.join(work, "pulled"))
print(json.dumps({"digest": digest, "files": files}))
