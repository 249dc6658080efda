"""What the command line shows: the pools table of ``mppool stats``, the frames of
``mppool top`` (pools, holders, waiters, cluster hosts) and the summary of ``mppool demo``,
as rich renderables. Pure rendering of the supervisor's stats: no I/O but the client calls
of `top_frame`.

The pool-name column never vanishes: a narrow terminal or a pipe folds the other columns
first (`fitted_pools_table`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .client import Client
    from .demo import DemoResult, KillReport

MAX_HOLDER_ROWS = 40


def size(n: Any) -> str:
    return "∞" if not n else str(n)


def name_column(t: Table, header: str, names: Any, **kw: Any) -> None:
    """The pool-name column, which must never vanish: rich shrinks columns to fit the width
    and, without a minimum, can give a wrappable one no room at all. Its minimum is the
    longest name (up to 20 characters; longer names fold onto further lines)."""
    longest = max((len(str(n)) for n in names), default=0)
    t.add_column(header, style="bold", min_width=max(len(header), min(longest, 20)),
                 overflow="fold", **kw)


# The pools table's counters, the least needed last: on a narrow terminal they are dropped
# from the end (never the names), and the caption says so.
POOL_COUNTERS = ("max", "in use", "idle", "waiting", "borrows", "killed", "created")
MIN_POOL_COUNTERS = 4


def fitted_pools_table(console: Console, stats: dict[str, Any], title: str | None = None) -> Table:
    """The widest pools table that fits the console: counters dropped from the end if need be."""
    for n in range(len(POOL_COUNTERS), MIN_POOL_COUNTERS, -1):
        t = pools_table(stats, title, POOL_COUNTERS[:n])
        # Its narrowest rendering (wrapping what may wrap), measured without the console's cap.
        if console.measure(t, options=console.options.update_width(1 << 16)).minimum <= console.width:
            return t
    t = pools_table(stats, title, POOL_COUNTERS[:MIN_POOL_COUNTERS])
    return t


def pools_table(stats: dict[str, Any], title: str | None = None,
                 counters: Sequence[str] = POOL_COUNTERS) -> Table:
    t = Table(title=title, title_justify="left")
    name_column(t, "pool", stats)
    t.add_column("kind")
    for col in counters:
        t.add_column(col, justify="right", no_wrap=True)
    if len(counters) < len(POOL_COUNTERS):
        t.caption = f"narrow terminal: {', '.join(POOL_COUNTERS[len(counters):])} not shown (--json has all)"
    for name in sorted(stats):
        s = stats[name]
        kind = str(s.get("kind", "pool"))
        if s.get("transfer") == "proxy":
            kind += " (proxy)"
        waiting = int(s.get("nwaiting", 0))
        label = Text(name)
        if s.get("shutdown"):
            label.append(" (shut down)", style="red")
        cells: list[RenderableType] = [
            size(s.get("max_size")), str(s.get("nusing", 0)), str(s.get("navail", 0)),
            Text(str(waiting), style="yellow" if waiting else ""), str(s.get("nborrows", 0)),
            str(s.get("nkilled", 0)), str(s.get("ncreated", 0))]
        t.add_row(label, kind, *cells[:len(counters)])
    return t


def header(info: dict[str, Any]) -> Text:
    return Text(f"supervisor pid {info.get('pid')} at {info.get('address')} · "
                f"{info.get('connections', 0)} lease connection(s) · "
                f"{info.get('nreclaimed', 0)} lease(s) reclaimed from dead holders")


def top_frame(client: Client, console: Console) -> RenderableType:
    stats = client.stats()
    info = client.info()
    holders = Table(title="holders", title_justify="left")
    name_column(holders, "pool", stats)
    for col, justify in (("pid", "right"), ("lease age", "right"),
                         ("uses", "right"), ("host", "left"), ("object", "left")):
        holders.add_column(col, justify=justify)  # type: ignore[arg-type]
    rows = []
    for name, s in stats.items():
        for u in s.get("using", ()):
            age = -float(u.get("last_get", 0.0))
            obj = u.get("trace") if "trace" in u else json.dumps(u.get("stats"), default=str)
            rows.append((age, name, u.get("pid", "?"), u.get("uses", ""),
                         (u.get("holder") or {}).get("host", ""), str(obj)[:40]))
    rows.sort(key=lambda r: -r[0])  # the longest-held first: those are the suspicious ones
    for age, name, pid, uses, host, obj in rows[:MAX_HOLDER_ROWS]:
        # Text, not str: an object's repr may hold [brackets] that rich would read as markup.
        holders.add_row(Text(name), str(pid), f"{age:.3f} s", str(uses), Text(host), Text(obj))
    if len(rows) > MAX_HOLDER_ROWS:
        holders.caption = f"… and {len(rows) - MAX_HOLDER_ROWS} more"
    if not rows:
        holders.caption = "no leases out"
    parts: list[RenderableType] = [header(info), Text(time.strftime("%H:%M:%S"), style="dim")]
    parts.append(fitted_pools_table(console, stats, title="pools") if stats else Text("no pools"))
    parts += [holders, waiters_table(stats)]
    if any(s.get("cluster") for s in stats.values()):
        parts.append(cluster_table(stats))
    return Group(*parts)


def cluster_table(stats: dict[str, Any]) -> RenderableType:
    """Cluster pools: the units each host holds, as this supervisor last saw Redis."""
    t = Table(title="cluster (units held per host)", title_justify="left")
    name_column(t, "pool", stats)
    for col in ("host", "held", "queued", "lost", "redis"):
        t.add_column(col, justify="left" if col in ("host", "redis") else "right")
    for name in sorted(stats):
        c = stats[name].get("cluster")
        if not c:
            continue
        hosts = c.get("hosts") or {}
        ok = Text("up" if c.get("redis_ok") else "DOWN", style="" if c.get("redis_ok") else "red")
        rows = sorted(hosts.items()) or [("-", 0)]
        for i, (host, n) in enumerate(rows):
            mine = " (this host)" if host == c.get("host") else ""
            t.add_row(Text(name if i == 0 else ""), Text(f"{host}{mine}"), str(n),
                      str(c.get("queue", 0)) if i == 0 else "",
                      str(stats[name].get("lost_leases", 0)) if i == 0 else "", ok if i == 0 else "")
    return t


def waiters_table(stats: dict[str, Any]) -> RenderableType:
    """Who waits on which pool: pid and seconds waited, the longest wait first."""
    rows = []
    for name, s in stats.items():
        listed = s.get("waiters")
        if listed is None:  # a supervisor without the list: the count only
            listed = [{}] * int(s.get("nwaiting", 0))
        for w in listed:
            waited = w.get("waited")
            rows.append((-1.0 if waited is None else float(waited), name, w.get("pid")))
    if not rows:
        return Text("waiters: none")
    rows.sort(key=lambda r: -r[0])
    t = Table(title="waiters", title_justify="left")
    name_column(t, "pool", stats)
    t.add_column("pid", justify="right")
    t.add_column("waiting for", justify="right", style="yellow")
    for waited, name, pid in rows[:MAX_HOLDER_ROWS]:
        t.add_row(Text(name), "?" if pid is None else str(pid),
                  "?" if waited < 0 else f"{waited:.3f} s")
    if len(rows) > MAX_HOLDER_ROWS:
        t.caption = f"… and {len(rows) - MAX_HOLDER_ROWS} more"
    return t
def kill_line(k: KillReport, prefix: str = "watchdog: ") -> Text:
    if not k.held:
        return Text(f"{prefix}worker {k.index} (pid {k.pid}) was not seen holding a token; "
                    "nothing to show", style="bold red")
    if k.reclaim_ms is None:
        return Text(f"{prefix}SIGKILLed worker {k.index} (pid {k.pid}) holding a token; the token "
                    "did NOT come back", style="bold red")
    sums = k.out + k.available == k.budget
    return Text(f"{prefix}SIGKILLed worker {k.index} (pid {k.pid}) while it held a token → "
                f"token back in {k.reclaim_ms:.1f} ms (out {k.out} + available {k.available} "
                f"{'=' if sums else '≠'} budget {k.budget})", style="green" if sums else "bold red")


def demo_summary(out: Console, r: DemoResult) -> None:
    t = Table(title="leases per worker", title_justify="left")
    t.add_column("worker", justify="right")
    t.add_column("pid", justify="right")
    t.add_column("leases", justify="right")
    t.add_column("peak out seen", justify="right")
    t.add_column("fate")
    for w in r.workers:
        t.add_row(str(w.index), str(w.pid), str(w.leases), str(w.peak_seen), w.fate)
    out.print(t)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(justify="right", style="bold")
    facts.add_column()
    facts.add_row("total leases", f"{r.total_leases} in {r.seconds:g} s")
    facts.add_row("peak tokens out", f"{r.peak_sampled} (supervisor, {r.nsamples} samples by the parent)")
    facts.add_row("", f"{r.peak_workers} (supervisor, read by the workers while holding)")
    facts.add_row("", f"{r.peak_inflight} (workers between get and ret, shared counter)")
    facts.add_row("max allowed", str(r.budget))
    facts.add_row("watchdog", kill_line(r.kill, prefix="") if r.kill is not None
                  else Text("not run", style="red"))
    facts.add_row("reclaimed", f"{r.nreclaimed} lease(s) from dead holders")
    balanced = r.final_out + r.final_available == r.budget
    facts.add_row("at the end", Text(f"tokens out {r.final_out} + available {r.final_available} "
                                     f"{'=' if balanced else '≠'} budget {r.budget}",
                                     style="" if balanced else "bold red"))
    out.print(facts)
    for e in r.errors:
        out.print(Text(f"error: {e}", style="bold red"))
    if r.bound_held:
        out.print(Text(f"bound held: peak {r.peak} <= budget {r.budget}", style="bold green"))
    else:
        out.print(Text(f"bound VIOLATED: peak {r.peak} > budget {r.budget}", style="bold red"))
    if r.bound_held and not r.ok:
        out.print(Text("but the run was not clean (see above): exit status 1", style="bold red"))

