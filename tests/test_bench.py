"""``tierbox bench`` in a tiny mode, on real tiers: the shape of results.json,
every isolation probe answered by an actual run, reports and charts written,
a failing tier reported while the bench goes on, and Ctrl-C leaving nothing."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, leftovers, require_tier
from tierbox.bench.probes import PROBES
from tierbox.bench.report import (
    TERMINAL_COLUMNS,
    claim_rows,
    engine_label,
    render_saved,
    rich_report,
    terminal_rows,
)
from tierbox.bench.stats import percentile, summarize_ms
from tierbox.paths import MARKER, sandboxes_dir

BENCH = [sys.executable, "-m", "tierbox.cli_bench"]
TINY = ["--runs", "2", "--warmup", "0", "--instances", "2", "--density-cap", "3"]
FAST_TIERS = ["process", "container", "wasm"]


def available(names: list[str]) -> list[str]:
    """``names``, each required to run here (a skip says which cannot)."""
    for n in names:
        require_tier(n)
    return names


def bench(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*BENCH, *args], capture_output=True, timeout=timeout)


def _owner(sandbox_id: str) -> int | None:
    try:
        state = json.loads((sandboxes_dir() / sandbox_id / "state.json").read_text())
    except (OSError, ValueError):
        return None
    owner = state.get("owner_pid")
    return int(owner) if owner is not None else None


def assert_no_leaks(before: dict[str, list[str]], bench_pid: int) -> None:
    """Nothing the bench made is left: no sandbox dir it owns, and no cgroup,
    mount or process of a sandbox whose directory is gone. Other engineers'
    tests run on this machine at the same time, so their sandboxes (each with
    a live directory) are not counted; orphans get a few seconds to vanish."""
    deadline = time.monotonic() + 10
    while True:
        now = leftovers()
        new = {k: sorted(set(v) - set(before[k])) for k, v in now.items()}
        live = set(now["dirs"])
        mine = [d for d in new["dirs"] if _owner(d) == bench_pid]
        orphan_cgroups = [c for c in new["cgroups"] if c.split("/", 1)[1] not in live]
        orphan_mounts = [m for m in new["mounts"] if not any(d in m for d in live - set(mine))]
        orphan_procs = []
        for pid in new["processes"]:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            ids = re.findall(rf"{MARKER}-([0-9a-f]{{12}})", cmd)
            if ids and not any(i in live for i in ids):
                orphan_procs.append(pid)
        left = {
            "owned dirs": mine,
            "cgroups": orphan_cgroups,
            "mounts": orphan_mounts,
            "processes": orphan_procs,
        }
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the bench left things behind: {left}")
        time.sleep(0.2)


def bench_clean(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[bytes]:
    """Run the bench and check it left nothing behind."""
    before = leftovers()
    proc = subprocess.Popen([*BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_leaks(before, proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tiny(tmp_path_factory: pytest.TempPathFactory, tiers: list[str]) -> dict[str, Any]:
    if not tiers:
        pytest.skip("none of the tiers is available here")
    out = tmp_path_factory.mktemp("bench")
    r = bench_clean(
        "--tiers", ",".join(tiers), "--workload", "hello", *TINY, "--out", str(out), "--json"
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    printed = json.loads(r.stdout)
    on_disk = json.loads((out / "results.json").read_text())
    return {"printed": printed, "results": on_disk, "out": out, "stderr": r.stderr.decode()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny bench over the fast tiers, shared by the shape tests."""
    return _tiny(tmp_path_factory, available(FAST_TIERS))


def check_stats(s: dict[str, Any], n: int | None = None) -> None:
    assert s["status"] == "ok", s
    assert s["n"] >= 1 and len(s["samples_ms"]) == s["n"]
    if n is not None:
        assert s["n"] == n
    assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p95_ms"] <= s["max_ms"]
    for key in ("mean_ms", "stdev_ms", "iqr_ms", "spread_pct", "outliers", "warmup"):
        assert key in s


def check_tier(name: str, t: dict[str, Any], machine: dict[str, Any]) -> None:
    assert t["tier"] == name
    assert t["status"] in ("ok", "partial"), (t["status"], t["error"], t["errors"])
    assert t["availability"]["available"] is True
    assert t["isolation_claimed"]
    check_stats(t["cold_start"]["hello"], n=2)
    cs = t["cold_start"]["hello"]
    assert cs["warmup"] == 0
    for part in ("create_ms", "first_exec_ms"):
        assert cs[part]["n"] == 2
    check_stats(t["exec_latency"]["hello"])
    ws = t["warm_start"]
    if ws["status"] == "ok":
        check_stats(ws)
    else:
        assert ws["status"] == "n/a" and ws["reason"].startswith("n/a: "), ws
    mem = t["memory"]
    assert mem["status"] == "ok", mem
    assert mem["method"]
    points = [c["instances"] for c in mem["checkpoints"]]
    assert points[:2] == [1, 2], points
    for c in mem["checkpoints"]:
        assert c["avg_bytes"] >= 0 and c["total_bytes"] >= 0
    assert mem["idle_pss_bytes"] is not None
    den = t["density"]
    assert den["status"] == "ok", den
    assert den["fit"] >= 1 and den["budget_bytes"] == 2 << 30
    assert den["bound"] in ("budget", "cap", "time", "host memory", "error")
    assert den["stop_reason"]
    assert sum(t["terminations"].values()) >= 4


def check_probes(name: str, iso: dict[str, Any]) -> None:
    """Every probe has a value that came from an actual run inside the tier."""
    assert iso["status"] == "ok", iso
    probes = iso["probes"]
    assert set(probes) == set(PROBES)
    for p in PROBES:
        v = probes[p]
        assert v["value"] and v["detail"], (name, p, v)
        if v["value"] == "n/a":
            # only where the interface does not exist at all, or (the file race) where
            # files do not go through the host, with the reason
            if name == "wasm":
                assert "no such interface in WASI" in v["reason"], (p, v)
            else:
                assert p == "file_race" and name in ("microvm", "vm"), (name, p, v)
                assert v["reason"].startswith("not applicable: files go through the guest agent")
            assert v["contained"] is None
            continue
        run = v["run"]
        assert run is not None, (name, p, v)
        assert run["termination"] in ("exited", "oom_killed", "signaled", "timed_out")
        assert run["duration_ms"] > 0
        assert isinstance(v["contained"], bool), (name, p, v)
    s = iso["summary"]
    assert s["measured"] + len(s["not_measured"]) == len(PROBES)
    assert s["text"].startswith(f"{s['contained']}/{s['measured']} contained")


def test_results_json_shape(tiny: dict[str, Any]) -> None:
    res = tiny["results"]
    assert res == tiny["printed"]
    assert res["schema"] == "tierbox-bench/1"
    assert res["duration_s"] > 0 and res["started_at"] and res["finished_at"]
    assert res["config"]["runs"] == 2 and res["config"]["warmup"] == 0
    m = res["machine"]
    assert m["cores"] >= 1 and m["memory_total_bytes"] > 0 and m["kernel"]
    assert m["accelerator"]["kind"] in ("KVM", "TCG", "unknown") and m["accelerator"]["source"]
    assert set(m["engines"]) >= set(FAST_TIERS)
    for name in available(FAST_TIERS):
        assert m["engines"][name]["available"]
        check_tier(name, res["tiers"][name], m)


def test_every_probe_answered_by_a_run(tiny: dict[str, Any]) -> None:
    for name, t in tiny["results"]["tiers"].items():
        check_probes(name, t["isolation"])


def test_probe_values_differ_where_isolation_differs(tiny: dict[str, Any]) -> None:
    tiers = tiny["results"]["tiers"]
    assert set(FAST_TIERS) <= set(tiers), sorted(tiers)
    if "process" in tiers:
        p = tiers["process"]["isolation"]["probes"]
        assert p["host_pids"]["contained"] is False  # the host canary is visible
        assert p["host_file"]["contained"] is False
        # network="none" (the bench's policy): a namespace holding only lo
        assert p["network"]["contained"] is True, p["network"]
        assert p["kernel"]["value"] == "shared"
        for attack in ("userns", "keyring"):  # the host kernel: open wherever it works
            assert p[attack]["contained"] is (p[attack]["value"] == "refused"), p[attack]
        assert p["file_race"]["contained"] is True, p["file_race"]
    if "container" in tiers:
        p = tiers["container"]["isolation"]["probes"]
        assert p["host_pids"]["contained"] is True
        assert p["host_file"]["contained"] is True
        assert p["network"]["contained"] is True
        assert p["privileges"]["value"] == "unprivileged"
        assert p["memory_limit"]["value"].startswith("oom_killed")
        # the seccomp profile refuses user namespaces and the keyring
        assert p["userns"]["value"] == "refused" and "EPERM" in p["userns"]["detail"]
        assert p["keyring"]["value"] == "refused" and "EPERM" in p["keyring"]["detail"]
        race = p["file_race"]
        assert race["contained"] is True and race["value"].startswith("0 leaks in ")
        assert int(race["value"].split()[3]) > 100  # the host really kept reading
        assert race["run"]["argv"].startswith("swaprace")
    if "wasm" in tiers:
        p = tiers["wasm"]["isolation"]["probes"]
        if p["host_file"]["value"] != "not measured":
            assert p["host_file"]["contained"] is True
            assert p["memory_limit"]["value"].startswith("oom_killed")
            for attack in ("userns", "keyring", "file_race"):
                assert p[attack]["value"] == "n/a" and p[attack]["contained"] is None


def test_claims_rows(tiny: dict[str, Any]) -> None:
    claims = {c["id"]: c for c in tiny["results"]["claims"]}
    assert {"vm_start", "container_start", "microvm_start", "wasm_start", "wasm_memory"} <= set(
        claims
    )
    for c in claims.values():
        assert c["claimed"] and c["measured"] and c["ratio"]
        assert c["status"] in ("measured", "not measurable here", "not run")
    if "container" in tiny["results"]["tiers"]:
        c = claims["container_start"]
        assert c["status"] == "measured" and c["measured_ms"] > 0
        assert c["ratio_to_high"] == pytest.approx(c["measured_ms"] / 500)
    # vm and microvm were not selected: the cells say so instead of a number
    assert claims["vm_start"]["measured"].startswith("not measured")


def test_reports_and_charts_written(tiny: dict[str, Any]) -> None:
    out: Path = tiny["out"]
    md = (out / "report.md").read_text()
    assert "## Claimed vs measured here" in md and "## Machine" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "</html>" in html
    for png in ("start_latency.png", "memory.png", "memory_scaling.png", "density.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png in md and png in html


def test_table_is_printed(tmp_path: Path) -> None:
    """On a pipe: the 100-column layout, a progress line per step, and the
    report written to the default place, whose path and file:// link are
    printed; ``bench open`` finds it there."""
    available(["process"])
    env = {**os.environ, "TIERBOX_BENCH_DIR": str(tmp_path), "BROWSER": "true"}
    r = subprocess.run(
        [*BENCH, "--tiers", "process", "--workload", "hello", "--no-probes", *TINY],
        capture_output=True,
        timeout=280,
        env=env,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    text = r.stdout.decode()
    for header in ("cold start", "other start", "mem/inst", "density", "claimed vs measured"):
        assert header in text, text
    assert "machine:" in text and "cores" in text
    assert max(len(line) for line in text.splitlines()) <= 100, text
    err = r.stderr.decode()
    assert "process    cold start (hello) (2 runs) ..." in err, err
    latest = tmp_path / "latest" / "report.html"
    assert f"report: {latest}" in err and latest.as_uri() in err, err
    assert latest.is_file() and (tmp_path / "latest").resolve().name.startswith("run-")
    for name in ("report.md", "results.json", "start_latency.png", "density.png"):
        assert (tmp_path / "latest" / name).is_file(), name
    opened = subprocess.run([*BENCH, "open"], capture_output=True, timeout=60, env=env)
    assert opened.returncode == 0 and latest.as_uri() in opened.stderr.decode()
    helped = subprocess.run([*BENCH, "--help"], capture_output=True, timeout=60, env=env)
    assert "$TIERBOX_HOME/bench/run-" in " ".join(helped.stdout.decode().split())


def test_unknown_tier_is_a_usage_error() -> None:
    r = bench("--tiers", "nosuch")
    assert r.returncode == 2
    assert b"unknown tier" in r.stderr


def test_failing_tier_is_reported_and_the_bench_goes_on() -> None:
    """A real failure (an image the store does not have) fails the container
    tier with its error; the process tier after it still runs."""
    tiers = available(["process", "container"])
    if tiers != ["process", "container"]:
        pytest.skip("needs the process and container tiers")
    r = bench_clean(
        "--tiers",
        "container,process",
        "--workload",
        "hello",
        "--image",
        "container=nosuch-image:latest",
        "--no-probes",
        *TINY,
        "--json",
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads(r.stdout)
    c = res["tiers"]["container"]
    assert c["status"] == "failed"
    assert "nosuch-image" in c["error"]
    assert c["cold_start"]["hello"]["status"] == "failed"
    assert res["tiers"]["process"]["status"] == "ok"
    assert "container: failed" in r.stderr.decode()


@pytest.mark.parametrize("delay_s", [0.0, 0.13, 0.31, 0.57])
def test_ctrl_c_closes_every_sandbox(delay_s: float) -> None:
    """Interrupted at different points (creating, running, closing): the bench
    still closes every sandbox, then exits 130."""
    if not available(["container"]):
        pytest.skip("container tier unavailable")
    before = leftovers()
    proc = subprocess.Popen(
        [*BENCH, "--tiers", "container", "--workload", "hello", "--runs", "200", "--warmup", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline and proc.poll() is None:
            now = leftovers()
            new = set(now["cgroups"]) - set(before["cgroups"])
            # only the bench's own sandboxes count: other tests on this host make theirs
            if any(_owner(c.split("/", 1)[-1]) == proc.pid for c in new):
                seen = True
                break
            time.sleep(0.05)
        assert seen, "the bench never started a sandbox"
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"interrupted" in err
    assert_no_leaks(before, proc.pid)


@pytest.mark.slow
def test_tiny_bench_on_every_available_tier(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Slow tiers too (gVisor, microVM under TCG): same shape, same probe rule."""
    names = available(["gvisor", "microvm", "vm"])
    got = _tiny(tmp_path_factory, names)
    res = got["results"]
    for name in names:
        check_tier(name, res["tiers"][name], res["machine"])
        check_probes(name, res["tiers"][name]["isolation"])
    assert set(names) <= set(res["tiers"]), sorted(res["tiers"])
    if "gvisor" in names:
        p = res["tiers"]["gvisor"]["isolation"]["probes"]
        assert p["file_race"]["contained"] is True, p["file_race"]
        assert p["userns"]["contained"] is True and p["keyring"]["contained"] is True
    if "microvm" in names:
        p = res["tiers"]["microvm"]["isolation"]["probes"]
        assert p["kernel"]["value"] == "own"
        assert p["file_race"]["value"] == "n/a"
        assert p["userns"]["contained"] is True and p["keyring"]["contained"] is True
        assert res["tiers"]["microvm"]["warm_start"]["status"] == "ok"


def test_percentiles_and_spread() -> None:
    assert percentile([1.0], 95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    s = summarize_ms([0.010, 0.011, 0.012, 0.013, 0.100], warmup=2)
    assert s["n"] == 5 and s["warmup"] == 2
    assert s["p50_ms"] == pytest.approx(12.0)
    assert s["outliers"] == 1  # 100 ms is far beyond Q3 + 1.5 IQR
    assert s["p95_ms"] > s["p50_ms"]
    assert summarize_ms([])["n"] == 0


# ---------------------------------------------------------------- the report a person reads

#: results.json of a real ``make run`` on the reference machine (2 cores,
#: Debian 12, microVM and VM under TCG); the README's table and chart come from it.
SAVED = ROOT / "docs" / "bench" / "results.json"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHART_FILES = ("start_latency.png", "memory.png", "memory_scaling.png", "density.png")


def _driver() -> Any:
    """Debian's chromium, headless, through Debian's chromium-driver (as the
    dashboard tests drive it: no browser download)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (make setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tierbox-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.tierbox_profile = profile
    return driver


def check_report_in_browser(report_dir: Path, tiers: list[str]) -> None:
    """The page a person opens: the summary table with a row per tier, four
    charts that loaded with their titles and axis labels, no "~0" anywhere."""
    from selenium.webdriver.common.by import By

    driver = _driver()
    try:
        driver.get((report_dir / "report.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table#summary tr")
        assert len(rows) == len(tiers) + 1, [r.text for r in rows]
        shown = [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:]]
        assert [s.split()[0] for s in shown] == tiers, shown
        assert driver.find_elements(By.CSS_SELECTOR, "table#claims tr")
        figures = driver.find_elements(By.CSS_SELECTOR, "figure.chart")
        files = [f.find_element(By.TAG_NAME, "img").get_attribute("src") for f in figures]
        assert [Path(str(f)).name for f in files] == list(CHART_FILES), files
        for f in figures:
            img = f.find_element(By.TAG_NAME, "img")
            assert driver.execute_script("return arguments[0].naturalWidth", img) > 100, files
            title = f.find_element(By.CSS_SELECTOR, "figcaption .title").text
            x = f.find_element(By.CSS_SELECTOR, "figcaption .axis.x").text
            y = f.find_element(By.CSS_SELECTOR, "figcaption .axis.y").text
            assert title and len(x) > len("x: ") and len(y) > len("y: "), (title, x, y)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "~0" not in body
        shot = report_dir / "report-screenshot.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
        shutil.rmtree(driver.tierbox_profile, ignore_errors=True)


def test_report_in_a_browser(tiny: dict[str, Any]) -> None:
    """The report the tiny bench wrote, as a person sees it."""
    check_report_in_browser(tiny["out"], list(tiny["results"]["tiers"]))


def test_saved_real_run_renders_in_a_browser(tmp_path: Path) -> None:
    """The whole ladder (VMs included) from the saved real run, rendered again."""
    render_saved(SAVED, tmp_path)
    results = json.loads(SAVED.read_text())
    check_report_in_browser(tmp_path, list(results["tiers"]))


def test_saved_run_names_each_start_and_marks_kvm_claims() -> None:
    """A VM's template restore and a microVM's clone are named apart from the
    cold boot, and claims that hold only on KVM say so, once, in a footnote."""
    results = json.loads(SAVED.read_text())
    vm = results["tiers"]["vm"]
    assert vm["cold_start"]["hello"]["kind"] == "cold boot"
    assert vm["template_restore"]["hello"]["kind"] == "template restore"
    assert vm["cold_start"]["hello"]["p50_ms"] > vm["template_restore"]["hello"]["p50_ms"]
    assert results["tiers"]["microvm"]["warm_start"]["label"] == "clone from a booted snapshot"
    rows, notes = claim_rows(results)
    kvm = [r for r in rows if "(KVM claim)" in r[1]]
    assert {r[0] for r in kvm} == {"Full VM start", "MicroVM start"}
    assert len(notes) == 1 and all(r[1].endswith("[1]") for r in kvm)
    vm_claim = next(r for r in rows if r[0] == "Full VM start")
    assert "cold boot" in vm_claim[2] and "template restore" in vm_claim[2]
    micro = next(r for r in rows if r[0] == "MicroVM start")
    assert "clone from a booted snapshot" in micro[2]
    term, _notes = terminal_rows(results)
    by_tier = {r[0].rstrip("*"): r for r in term}
    assert by_tier["vm"][2].startswith("template ") and by_tier["microvm"][2].startswith("clone ")


def test_labels_say_each_thing_once() -> None:
    results = json.loads(SAVED.read_text())
    engines = results["machine"]["engines"]
    assert engine_label(engines["container"]) == engines["container"]["version"]
    assert "crun crun" not in engine_label(engines["container"])
    assert re.fullmatch(r"libvirt \S+ \+ QEMU \d+\.\d+\.\d+", engine_label(engines["vm"]))
    bomb = results["tiers"]["gvisor"]["isolation"]["probes"]["memory_limit"]
    ev = bomb["run"]["evidence"] if bomb.get("run") else {}
    if "engine_overhead_mib" in ev and "cgroup_limit_mib" in ev:
        really = ev["cgroup_limit_mib"] - ev["engine_overhead_mib"]
        assert f"at ~{really:.0f} MiB" in bomb["value"], bomb


def test_terminal_fits_100_columns_without_breaking_words() -> None:
    """The terminal view of the whole ladder: no line over 100 columns, and
    every word on screen is a whole word of some cell (none cut in two)."""
    from rich.console import Console

    results = json.loads(SAVED.read_text())
    console = Console(width=TERMINAL_COLUMNS, record=True, file=io.StringIO())
    console.print(rich_report(results))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= TERMINAL_COLUMNS
    rows, notes = terminal_rows(results)
    crows, cnotes = claim_rows(results)
    cells = [c for r in rows + crows for c in r] + notes + cnotes
    words = {w for c in cells for w in c.split()}
    table = text[text.index(" tier ") : text.index("cold start = ")]
    for token in table.split():
        if set(token) <= set("─━┃│┏┓┗┛┡┩╇╈┳┻━"):
            continue
        assert token in words or token in (
            "tier",
            "cold",
            "start",
            "other",
            "exec",
            "mem/inst",
            "density",
            "isolation",
        ), token
    assert text.count("KVM claim: the claimed figure holds only on KVM") == 1
