"""`dlsr dashboard`: a rich Live view of what the monitors wrote to Redis (and nothing else).

Reads only Redis, so it runs anywhere Redis is reachable: per source the image rate, OOD rate against alpha, drift
state and a sparkline of the OOD rate; the live model version, threshold and alpha; monitors with rate and lag;
the last alerts. `q` or Ctrl-C quits; `--once` prints one frame.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dlsr_monitor.common.keys import Keys
from dlsr_monitor.console.views import RaisedDrift, StateView, WindowBucket

SPARK_CHARS = "▁▂▃▄▅▆▇█"
#: Window over which the "now" rates are computed (seconds).
RATE_WINDOW_S = 60.0


# ----------------------------------------------------------------------------------------------------------
# what one frame shows


@dataclass(frozen=True)
class SourceView:
    """One source's row."""

    source: str
    images: int  # images in the rate window
    rate_img_s: float
    ood_rate: float | None  # OOD flags / images over the rate window; None with no images
    total_images: int  # over the sparkline span
    total_ood: int
    drift: str  # "ok", "raised", ...
    spark: tuple[float | None, ...]  # OOD rate per sparkline bin, oldest first; None = no images


@dataclass(frozen=True)
class MonitorView:
    """One live monitor instance."""

    instance: str
    model_version: str
    rate_img_s: float | None
    lag: int | None
    age_s: float


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame shows, read from Redis at `taken_at`."""

    taken_at: float
    redis_url: str
    model_version: str | None
    threshold: float | None
    alpha: float | None
    sources: tuple[SourceView, ...] = ()
    monitors: tuple[MonitorView, ...] = ()
    alerts: tuple[dict, ...] = ()
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # the Redis key prefix read (a dashboard on another prefix shows another deployment)
    bucket_s: int | None = None  # window bucket width read with
    bucket_recorded: bool = False  # True: the monitors' recorded width; False: this machine's setting
    drifts: tuple[RaisedDrift, ...] = ()  # every raised drift, with its acknowledgement (own panel)


# ----------------------------------------------------------------------------------------------------------
# reading Redis (through console.views.StateView: the dashboard never spells a key itself)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def bin_buckets(
    buckets: list[WindowBucket], *, now: float, span_s: float, bins: int
) -> tuple[float | None, ...]:
    """OOD rate per bin over [now - span_s, now], oldest first; None where a bin saw no image."""
    n = [0] * bins
    o = [0] * bins
    for b in buckets:
        age = now - b.start
        if age < 0 or age >= span_s:
            continue
        idx = bins - 1 - int(age / (span_s / bins))
        n[idx] += b.images
        o[idx] += b.ood
    return tuple((oo / nn) if nn else None for nn, oo in zip(n, o, strict=True))


def summarise_source(
    source: str,
    buckets: list[WindowBucket],
    drift: dict[str, Any],
    *,
    now: float,
    bucket_s: float,
    history_s: float,
    bins: int = 60,
) -> SourceView:
    """Rate, OOD rate and sparkline of one source from its event-time buckets and drift hash."""
    rate_span = max(RATE_WINDOW_S, 2 * bucket_s)
    recent = [b for b in buckets if now - b.start < rate_span and b.images]
    recent_n = sum(b.images for b in recent)
    recent_o = sum(b.ood for b in recent)
    elapsed = max(bucket_s, now - min((b.start for b in recent), default=now))
    # The drift window's own rate is what the test judges; fall back to the recent buckets before it has one.
    ood_rate = _finite(drift.get("rate")) if drift.get("images") else None
    if ood_rate is None and recent_n:
        ood_rate = recent_o / recent_n
    state = str(drift.get("state") or "ok")
    return SourceView(
        source=source,
        images=int(recent_n),
        rate_img_s=recent_n / elapsed if recent_n else 0.0,
        ood_rate=ood_rate,
        total_images=sum(b.images for b in buckets),
        total_ood=sum(b.ood for b in buckets),
        drift="ok" if state in ("cleared", "none", "") else state,
        spark=bin_buckets(buckets, now=now, span_s=history_s, bins=bins),
    )


def read_snapshot(
    state: StateView,
    *,
    now: float | None = None,
    history_s: float = 3600.0,
    alerts_shown: int = 8,
    redis_url: str = "",
    prefix: str = "",
) -> Snapshot:
    """Read one frame's worth of state from Redis through `StateView`."""
    now = time.time() if now is None else now
    model = state.read_model()
    version = model.get("version")
    threshold = alpha = None
    if version:
        base = model.get("baseline") or {}
        # The baseline's threshold moves with vetted data; the registry entry holds the one it was published with.
        threshold = _finite(base.get("threshold"))
        if threshold is None:
            threshold = _finite(model.get("registry_threshold"))
        alpha = _finite(base.get("alpha")) or _finite(model.get("alpha"))

    sources = []
    summaries = state.read_sources()
    for summary in summaries:
        if now - summary.last_ts > history_s:
            continue
        buckets = state.read_window(summary.source, now - history_s, now)
        sources.append(
            summarise_source(
                summary.source, buckets, summary.window, now=now, bucket_s=state.bucket_s, history_s=history_s
            )
        )
    sources.sort(key=lambda v: v.source)

    monitors = []
    for hb in state.read_heartbeats():
        lag = hb.get("lag")
        monitors.append(
            MonitorView(
                instance=str(hb.get("instance")),
                model_version=str(hb.get("model_version") or "-"),
                rate_img_s=_finite(hb.get("rate")),
                lag=int(lag) if lag is not None else None,
                age_s=max(0.0, now - float(hb.get("ts") or now)),
            )
        )
    monitors.sort(key=lambda m: m.instance)

    alerts = state.read_recent_alerts(alerts_shown) if alerts_shown else []
    return Snapshot(
        taken_at=now,
        redis_url=redis_url,
        model_version=version,
        threshold=threshold,
        alpha=alpha,
        sources=tuple(sources),
        monitors=tuple(monitors),
        alerts=tuple(alerts),
        prefix=prefix or state.keys.prefix,
        bucket_s=state.bucket_s,
        bucket_recorded=state.bucket_recorded,
        drifts=tuple(state.read_raised_drifts(summaries)),
    )


# ----------------------------------------------------------------------------------------------------------
# drawing


def sparkline(values: tuple[float | None, ...], *, top: float | None = None) -> str:
    """One character per value, scaled to `top` (default: the largest value); blanks where there is no data."""
    present = [v for v in values if v is not None]
    top = top if top else (max(present) if present else 0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif top <= 0:
            out.append(SPARK_CHARS[0])
        else:
            out.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(v / top * (len(SPARK_CHARS) - 1) + 0.5))])
    return "".join(out)


def _spark_top(values: tuple[float | None, ...], alpha: float | None) -> float | None:
    present = [v for v in values if v is not None]
    floor = 5 * alpha if alpha else 0.0
    return max([floor, *present]) or None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def severity_of(alert: dict) -> str:
    """info / warning / critical, from the alert's kind and state (the contract has no severity field)."""
    kind = alert.get("kind")
    if kind == "drift":
        return "critical" if alert.get("state") == "raised" else "info"
    if kind == "model":
        return "critical" if alert.get("event") == "load_failed" else "info"
    return "warning"


_SEV_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


def alert_line(alert: dict) -> str:
    """One human line for an alert (also used by `dlsr alerts`)."""
    ts = alert.get("ts")
    when = (
        datetime.fromtimestamp(float(ts), UTC).strftime("%H:%M:%S")
        if isinstance(ts, int | float)
        else "--:--:--"
    )
    kind = alert.get("kind", "?")
    src = alert.get("source", "?")
    if kind == "ood":
        what = f"image {alert.get('image_id')} score {alert.get('score', 0):.4g} > {alert.get('threshold', 0):.4g}"
        what += f" (p={alert.get('p_value', 0):.3g}, model {alert.get('model_version')})"
    elif kind == "drift":
        w = alert.get("window") or {}
        what = f"drift {alert.get('state')}: {w.get('ood', '?')}/{w.get('images', '?')} OOD"
        if isinstance(w.get("rate"), int | float) and isinstance(w.get("null_rate"), int | float):
            what += f" = {100 * w['rate']:.1f}% vs {100 * w['null_rate']:.1f}% expected"
        if isinstance(w.get("p_value"), int | float):
            what += f" (p={w['p_value']:.2g})"
    elif kind == "model":
        what = f"model {alert.get('event')}: {alert.get('version')}"
        if alert.get("previous_version"):
            what += f" (was {alert['previous_version']})"
        if alert.get("reason"):
            what += f": {alert['reason']}"
    else:
        what = json.dumps(alert)[:200]
    return f"{when} {severity_of(alert):8s} {kind:5s} {src}: {what}"


def downsample(values: tuple[float | None, ...], n: int) -> tuple[float | None, ...]:
    """Merge adjacent bins into `n` (mean of those with data), keeping the newest bin last."""
    if len(values) <= n:
        return values
    out: list[float | None] = []
    for i in range(n):
        chunk = [v for v in values[i * len(values) // n : (i + 1) * len(values) // n] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return tuple(out)


def render(snap: Snapshot, width: int = 120) -> RenderableType:
    """The frame for one snapshot, laid out for a terminal `width` columns wide."""
    now_txt = datetime.fromtimestamp(snap.taken_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = Text()
    head.append("DLSR Monitor", style="bold")
    head.append(f"  {now_txt}  redis {snap.redis_url}  prefix ")
    head.append(snap.prefix or "-", style="bold")
    if snap.bucket_s:
        head.append(f"  buckets {snap.bucket_s}s" + ("" if snap.bucket_recorded else " (local setting)"))
    head.append("\n")
    head.append("model ")
    head.append(snap.model_version or "none", style="bold green" if snap.model_version else "bold red")
    head.append("  threshold ")
    head.append("-" if snap.threshold is None else f"{snap.threshold:.5g}", style="bold")
    head.append("  alpha ")
    head.append("-" if snap.alpha is None else f"{snap.alpha:g}", style="bold")
    if snap.error:
        head.append(f"\n{snap.error}", style="bold red")

    # Narrow terminals drop the columns a reader can do without and shorten the sparkline, rather than crop it
    # (cropping would cut off the newest minutes).
    wide = width >= 100
    bins = 30 if width >= 120 else 20 if width >= 90 else 12
    src = Table(box=box.SIMPLE_HEAD, expand=True, title="Sources", title_justify="left", pad_edge=False)
    src.add_column("source", no_wrap=True, overflow="ellipsis", ratio=2)
    src.add_column("img/s", justify="right", no_wrap=True)
    src.add_column("OOD rate", justify="right", no_wrap=True)
    src.add_column("vs alpha", justify="right", no_wrap=True)
    src.add_column("drift", no_wrap=True)
    if wide:
        src.add_column("images", justify="right", no_wrap=True)
    src.add_column("last hour" if width < 90 else "OOD rate, last hour", no_wrap=True, min_width=bins)
    for s in snap.sources:
        ratio = (s.ood_rate / snap.alpha) if (s.ood_rate is not None and snap.alpha) else None
        style = (
            "bold red" if s.drift == "raised" else ("yellow" if ratio is not None and ratio > 2 else "green")
        )
        spark = downsample(s.spark, bins)
        row = [
            s.source,
            f"{s.rate_img_s:.1f}",
            _pct(s.ood_rate),
            "-" if ratio is None else f"{ratio:.1f}x",
            Text(s.drift.upper() if s.drift == "raised" else s.drift, style=style),
        ]
        if wide:
            row.append(str(s.total_images))
        # Scale to at least 5 x alpha, so an in-distribution source reads low instead of filling the cell.
        row.append(Text(sparkline(spark, top=_spark_top(spark, snap.alpha)), style=style))
        src.add_row(*row)
    if not snap.sources:
        src.add_row("(no sources seen in the last hour)", *[""] * (len(src.columns) - 1))

    mon = Table(box=box.SIMPLE_HEAD, expand=True, title="Monitors", title_justify="left", pad_edge=False)
    mon.add_column("instance", no_wrap=True, overflow="ellipsis", ratio=2)
    mon.add_column("model", no_wrap=True, overflow="ellipsis")
    mon.add_column("img/s", justify="right", no_wrap=True)
    mon.add_column("lag", justify="right", no_wrap=True)
    mon.add_column("beat", justify="right", no_wrap=True)
    for m in snap.monitors:
        mon.add_row(
            m.instance,
            m.model_version,
            "-" if m.rate_img_s is None else f"{m.rate_img_s:.1f}",
            "-" if m.lag is None else str(m.lag),
            f"{m.age_s:.0f}s ago",
        )
    if not snap.monitors:
        mon.add_row("(no live monitor)", "", "", "", "")

    # One line per alert, cut with an ellipsis: a wrapped alert would push the others off a small screen.
    lines = [
        Text(alert_line(a), style=_SEV_STYLE.get(severity_of(a), ""), no_wrap=True, overflow="ellipsis")
        for a in snap.alerts
    ] or [Text("(no alerts yet)", style="dim")]
    alerts = Panel(Group(*lines), title="Last alerts", title_align="left", box=box.SQUARE)
    footer = Text("q or Ctrl-C quits", style="dim")
    return Group(head, drift_panel(snap), src, mon, alerts, footer)


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def drift_line(d: RaisedDrift, now: float) -> Text:
    """One line per raised drift: source, raised since (and how long ago), the window, the acknowledgement."""
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(d.source, style="bold red")
    if d.since is not None:
        when = datetime.fromtimestamp(d.since, UTC).strftime("%H:%M:%S")
        line.append(f"  raised since {when} UTC ({_ago(now - d.since)} ago)")
    else:
        line.append("  raised since ?")
    if d.images:
        line.append(f"  {d.ood}/{d.images} OOD")
        if d.rate is not None and d.null_rate is not None:
            line.append(f" = {100 * d.rate:.1f}% vs {100 * d.null_rate:.1f}%")
    if d.ack is not None:
        at = datetime.fromtimestamp(d.ack.at, UTC).strftime("%H:%M")
        line.append(f"  ack {d.ack.by} {at}", style="green")
        if d.ack.note:
            line.append(f": {d.ack.note}", style="green")
    else:
        line.append(f"  not acknowledged (dlsr alerts ack {d.source})", style="yellow")
    return line


def drift_panel(snap: Snapshot) -> Panel:
    """Raised drift in a panel of its own, from the drift states (not the alert list): no number of OOD
    alerts can push it off the screen, and it empties only when the drift clears."""
    if not snap.drifts:
        body: RenderableType = Text("(no raised drift)", style="dim")
        return Panel(body, title="Raised drift", title_align="left", box=box.SQUARE, border_style="dim")
    open_ = sum(1 for d in snap.drifts if d.ack is None)
    body = Group(*(drift_line(d, snap.taken_at) for d in snap.drifts))
    title = f"Raised drift: {len(snap.drifts)}" + (f", {open_} not acknowledged" if open_ else ", all acknowledged")
    return Panel(body, title=title, title_align="left", box=box.SQUARE, border_style="red" if open_ else "yellow")


# ----------------------------------------------------------------------------------------------------------
# the loop


@contextlib.contextmanager
def _quit_on_q(stop: threading.Event) -> Iterator[None]:
    """Read single keys from the terminal in cbreak mode on a thread; `q` sets `stop`. No tty: Ctrl-C only."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    done = threading.Event()

    def reader() -> None:
        while not done.is_set() and not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                ch = os.read(fd, 1)
                if ch in (b"q", b"Q"):
                    stop.set()

    tty.setcbreak(fd)
    thread = threading.Thread(target=reader, name="dashboard-keys", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def live_loop(
    snapshot: Callable[[], Snapshot],
    *,
    refresh_s: float,
    duration_s: float | None = None,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Redraw `snapshot()` every `refresh_s` until `q`, Ctrl-C, `stop` or `duration_s`."""
    console = console or Console()
    stop = stop or threading.Event()
    wake = threading.Event()
    old_winch = None
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGWINCH"):
        # Redraw at once on a resize instead of waiting for the next tick.
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: wake.set())
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        with (
            _quit_on_q(stop),
            Live(
                render(snapshot(), console.size.width),
                console=console,
                screen=console.is_terminal,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                wake.wait(refresh_s)
                wake.clear()
                if stop.is_set():
                    break
                live.update(render(snapshot(), console.size.width), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)


def run_dashboard(
    settings,
    *,
    once: bool = False,
    refresh_s: float | None = None,
    duration_s: float | None = None,
    console: Console | None = None,
    redis_client=None,
) -> int:
    """`dlsr dashboard`: one frame with `once`, else the live view until q / Ctrl-C.

    `once` needs Redis now (bounded retries, then one line); the live view starts whatever Redis does and shows
    what is wrong until it is back (an outage is ridden out, not fatal).
    """
    import redis as redis_lib

    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.connections import redis_client as new_client

    if redis_client is not None:
        client = redis_client
    elif once:
        client = connect_redis(settings.redis)
    else:  # no ping: the client connects lazily and every frame retries
        client = new_client(settings.redis)
    state = StateView.from_settings(client, Keys.of(settings.redis), settings.monitor)
    dash = settings.dashboard
    url = mask_url(settings.redis.url)
    prefix = settings.redis.prefix

    def snapshot() -> Snapshot:
        try:
            return read_snapshot(
                state, history_s=dash.history_s, alerts_shown=dash.alerts_shown, redis_url=url, prefix=prefix
            )
        except redis_lib.RedisError as exc:  # keep drawing; say what is wrong
            return Snapshot(time.time(), url, None, None, None, error=f"Redis error: {exc}", prefix=prefix)

    console = console or Console()
    if once:
        console.print(render(snapshot(), console.size.width))
        return 0
    live_loop(snapshot, refresh_s=refresh_s or dash.refresh_s, duration_s=duration_s, console=console)
    return 0


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for display."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, cred = head.partition("://")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in cred else cred}@{tail}"
