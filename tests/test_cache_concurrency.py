"""Two processes asking for one artifact: one builds, the other waits and loads the same artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from atp_repro.mini.cache import load_or_build

    root, out = Path(sys.argv[1]), Path(sys.argv[2])

    def build(folder):
        (folder / "partial").mkdir(exist_ok=True)
        (folder / "partial" / "progress").write_text("half")
        deadline = time.time() + 60  # build until the other process has asked for the artifact too
        while len(list(root.parent.glob("started-*"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        (folder / "model.pt").write_text(f"built by {os.getpid()}")
        (folder / "partial" / "progress").unlink()
        (folder / "partial").rmdir()
        return {"builder": os.getpid()}

    (root.parent / f"started-{os.getpid()}").write_text("")
    folder, manifest, status = load_or_build("tiny", {"k": 1}, build, root=root)
    out.write_text(json.dumps({"status": status, "builder": manifest["builder"],
                               "content": (folder / "model.pt").read_text(), "pid": os.getpid()}))
""")


def test_concurrent_builders_of_one_key_build_once(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(o)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in outs]
    logs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["status"] for r in results) == ["built", "hit"], results
    builder = next(r for r in results if r["status"] == "built")
    waiter = next(r for r in results if r["status"] == "hit")
    assert builder["builder"] == builder["pid"] == waiter["builder"]  # the waiter loaded the builder's artifact
    assert builder["content"] == waiter["content"] == f"built by {builder['pid']}"
    assert any("waiting for it" in out for out, _ in logs)  # the waiter said why it waits
