"""tierbox doctor, on real endings: each scenario of tests/data/doctor/memshape.c
runs on each tier (real engines), the run history samples it, and doctor
must name the cause. Also pods, docker inspect output, cgroup directories
(v1 on a real sandbox's cgroup), --explain against a local HTTP server, and
the history's bounds."""

from __future__ import annotations

import http.server
import itertools
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Mount, Sandbox, history, run
from tierbox.doctor import Cause, diagnose, diagnose_run
from tierbox.doctor import explain as ex
from tierbox.spec import Stats

DATA = Path(__file__).parent / "data" / "doctor"
TIERBOX = [sys.executable, "-m", "tierbox.cli"]
MIB = 1 << 20

#: scenario -> (memshape arguments, extra limits, the cause doctor must name)
SCENARIOS: dict[str, tuple[list[str], dict[str, Any], Cause]] = {
    "leak": (["leak", "4", "100"], {}, Cause.LEAK),  # 4 MiB per 100 ms
    # steady 2 s, then 100 MiB at once (a loaded host can take over a second to show it)
    "spike": (["spike", "2000", "100"], {}, Cause.SPIKE),
    "working_set": (["workingset", "80", "8", "40"], {}, Cause.WORKING_SET_TOO_LARGE),
    "child_oom": (["childoom", "100"], {}, Cause.CHILD_OOM),
    "cpu": (["cpu", "3"], {"cpus": 0.2, "timeout_s": 3}, Cause.CPU_THROTTLED),
}
#: the VM tiers' limit is the guest's RAM (at least 96 MiB, ~49 of it the kernel's):
#: 128 MiB leaves the workload ~40-50 MiB, so the one-shot sizes shrink to fit
VM_ARGS = {
    "leak": ["leak", "2", "100"],  # slower: QEMU's host memory needs more samples to show the line
    "spike": ["spike", "1500", "60"],  # TCG touches memory slowly: less of it stays a spike
    "child_oom": ["childoom", "80"],
    "working_set": ["workingset", "240", "8", "40"],
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """memshape built statically (Linux tiers) and to WASI (wasm), in a
    directory the process tier's own uid can read."""
    from tierbox.wasm import toolchain

    d = Path("/var/tmp") / f"tierbox-doctor-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    src = DATA / "memshape.c"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "memshape"), str(src)], check=True)
    out = {"native": d / "memshape"}
    if toolchain.missing() is None:
        wasm = toolchain.build(
            src.read_bytes(),
            "memshape",
            tmp_path_factory.mktemp("wasm"),
            ["-O1", "-D_WASI_EMULATED_PROCESS_CLOCKS", "-lwasi-emulated-process-clocks"],
        )
        (d / "memshape.wasm").write_bytes(wasm.read_bytes())
        out["wasm"] = d / "memshape.wasm"
    for p in d.iterdir():
        p.chmod(0o755)
    yield out  # type: ignore[misc]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _record(argv: list[str]) -> dict[str, Any]:
    """This test's run in the history (other runs may land beside it)."""
    history.flush()
    for rec in history.records():
        if rec.get("argv") == argv:
            return rec
    raise AssertionError(f"no history record for {argv}")


def _show(rec: dict[str, Any]) -> str:
    s = rec.get("samples") or {}
    mem = [round((m or 0) / MIB, 1) for m in s.get("memory_bytes", [])]
    return f"termination={rec.get('termination')} memory_mib={mem[:40]}"


def one_shot(tier: str, scenario: str, programs: dict[str, Path]) -> dict[str, Any]:
    args, extra, _ = SCENARIOS[scenario]
    token = secrets.token_hex(4)
    opts: dict[str, Any] = {"memory_mib": 64, "timeout_s": 20, **extra}
    if tier == "wasm":
        argv = ["memshape", *args, token]
        run(str(programs["wasm"]), argv, tier="wasm", **opts)
    elif tier == "process":
        argv = [str(programs["native"]), *args, token]
        run(None, argv, tier="process", **opts)
    else:
        argv = ["/opt/doctor/memshape", *args, token]
        mount = Mount(str(programs["native"].parent), "/opt/doctor")
        run("busybox", argv, tier=tier, mounts=[mount], **opts)
    return _record(argv)


#: Where a scenario cannot happen, it is not asked for: WASI preview 1 has no
#: processes (a wasm run has no children), and on gVisor the host's OOM killer
#: stops the whole sandbox (runsc has no memory limit of its own), so a
#: child's OOM is never one the parent survives.
CASES = [
    (tier, scenario)
    for tier in ("process", "container", "gvisor", "wasm")
    for scenario in SCENARIOS
    if not (scenario == "child_oom" and tier in ("wasm", "gvisor"))
]


@pytest.mark.parametrize(("tier", "scenario"), CASES)
def test_doctor_names_the_cause_of_real_endings(
    tier: str, scenario: str, programs: dict[str, Path]
) -> None:
    require_tier(tier)
    if tier == "wasm" and "wasm" not in programs:
        pytest.skip("no clang/wasi-libc to build the WASI program (make setup)")
    if tier != "process" and tier != "wasm":
        require_image("busybox")
    rec = one_shot(tier, scenario, programs)
    diag = diagnose_run(rec)
    assert diag.cause is SCENARIOS[scenario][2], f"{diag.render()}\n{_show(rec)}"
    if diag.cause in (Cause.SPIKE, Cause.WORKING_SET_TOO_LARGE, Cause.CHILD_OOM):
        fix = diag.fixes[0]
        assert fix.tierbox_flags[0].startswith("--memory ")
        limits = fix.kubernetes_patch["spec"]["template"]["spec"]["containers"][0]["resources"]  # type: ignore[index]
        assert limits["limits"]["memory"] == limits["requests"]["memory"]
        assert int(fix.tierbox_flags[0].split()[1].rstrip("m")) > 64
    if diag.cause is Cause.LEAK:
        fit = diag.facts["memory"]["fit"]
        assert 2.0 <= fit["slope_mib_per_s"] / 10 <= 5.0 and fit["r2"] >= 0.9
        assert "raising the limit only delays it" in diag.fixes[0].summary
        assert not diag.fixes[0].tierbox_flags
    if diag.cause is Cause.CPU_THROTTLED:
        assert diag.fixes[0].tierbox_flags == ["--cpus 0.4"]
    # samples every 100 ms (a run that lived long enough to be sampled)
    t = rec["samples"]["t_s"]
    if len(t) >= 3:
        gaps = [b - a for a, b in itertools.pairwise(t)]
        assert max(gaps) < 0.25, gaps


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["microvm", "vm"])
def test_doctor_on_vm_tiers(tier: str, programs: dict[str, Path]) -> None:
    """The same endings in microVMs and VMs, each in a fresh sandbox (the
    samples are QEMU's host memory, which never shrinks within one VM)."""
    require_tier(tier)
    require_image("busybox")
    wrong = []
    for scenario, (args, extra, cause) in SCENARIOS.items():
        args = VM_ARGS.get(scenario, args)
        token = secrets.token_hex(4)
        argv = ["/opt/doctor/memshape", *args, token]
        opts = {
            "memory_mib": 128,
            "timeout_s": 30,
            **{k: v for k, v in extra.items() if k == "cpus"},
        }
        mount = Mount(str(programs["native"].parent), "/opt/doctor")
        with Sandbox.create("busybox", tier=tier, mounts=[mount], **opts) as sb:
            sb.run(argv, timeout_s=extra.get("timeout_s", 30))
        rec = _record(argv)
        diag = diagnose_run(rec)
        if diag.cause is not cause:
            wrong.append(f"{scenario}: {diag.cause.value} {_show(rec)}")
    assert not wrong, wrong


def test_background_and_sandbox_commands_are_recorded(programs: dict[str, Path]) -> None:
    require_tier("process")
    with Sandbox.create(tier="process", memory_mib=64, name=f"doc-{secrets.token_hex(3)}") as sb:
        token = secrets.token_hex(4)
        argv = [str(programs["native"]), "leak", "4", "100", token]
        h = sb.run(argv, background=True)
        h.wait(20)
        from tests.conftest import wait_until

        wait_until(lambda: _has(argv), what="the background command's record")
        rec = _record(argv)
        assert rec["kind"] == "background" and rec["sandbox_id"] == sb.id
        assert diagnose_run(rec).cause is Cause.LEAK
        # `tierbox doctor SANDBOX` takes the sandbox's newest run
        out = subprocess.run(
            [*TIERBOX, "doctor", sb.name or sb.id, "--json"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["cause"] == "leak"
        # a v1 cgroup directory of a real sandbox, after the OOM kill
        mem_dir = sb.instance.cg.dirs().get("memory")  # type: ignore[attr-defined]
        if mem_dir is not None:
            diag = diagnose(str(mem_dir))[0][0]
            assert diag.cause is Cause.OOM_KILLED and diag.facts["oom_kill"] >= 1
            assert diag.facts["memory_limit_mib"] == 64


def _has(argv: list[str]) -> bool:
    try:
        _record(argv)
    except AssertionError:
        return False
    return True


def test_cli_run_then_doctor_last(programs: dict[str, Path]) -> None:
    require_tier("process")
    token = secrets.token_hex(4)
    argv = [str(programs["native"]), "spike", "600", "100", token]
    r = subprocess.run(
        [*TIERBOX, "run", "--tier", "process", "--memory", "64m", "busybox", "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 137, r.stderr
    rec = _record(argv)
    out = subprocess.run(
        [*TIERBOX, "doctor", rec["run_id"], "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["cause"] == "spike"
    assert got["fixes"][0]["tierbox_flags"][0].startswith("--memory")
    text = subprocess.run(
        [*TIERBOX, "doctor", rec["run_id"]], capture_output=True, text=True
    ).stdout
    assert "cause: spike" in text and "kubernetes (strategic merge patch)" in text
    last = subprocess.run([*TIERBOX, "doctor", "--last", "--json"], capture_output=True, text=True)
    assert last.returncode == 0 and "cause" in json.loads(last.stdout)
    missing = subprocess.run([*TIERBOX, "doctor", "no-such-run"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no run or sandbox" in missing.stderr


# ---- endings tierbox did not run ------------------------------------------------------------


def test_pod_oomkilled_and_crashloop() -> None:
    diags, _raw = diagnose(str(DATA / "pod-oomkilled.json"), events=str(DATA / "events.json"))
    (d,) = diags
    assert d.cause is Cause.OOM_KILLED
    assert "2048 MiB" in d.summary and "CrashLoopBackOff" in d.summary
    assert any("OOMKilled (exit code 137)" in f for f in d.findings)
    assert any("OOMKilling" in f and "node-a" in f for f in d.findings)
    assert any("request 1024 MiB < limit 2048 MiB" in f for f in d.findings)
    patch = d.fixes[0].kubernetes_patch
    assert patch is not None
    res = patch["spec"]["template"]["spec"]["containers"][0]
    assert res["name"] == "server" and res["resources"]["limits"]["memory"] == "3072Mi"
    (c,) = diagnose(str(DATA / "pod-crashloop.yaml"))[0]
    assert c.cause is Cause.CRASH_LOOP and "7 restarts" in c.summary and "exit code 1" in c.summary
    out = subprocess.run(
        [*TIERBOX, "doctor", str(DATA / "pod-crashloop.yaml"), "--json"],
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["cause"] == "crash_loop"


def test_docker_inspect_and_cgroup_v2() -> None:
    (d,) = diagnose(str(DATA / "docker-inspect-oom.json"))[0]
    assert d.cause is Cause.OOM_KILLED and "512 MiB" in d.summary
    assert d.fixes[0].tierbox_flags == ["--memory 768m"]
    (c,) = diagnose(str(DATA / "cgroup-v2"))[0]
    assert c.cause is Cause.OOM_KILLED and c.facts["oom_kill"] == 3 and c.facts["version"] == 2
    assert c.facts["cpu_throttled_periods"] == 38 and c.facts["cpus"] == 0.2


# ---- --explain --------------------------------------------------------------------------------


class _Chat(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Chat.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        reply = {
            "choices": [{"message": {"role": "assistant", "content": "It ran out of memory."}}]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def chat_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Chat.seen.clear()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_explain_sends_redacted_facts(chat_server: str) -> None:
    env = {"TIERBOX_LLM_URL": chat_server, "TIERBOX_LLM_MODEL": "tiny", "TIERBOX_LLM_KEY": "k-123"}
    import os

    pod = str(DATA / "pod-oomkilled.json")
    out = subprocess.run(
        [*TIERBOX, "doctor", pod, "--explain"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    assert "explanation:" in out.stdout and "It ran out of memory." in out.stdout
    (req,) = _Chat.seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-123"
    body = req["body"]
    assert body["model"] == "tiny" and [m["role"] for m in body["messages"]] == ["system", "user"]
    sent = json.dumps(body)
    assert "hf_abcdefghijklmnopqrstuvwxyz123456" not in sent  # env value and last-applied copy
    assert "OOMKilled" in sent and "oom_killed" in sent
    # --print-prompt shows the same body and sends nothing
    shown = subprocess.run(
        [*TIERBOX, "doctor", pod, "--print-prompt"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert json.loads(shown.stdout)["messages"][1]["content"] == body["messages"][1]["content"]
    assert len(_Chat.seen) == 1
    inspect = subprocess.run(
        [*TIERBOX, "doctor", str(DATA / "docker-inspect-oom.json"), "--print-prompt"],
        capture_output=True,
        text=True,
    )
    assert (
        "wJalrXUtnFEMI" not in inspect.stdout
        and "AWS_SECRET_ACCESS_KEY=<redacted>" in inspect.stdout
    )


def test_explain_without_endpoint_keeps_the_findings() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERBOX_LLM")}
    out = subprocess.run(
        [*TIERBOX, "doctor", str(DATA / "pod-crashloop.yaml"), "--explain"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0 and "cause: crash_loop" in out.stdout
    assert "TIERBOX_LLM_URL is not set" in out.stderr


def test_redaction() -> None:
    assert ex.redact_text("curl -H 'Authorization: Bearer abc.def' --password=hunter2") == (
        "curl -H 'Authorization: <redacted>' --password=<redacted>"
    )
    red = ex.redact(
        {"env": {"A": "1"}, "argv": ["run", "API_KEY=zzz"], "limits": {"memory_mib": 64}}
    )
    assert red == {
        "env": {"A": "<redacted>"},
        "argv": ["run", "API_KEY=<redacted>"],
        "limits": {"memory_mib": 64},
    }


# ---- the history's bounds ----------------------------------------------------------------------


def test_history_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = history.Series(max_points=50)
    for i in range(10_000):
        s.add(i * 0.1, Stats(memory_bytes=i))
    pts = s.merged()
    assert len(pts) <= 50 + history.TAIL_POINTS
    assert pts[0][0] == 0.0 and pts[-1][0] == pytest.approx(999.9)  # the whole run, and its end
    gaps = {round(b[0] - a[0], 1) for a, b in zip(s.points, s.points[1:], strict=False)}
    assert len(gaps) == 1  # evenly spaced
    monkeypatch.setenv("TIERBOX_HOME", str(tmp_path))
    for i in range(history.MAX_RUNS + 30):
        history.write_record({"format": history.FORMAT, "run_id": f"r{i:04d}", "started_ns": i})
    history.prune()
    left = history.records()
    assert len(left) == history.MAX_RUNS and left[0]["run_id"] == f"r{history.MAX_RUNS + 29:04d}"
    assert (tmp_path / "history").stat().st_mode & 0o077 == 0 or oct(
        (history.history_dir()).stat().st_mode
    ).endswith("700")
