# Over 600 lines: every table and chart of docs/benchmarks.md, generated in one place.
"""Writes ``docs/benchmarks.md`` and ``docs/images/bench-*.png`` from the result
files in ``benchmarks/results/`` (run by ``run.py`` at its end, or alone):

    .venv/bin/python -m benchmarks.report

The analysis written by hand (causes found by profiling, proposals) lives in
``benchmarks/notes.md`` and is copied into the page as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, SYSTEMS

DOC = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "images"
NOTES = Path(__file__).resolve().parent / "notes.md"
HAND_BEGIN = "<!-- hand-written: benchmarks/report.py keeps this part as it is -->"
HAND_END = "<!-- end of the hand-written part -->"
LABEL = {"orchestratr": "OrchestratR", "celery": "Celery", "dramatiq": "Dramatiq"}
COLOR = {"orchestratr": "#1f77b4", "celery": "#2ca02c", "dramatiq": "#d62728", "floor": "#7f7f7f"}


REQUIRED = {
    "failover": "floor",
    "silent_loss": "variants",
    "latency": "systems",
    "throughput": "sizes",
    "footprint": "systems",
    "manager_load": "variants",
}


def load(name: str) -> dict[str, Any] | None:
    """A result file, or None when it is missing or of an older layout."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if REQUIRED[name] not in doc:
        print(f"skipping {path}: older layout (run that scenario again)")
        return None
    return doc


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "bytes":
        return f"{value / 1024:.1f} KiB" if value < 10 * 2**20 else f"{value / 2**20:.0f} MiB"
    if unit.startswith("%"):
        return f"{value:.1f} %"
    return f"{value:.3g}"


def cell(fig: dict[str, Any] | None, *, p99: bool = True) -> str:
    if not fig or not fig.get("n"):
        return "-"
    unit = fig["unit"]
    text = f"**{fmt(fig['median'], unit)}**"
    if p99 and fig["n"] > 1:
        text += f" (p99 {fmt(fig['p99'], unit)}, max {fmt(fig['max'], unit)}, n={fig['n']})"
    return text


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or not a.get("n") or not b.get("n") or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.2f}x"


def fig_of(doc: dict[str, Any] | None, system: str, key: str) -> dict[str, Any] | None:
    if not doc:
        return None
    return doc.get("systems", {}).get(system, {}).get("figures", {}).get(key)


def header(doc: dict[str, Any]) -> str:
    m, v = doc["machine"], doc.get("versions", {})
    broker = f"RabbitMQ {v.get('rabbitmq', '?')} on 127.0.0.1:{v.get('rabbitmq_port', 5672)}"
    if v.get("rabbitmq_node") not in (None, "default node"):
        broker += f" (node {v['rabbitmq_node']} of the benchmarks' own)"
    return (
        f"*{broker}. Measured {m['at']} ({doc.get('mode', '?')} mode, "
        f"{doc.get('duration_s', '?')} s), "
        f"load average before {doc.get('load_average_before')}, after "
        f"{m['load_average']}. Command: `{doc.get('command')}`; sizes: "
        f"`{json.dumps(doc.get('config'))}`.*"
    )


def measured_note(part: dict[str, Any]) -> str:
    m = part.get("measured")
    if not m:
        return ""
    return (
        f" *(measured {m['at']}, {m['mode']} mode, load average {m['load_average_before']} "
        f"before, {m['load_average_after']} after; `{m['command']}`)*"
    )


# -- charts ----------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_failover(doc: dict[str, Any]) -> str | None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names, medians, p99s = [], [], []
    floor = doc["floor"]["quorum_s"]
    for name in [*SYSTEMS, "floor"]:
        f = floor if name == "floor" else fig_of(doc, name, "total_s")
        if f and f.get("n"):
            names.append(name)
            medians.append(f["median"])
            p99s.append(f["max"])
    x = range(len(names))
    left.bar(x, medians, color=[COLOR[n] for n in names])
    upper = [p - m for p, m in zip(p99s, medians, strict=True)]
    left.errorbar(x, medians, yerr=[[0] * len(names), upper], fmt="none", ecolor="black", capsize=4)
    left.set_xticks(list(x), [LABEL.get(n, "bare broker\n(quorum)") for n in names])
    left.set_ylabel("seconds (median, bar to max)")
    left.set_title(f"kill -9 of a worker with ~{doc['per_worker']} jobs: all moved")
    for name in SYSTEMS:
        f = fig_of(doc, name, "per_job_s")
        if f and f.get("n"):
            values = sorted(f["samples"])
            right.plot(values, [i / len(values) for i in range(1, len(values) + 1)],
                       label=LABEL[name], color=COLOR[name])  # fmt: skip
    right.set_xlabel("seconds from kill -9 to the job's first line elsewhere")
    right.set_ylabel("share of the dead worker's jobs")
    right.set_title("per-job distribution (all runs)")
    right.legend()
    right.grid(alpha=0.3)
    return _save(plt, fig, "bench-failover.png")


def chart_silent(doc: dict[str, Any]) -> str | None:
    plt = _plt()
    settings = list(doc["variants"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        systems = doc["variants"][setting]["systems"]
        names = [n for n in SYSTEMS if n in systems]
        med, unfinished = [], []
        for n in names:
            total = systems[n]["figures"]["total_s"].get("median")
            observed = [r.get("observed_s", 0) for r in systems[n]["runs"] if isinstance(r, dict)]
            unfinished.append(total is None)
            med.append(total if total is not None else max(observed, default=0))
        bars = ax.bar(range(len(names)), med, color=[COLOR[n] for n in names])
        for i, n in enumerate(names):
            dup = systems[n]["figures"]["second_copies"]
            text = f"2nd copies: {dup.get('median', '?'):g}" if dup.get("n") else ""
            if unfinished[i]:
                bars[i].set_hatch("//")
                bars[i].set_alpha(0.5)
                text = f"NOT all moved\nin {med[i]:.0f} s; " + text
            ax.text(i, med[i], f"hb {systems[n]['heartbeat_s']} s\n{text}", ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(names)), [LABEL[n] for n in names])
        ax.set_ylabel("seconds until all its jobs run elsewhere (median)")
        ax.set_title(f"silent partition, {setting} settings")
        ax.margins(y=0.25)
    return _save(plt, fig, "bench-silent-loss.png")


def chart_latency(doc: dict[str, Any]) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in SYSTEMS:
        f = fig_of(doc, name, "latency_ms")
        if f and f.get("n"):
            values = sorted(f["samples"])
            label = f"{LABEL[name]} (median {f['median']:.1f} ms)"
            shares = [i / len(values) for i in range(1, len(values) + 1)]
            ax.plot(values, shares, label=label, color=COLOR[name])
    ax.axvline(10, color="grey", linestyle="--", label="goal: median 10 ms")
    ax.set_xscale("log")
    ax.set_xlabel("ms from submit to the job's first line (log)")
    ax.set_ylabel("share of jobs")
    ax.set_title("start latency, one job at a time")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, "bench-latency.png")


def chart_throughput(doc: dict[str, Any]) -> str | None:
    plt = _plt()
    sizes = list(doc["sizes"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(SYSTEMS)
    for i, name in enumerate(SYSTEMS):
        vals = []
        for size in sizes:
            f = doc["sizes"][size].get(name, {}).get("figures", {}).get("all_running_s", {})
            vals.append(f.get("median") or 0)
        ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=LABEL[name],
               color=COLOR[name])  # fmt: skip
    ax.set_xticks([j + width for j in range(len(sizes))], [f"{int(s):,} jobs" for s in sizes])
    ax.set_ylabel("seconds until all run (median; 0 = could not)")
    ax.set_title("allocation: create N jobs, time until every one runs")
    ax.legend()
    return _save(plt, fig, "bench-throughput.png")


def chart_footprint(doc: dict[str, Any], manager: dict[str, Any] | None) -> str | None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in SYSTEMS if fig_of(doc, n, "rss_per_job_bytes")]
    rss = [(fig_of(doc, n, "rss_per_job_bytes") or {}).get("median", 0) / 1024 for n in names]
    cpu = [(fig_of(doc, n, "idle_cpu_pct") or {}).get("median", 0) for n in names]
    left.bar(range(len(names)), rss, color=[COLOR[n] for n in names])
    left.axhline(10, color="grey", linestyle="--", label="goal: 10 KB")
    left.set_xticks(range(len(names)), [LABEL[n] for n in names])
    left.set_ylabel("KiB of RSS per idle running job")
    left.set_title(f"memory, {doc['jobs']:,} jobs on one worker")
    left.legend()
    labels = [LABEL[n] for n in names]
    colors = [COLOR[n] for n in names]
    for variant in (manager or {}).get("variants", {}).values():
        f = variant["figures"]["manager_cpu_pct"]
        if f.get("n"):
            interval = variant["server_heartbeat_interval_s"]
            jobs = variant.get("jobs", 0)
            labels.append(f"manager,\n{jobs:,} jobs,\nbeats {interval:g} s")
            cpu.append(f["median"])
            colors.append("#9467bd")
    right.bar(range(len(labels)), cpu, color=colors)
    right.axhline(5, color="grey", linestyle="--", label="goal: 5 % (worker)")
    right.set_xticks(range(len(labels)), labels)
    right.set_ylabel("% of one core while jobs idle")
    right.set_title(f"idle CPU of the worker ({doc['jobs']:,} jobs)")
    right.legend()
    return _save(plt, fig, "bench-footprint.png")


def _save(plt: Any, fig: Any, name: str) -> str:
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(IMAGES / name, dpi=110)
    plt.close(fig)
    return f"images/{name}"


# -- the page ---------------------------------------------------------------------------------


def section_failover(doc: dict[str, Any]) -> list[str]:
    floor_q, floor_c = doc["floor"]["quorum_s"], doc["floor"]["classic_s"]
    orx = fig_of(doc, "orchestratr", "total_s")
    out = [
        "## 1. Failover after `kill -9`",
        "",
        doc["what"] + f"; {doc['per_worker']} jobs per worker, capacity 1.5x that.",
        "",
        header(doc),
        "",
        "| | total (all jobs moved) | per job | vs OrchestratR | vs floor (same queue type) |",
        "|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        total = fig_of(doc, name, "total_s")
        floor = floor_c if name == "dramatiq" else floor_q
        out.append(
            f"| {LABEL[name]} | {cell(total)} | {cell(fig_of(doc, name, 'per_job_s'))} | "
            f"{ratio(total, orx)} | {ratio(total, floor)} |"
        )
    out += [
        f"| bare broker, quorum queue | {cell(floor_q)} | | {ratio(floor_q, orx)} | 1x |",
        f"| bare broker, classic queue | {cell(floor_c)} | | {ratio(floor_c, orx)} | 1x |",
        "",
        "Dramatiq can only use classic queues, so its floor is the classic one; OrchestratR's "
        "and Celery's jobs queues are quorum queues.",
        "",
    ]
    return out


def section_silent(doc: dict[str, Any]) -> list[str]:
    out = ["## 2. Silent partition (no FIN, no RST)", "", doc["what"] + ".", "", header(doc), ""]
    for setting, body in doc["variants"].items():
        systems = body["systems"]
        orx = systems.get("orchestratr", {}).get("figures", {}).get("total_s")
        out += [
            f"**{setting} settings** "
            + (
                "(AMQP heartbeat 5 s for all three: RabbitMQ's docs warn against less)"
                if setting == "tight"
                else "(each system's default AMQP heartbeat)"
            )
            + measured_note(body),
            "",
            "| | heartbeat | all jobs moved | vs OrchestratR | jobs with a 2nd copy | "
            "longest 2-copy overlap | partitioned copies stopped after |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in SYSTEMS:
            if name not in systems:
                continue
            f = systems[name]["figures"]
            stale = systems[name]["runs"]
            still = [r.get("old_copies_still_running") for r in stale if isinstance(r, dict)]
            stopped = cell(f["old_copy_stopped_s"], p99=False)
            overlap = cell(f["second_copy_overlap_s"], p99=False)
            if stopped == "-" and any(still):
                stopped = "never (still running when the partitioned worker was killed)"
                overlap = f"from the move until killed (>= {overlap}; observed 3 s)"
            out.append(
                f"| {LABEL[name]} | {systems[name]['heartbeat_s']} s | {cell(f['total_s'])} | "
                f"{ratio(f['total_s'], orx)} | {cell(f['second_copies'], p99=False)} | "
                f"{overlap} | {stopped} |"
            )
        out.append("")
    return out


def section_latency(doc: dict[str, Any]) -> list[str]:
    orx = fig_of(doc, "orchestratr", "latency_ms")
    out = [
        "## 3. Start latency",
        "",
        doc["what"] + ".",
        "",
        header(doc),
        "",
        "| | submit -> first line (median, p99, max) | median of run medians | vs OrchestratR |",
        "|---|---|---|---|",
    ]
    for name in SYSTEMS:
        f = fig_of(doc, name, "latency_ms")
        out.append(
            f"| {LABEL[name]} | {cell(f)} | {cell(fig_of(doc, name, 'run_medians_ms'))} | "
            f"{ratio(f, orx)} |"
        )
    out.append("")
    return out


def section_throughput(doc: dict[str, Any]) -> list[str]:
    out = [
        "## 4. Allocation throughput",
        "",
        doc["what"] + ".",
        "",
        header(doc),
        "",
        "| jobs | | all running | of which submitting | vs OrchestratR |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for size, systems in doc["sizes"].items():
        if systems.get("measured"):
            notes.append(f"{int(size):,} jobs:{measured_note(systems)}")
        orx = systems.get("orchestratr", {}).get("figures", {}).get("all_running_s")
        for name in SYSTEMS:
            if name not in systems:
                continue
            f = systems[name]["figures"]
            errors = [r["error"] for r in systems[name]["runs"] if "error" in r]
            text = cell(f["all_running_s"])
            if text == "-" and errors:
                text = f"could not: {errors[0][:160]}"
            out.append(
                f"| {int(size):,} | {LABEL[name]} | {text} | {cell(f['submit_s'], p99=False)} | "
                f"{ratio(f['all_running_s'], orx)} |"
            )
    out.append("")
    out += [f"- {n}" for n in notes]
    out.append("")
    return out


def section_footprint(doc: dict[str, Any], manager: dict[str, Any] | None) -> list[str]:
    orx_rss = fig_of(doc, "orchestratr", "rss_per_job_bytes")
    orx_cpu = fig_of(doc, "orchestratr", "idle_cpu_pct")
    out = [
        "## 5. Footprint",
        "",
        doc["what"] + f"; {doc['jobs']:,} jobs, CPU window {doc['window_s']} s.",
        "",
        header(doc),
        "",
        "| | RSS per idle job | vs OrchestratR | (delta from the idle worker) "
        "| idle CPU of the worker | vs OrchestratR |",
        "|---|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        rss, cpu = fig_of(doc, name, "rss_per_job_bytes"), fig_of(doc, name, "idle_cpu_pct")
        delta = fig_of(doc, name, "rss_delta_per_job_bytes")
        out.append(
            f"| {LABEL[name]} | {cell(rss)} | {ratio(rss, orx_rss)} | {cell(delta, p99=False)} "
            f"| {cell(cpu)} | {ratio(cpu, orx_cpu)} |"
        )
    out.append("")
    if manager:
        out += section_manager(manager)
    return out


def section_manager(manager: dict[str, Any]) -> list[str]:
    out = [
        "## 6. Manager load",
        "",
        manager["what"] + f"; {manager['jobs']:,} jobs, window {manager['window_s']} s.",
        "",
        header(manager),
        "",
        "| jobs | server heartbeat every | job entries offered | manager CPU | keeps up | "
        "events backlog growth | manager RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in manager["variants"].values():
        f = variant["figures"]
        interval = variant["server_heartbeat_interval_s"]
        jobs = variant.get("jobs", manager["jobs"])
        keeps = variant.get("keeps_up", [])
        out.append(
            f"| {jobs:,} | {interval:g} s | {jobs / interval:,.0f}/s | "
            f"{cell(f['manager_cpu_pct'])} | {sum(keeps)} of {len(keeps)} runs | "
            f"{cell(f['backlog_growth_per_min'], p99=False)} messages/min | "
            f"{cell(f['manager_rss_bytes'], p99=False)} |"
        )
    for name, why in manager.get("cannot", {}).items():
        out.append(f"| {LABEL[name]}: cannot | {why} | | | | | |")
    out.append("")
    return out


def _med(f: dict[str, Any] | None) -> float | None:
    return f["median"] if f and f.get("n") else None


def section_goals(docs: dict[str, dict[str, Any] | None]) -> list[str]:
    """The project's goals against the medians measured (OrchestratR)."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**missed**")

    fo = docs["failover"]
    if fo:
        orx = _med(fig_of(fo, "orchestratr", "total_s"))
        floor = _med(fo["floor"]["quorum_s"])
        peers = [_med(fig_of(fo, n, "total_s")) for n in ("celery", "dramatiq")]
        if orx is not None and floor:
            rows.append(
                (
                    f"failover ({fo['per_worker']:,} jobs) within 2x the broker's floor",
                    f"{orx:.3f} s vs floor {floor:.3f} s = {orx / floor:.2f}x",
                    verdict(orx <= 2 * floor),
                )
            )
        if orx is not None and all(p is not None for p in peers):
            rows.append(
                (
                    "failover faster than Celery and Dramatiq",
                    f"{orx:.3f} s vs Celery {peers[0]:.3f} s, Dramatiq {peers[1]:.3f} s",
                    verdict(all(orx < p for p in peers if p is not None)),
                )
            )
    sl = docs["silent_loss"]
    if sl:
        for variant, body in sl["variants"].items():
            orx_sys = body["systems"].get("orchestratr")
            if not orx_sys:
                continue
            total = _med(orx_sys["figures"]["total_s"])
            dup = orx_sys["figures"]["second_copies"]
            goal = "under 10 s" if variant == "default" else "(no time goal)"
            rows.append(
                (
                    f"silent partition, {variant} settings: {goal}, no second copy",
                    f"{total:.1f} s, second copies: max {dup.get('max', '?')}"
                    if total is not None
                    else "-",
                    verdict(
                        None
                        if total is None
                        else ((total < 10 or variant != "default") and not dup.get("max"))
                    ),
                )
            )
    la = docs["latency"]
    if la:
        f = fig_of(la, "orchestratr", "latency_ms")
        if f and f.get("n"):
            rows.append(
                (
                    "start latency median under 10 ms",
                    f"median {f['median']:.2f} ms, p99 {f['p99']:.1f} ms",
                    verdict(f["median"] < 10),
                )
            )
    tp = docs["throughput"]
    if tp:
        for size, systems in tp["sizes"].items():
            f = systems.get("orchestratr", {}).get("figures", {}).get("all_running_s")
            runs = systems.get("orchestratr", {}).get("runs", [])
            if int(size) == 10000 and f and f.get("n"):
                rows.append(
                    ("10,000 jobs all running in under 10 s", f"{f['median']:.1f} s",
                     verdict(f["median"] < 10))
                )  # fmt: skip
            if int(size) == 100000:
                ok = bool(f and f.get("n"))
                rows.append(
                    (
                        "100,000 concurrent jobs on this machine at all",
                        f"{f['median']:.0f} s" if ok else "could not (see scenario 4)",
                        verdict(ok) if runs else "-",
                    )
                )
    fp = docs["footprint"]
    if fp:
        rss = _med(fig_of(fp, "orchestratr", "rss_per_job_bytes"))
        cpu = _med(fig_of(fp, "orchestratr", "idle_cpu_pct"))
        if rss is not None:
            rows.append(
                ("under 10 KB per idle job", f"{rss / 1024:.1f} KiB ({fp['jobs']:,} jobs)",
                 verdict(rss < 10 * 1024))
            )  # fmt: skip
        if cpu is not None:
            rows.append(
                (
                    f"idle CPU under 5 % of a core ({fp['jobs']:,} jobs on one server)",
                    f"{cpu:.1f} %",
                    verdict(cpu < 5) if fp["jobs"] >= 10000 else "(needs 10,000 jobs)",
                )
            )
    ml = docs["manager_load"]
    if ml:
        for variant in ml["variants"].values():
            f = variant["figures"]["manager_cpu_pct"]
            keeps = variant.get("keeps_up", [])
            if f.get("n"):
                rows.append(
                    (
                        f"manager with {variant.get('jobs', ml['jobs']):,} jobs, server "
                        "heartbeat every "
                        f"{variant['server_heartbeat_interval_s']:g} s (no numeric goal)",
                        f"{f['median']:.0f} % of a core, keeps up in {sum(keeps)} of "
                        f"{len(keeps)} runs",
                        "-",
                    )
                )
    generated = {goal for goal, _, _ in rows}
    rows += [row for row in goal_rows_on_page() if row[0] not in generated]
    if not rows:
        return []
    out = ["## Goals (OrchestratR, medians)", "", "| goal | measured | |",
           "|---|---|---|"]  # fmt: skip
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out.append("")
    return out


def goal_rows_on_page() -> list[tuple[str, str, str]]:
    """The rows of the page's goals table as it stands: those that no result file
    gives now (a goal measured by another script, or a peer not run this time) are
    kept as they were written."""
    if not DOC.exists():
        return []
    text = DOC.read_text()
    start = text.find("## Goals (OrchestratR, medians)")
    if start < 0:
        return []
    rows: list[tuple[str, str, str]] = []
    for line in text[start:].splitlines()[4:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 3:
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def hand_written() -> str:
    """The hand-written part of the page: taken from the page as it stands (between
    :data:`HAND_BEGIN` and :data:`HAND_END`), so that regenerating the tables never
    drops what was written by hand; from ``notes.md`` for a page without it."""
    if DOC.exists():
        text = DOC.read_text()
        start, end = text.find(HAND_BEGIN), text.find(HAND_END)
        if 0 <= start < end:
            return text[start : end + len(HAND_END)]
    notes = NOTES.read_text().rstrip() if NOTES.exists() else ""
    return f"{HAND_BEGIN}\n\n{notes}\n\n{HAND_END}"


def main() -> None:
    docs = {
        name: load(name)
        for name in (
            "failover",
            "silent_loss",
            "latency",
            "throughput",
            "footprint",
            "manager_load",
        )
    }
    any_doc = next((d for d in docs.values() if d), None)
    lines = [
        "# Benchmarks: OrchestratR beside Celery and Dramatiq",
        "",
        "All three run on the same machine, against the same RabbitMQ, in the same run "
        "(the systems take turns within each round). Generated by `benchmarks/report.py` from "
        "`benchmarks/results/*.json` (raw samples, versions, machine and load are there). "
        "Medians over several runs; p99 and max beside them.",
        "",
        "    make bench          # .venv/bin/python -m benchmarks.run         (full)",
        "    make bench-quick    # .venv/bin/python -m benchmarks.run --quick (< 10 min)",
        "",
    ]
    if any_doc:
        m, v = any_doc["machine"], any_doc["versions"]
        lines += [
            f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux "
            f"{m['kernel']}. Versions: Python {v['python']}, RabbitMQ {v['rabbitmq']}, "
            f"PostgreSQL {v.get('postgresql')}, orchestratr-core {v.get('orchestratr-core')}, "
            f"aio-pika {v['aio-pika']}, Celery {v['celery']} (kombu {v['kombu']}, py-amqp "
            f"{v['amqp']}), Dramatiq {v['dramatiq']} (pika {v['pika']}).",
            "",
        ]
    lines += section_goals(docs)
    lines += [hand_written(), ""]
    charts: list[tuple[str, str | None]] = []
    if docs["failover"]:
        lines += section_failover(docs["failover"])
        charts.append(("failover", chart_failover(docs["failover"])))
        lines += [f"![failover]({charts[-1][1]})", ""]
    if docs["silent_loss"]:
        lines += section_silent(docs["silent_loss"])
        lines += [f"![silent loss]({chart_silent(docs['silent_loss'])})", ""]
    if docs["latency"]:
        lines += section_latency(docs["latency"])
        lines += [f"![latency]({chart_latency(docs['latency'])})", ""]
    if docs["throughput"]:
        lines += section_throughput(docs["throughput"])
        lines += [f"![throughput]({chart_throughput(docs['throughput'])})", ""]
    if docs["footprint"]:
        lines += section_footprint(docs["footprint"], docs["manager_load"])
        lines += [f"![footprint]({chart_footprint(docs['footprint'], docs['manager_load'])})", ""]
    elif docs["manager_load"]:
        lines += section_manager(docs["manager_load"])
    settings: dict[str, Any] = {}
    for doc in docs.values():
        if doc:
            settings.update(doc.get("settings", {}))
    lines += ["## Settings of each system", ""]
    for name, values in settings.items():
        lines.append(f"**{LABEL[name]}**")
        lines.append("")
        lines += [f"- `{k}`: {v}" for k, v in values.items()]
        lines.append("")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
