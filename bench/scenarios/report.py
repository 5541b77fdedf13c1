"""Report of one scenario run: the JSON document and its Markdown summary.

Owns the figures and their definitions:
- `db_queries_per_min`: statements the sim app ran on PostgreSQL (GoTrue's `auth_users`
  read included: /auth/v1/user is a DB round trip) per *scenario* minute, cross-checked
  with `pg_stat_database` (xact_commit + xact_rollback of the bench database: every
  statement outside a transaction block is one transaction, and so is asyncpg's reset
  of a connection going back to the pool, which the app counts too; ratio ≈ 1.0);
- `upstream_requests_per_min`: requests that reached the app (and its PostgREST RPC),
  not counting the app's own /auth/v1/user calls (`auth_user_calls_per_min`);
- `errors`: statuses the clients saw — `"400"`, `"409"`, `"5xx"` always, `"429"`,
  `"4xx_other"`, `"failed"` (no answer) when present; `db_errors`: the statuses
  PostgREST would have logged for the app's failed statements (42703 → 400, 23505 → 409):
  the review's error loops;
- `p95_ms` (and `p50_ms`) by route, from the clients;
- S2: per phase; S3: `admin_stats_upstream_per_min` and `per_webinar_p95_ms` before,
  during and after the surge;
- `last_seen_check` (signed-in viewers): the database's last-seen (presence or session)
  against the wall time of the viewer's last accepted heartbeat; a viewer whose database
  time lags by more than one flush interval lost a heartbeat. `watch_time`: seconds
  accumulated by edge_access_batch against the viewers' first-to-last heartbeat span;
- `targets`: the incident review's targets with the measured value and whether it is met
  (reported, never asserted).

Sides: `direct`, `gateway` (heartbeat batch mode with bulk joins) and, in S1,
`gateway_join_forward` (each viewer's first heartbeat reaches the app).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.scenarios.runner import Population, SideRaw, Spec

ROUTES = ["presence_ping", "access_track", "admin_stats", "chat_poll", "chat_post"]
NOT_UPSTREAM = {"auth_user"}
SIDES = ["direct", "gateway", "gateway_join_forward"]
SIDE_TITLES = {
    "direct": "direct",
    "gateway": "gateway",
    "gateway_join_forward": "gateway, joins forwarded",
}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[max(0, math.ceil(q * len(s)) - 1)], 1)


def _upstream(stats: dict[str, Any]) -> int:
    return sum(n for r, n in stats.get("requests", {}).items() if r not in NOT_UPSTREAM)


def _errors(samples: list[Any]) -> dict[str, int]:
    out: Counter[str] = Counter({"400": 0, "409": 0, "5xx": 0})
    for s in samples:
        if s.status == 0:
            out["failed"] += 1
        elif s.status >= 500:
            out["5xx"] += 1
        elif s.status in (400, 409, 429):
            out[str(s.status)] += 1
        elif s.status >= 400:
            out["4xx_other"] += 1
    return dict(out)


def _errors_by_route(samples: list[Any]) -> dict[str, dict[str, int]]:
    """Non-2xx answers per route and status (0 = no answer), to tell what failed."""
    out: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        if not 200 <= s.status < 300:
            out[s.route][str(s.status)] += 1
    return {r: dict(c) for r, c in sorted(out.items())}


def _p95_by(samples: list[Any], q: float = 0.95) -> dict[str, float | None]:
    by: defaultdict[str, list[float]] = defaultdict(list)
    for s in samples:
        by[s.route].append(s.ms)
    return {r: pct(by[r], q) for r in ROUTES if r in by}


def _counter_at(timeline: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """The last sim counters sampled at or before scenario time t (a phase's first
    requests are not counted in the phase before it)."""
    before = [p for p in timeline if p["t"] <= t]
    stats: dict[str, Any] = (before[-1] if before else timeline[0])["stats"]
    return stats


def series(timeline: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-bucket rates (per scenario minute) from the cumulative samples."""
    out = []
    for a, b in itertools.pairwise(timeline):
        dt_min = (b["t"] - a["t"]) / 60
        if dt_min <= 0:
            continue
        out.append(
            {
                "t_min": round(b["t"] / 60, 3),
                "upstream_requests_per_min": round(
                    (_upstream(b["stats"]) - _upstream(a["stats"])) / dt_min, 1
                ),
                "db_queries_per_min": round(
                    (b["stats"]["queries_total"] - a["stats"]["queries_total"]) / dt_min, 1
                ),
            }
        )
    return out


def _window(raw: SideRaw, t0: float, t1: float) -> dict[str, Any]:
    """Rates and client figures between scenario seconds t0 and t1."""
    a, b = _counter_at(raw.timeline, t0), _counter_at(raw.timeline, t1)
    minutes = max((t1 - t0) / 60, 1e-9)
    samples = [s for s in raw.samples if t0 <= s.t < t1]
    ok: dict[str, float | None] = {}
    by: defaultdict[str, list[int]] = defaultdict(list)
    for s in samples:
        by[s.route].append(s.status)
    for r in ROUTES:
        if by[r]:
            ok[r] = round(sum(200 <= x < 300 for x in by[r]) / len(by[r]), 3)
    chat_a = a["requests"].get("chat_poll", 0)
    chat_b = b["requests"].get("chat_poll", 0)
    return {
        "upstream_requests_per_min": round((_upstream(b) - _upstream(a)) / minutes, 1),
        "chat_poll_upstream_per_min": round((chat_b - chat_a) / minutes, 1),
        "db_queries_per_min": round((b["queries_total"] - a["queries_total"]) / minutes, 1),
        "client_requests_per_min": round(len(samples) / minutes, 1),
        "success_ratio": ok,
        "p95_ms": _p95_by(samples),
    }


def last_seen_check(spec: Spec, raw: SideRaw) -> dict[str, Any]:
    """Every signed-in viewer's database last-seen against its last accepted heartbeat."""
    bound = spec.flush_interval / spec.time_scale  # one flush interval, wall seconds
    lags = []
    missing = 0
    for uid, (_first, last) in raw.client_viewers.items():
        row = raw.db_viewers.get(uid, {})
        times = [row[k] for k in ("presence", "session") if row.get(k) is not None]
        if not times:
            missing += 1
            continue
        lags.append(last - max(times))
    late = sum(1 for x in lags if x > bound)
    return {
        "viewers": len(raw.client_viewers),
        "missing": missing,
        "lagging_more_than_one_flush_interval": late,
        "max_lag_s": round(max(lags), 3) if lags else None,
        "flush_interval_wall_s": round(bound, 3),
        "ok": missing == 0 and late == 0,
    }


def watch_time(raw: SideRaw) -> dict[str, Any]:
    db = sum(row.get("watch_s", 0.0) for row in raw.db_viewers.values())
    span = sum(last - first for first, last in raw.client_viewers.values())
    return {
        "db_watch_s": round(db, 1),
        "client_span_s": round(span, 1),
        "ratio": round(db / span, 3) if span else None,
    }


def side(spec: Spec, raw: SideRaw) -> dict[str, Any]:
    minutes = spec.minutes
    final = raw.final
    queries = int(final["queries_total"])
    xact = raw.pg["xact_commit"] + raw.pg["xact_rollback"]
    acquires = int(final.get("acquires", 0))
    req = final["requests"]
    out: dict[str, Any] = {
        "db_queries_per_min": round(queries / minutes, 1),
        "upstream_requests_per_min": round(_upstream(final) / minutes, 1),
        "errors": _errors(raw.samples),
        "errors_by_route": _errors_by_route(raw.samples),
        "p95_ms": _p95_by(raw.samples),
        "p50_ms": _p95_by(raw.samples, 0.5),
        "db_errors": {k: int(v) for k, v in sorted(final.get("db_errors", {}).items())},
        "upstream_by_route_per_min": {
            r: round(n / minutes, 1) for r, n in sorted(req.items()) if r not in NOT_UPSTREAM
        },
        "auth_user_calls_per_min": round(req.get("auth_user", 0) / minutes, 1),
        "client_requests": len(raw.samples),
        "client_requests_by_route": dict(Counter(s.route for s in raw.samples)),
        "db_queries_total": queries,
        "db_queries_by_route": dict(final["queries"]),
        "pg_stat_database": {
            **raw.pg,
            "transactions": xact,
            "statements_counted_by_app": queries,
            "pool_resets_counted_by_app": acquires,
            # Every statement outside a transaction block is one transaction, and so is
            # asyncpg's reset query when a connection goes back to the pool.
            "ratio": round(xact / (queries + acquires), 3) if queries else None,
        },
        "wall_s": round(raw.wall_s, 1),
        "cpu_s": {k: round(v, 1) for k, v in raw.cpu_s.items()},
        "timeline": series(raw.timeline),
    }
    if raw.client_viewers:
        out["last_seen_check"] = last_seen_check(spec, raw)
        out["watch_time"] = watch_time(raw)
    if raw.gateway_metrics:
        out["gateway_metrics"] = raw.gateway_metrics
    if spec.phases:
        out["phases"] = {ph.name: _window(raw, ph.start * 60, ph.end * 60) for ph in spec.phases}
    if spec.admins:
        out["admin_stats_upstream_per_min"] = round(req.get("admin_stats", 0) / minutes, 1)
    if spec.surge:
        out.update(per_webinar(spec, raw))
    return out


def per_webinar(spec: Spec, raw: SideRaw) -> dict[str, Any]:
    """S3: each webinar's viewer ping p95 and ping/track error rate before, during and
    after the surge."""
    # "During": the joins and the two scenario minutes after them (the surge viewers'
    # first pings), enough samples for a p95 that is not one slow request.
    s0, s1 = spec.surge_at * 60, (spec.surge_at + max(2 * spec.surge_window, 2.0)) * 60
    windows = {
        "before_surge": (spec.join_window * 60, s0),
        "during_surge": (s0, s1),
        "after_surge": (s1, spec.duration_s),
    }
    per: dict[str, dict[str, float | None]] = {}
    errors: dict[str, dict[str, float | None]] = {}
    for w in spec.webinars:
        per[w], errors[w] = {}, {}
        for name, (a, b) in windows.items():
            got = [
                s
                for s in raw.samples
                if s.webinar == w and s.route in ("presence_ping", "access_track") and a <= s.t < b
            ]
            # Pings only: every 2 min they fall in each window alike, whereas the 5-min
            # tracks land in some windows and not others (another route's latency).
            per[w][name] = pct([s.ms for s in got if s.route == "presence_ping"], 0.95)
            bad = sum(1 for s in got if not 200 <= s.status < 300)
            errors[w][name] = round(bad / len(got), 4) if got else None
    return {
        "per_webinar_p95_ms": per,
        "per_webinar_error_rate": errors,
        "neighbour_timeline": neighbour_timeline(spec, raw),
    }


def neighbour_timeline(spec: Spec, raw: SideRaw, buckets: int = 40) -> list[dict[str, Any]]:
    """S3 chart: the other webinar's viewer ping/track p95 and error rate per bucket."""
    other = spec.webinars[0]
    width = spec.duration_s / buckets
    by: defaultdict[int, list[Any]] = defaultdict(list)
    for s in raw.samples:
        if s.webinar == other and s.route in ("presence_ping", "access_track"):
            by[min(int(s.t / width), buckets - 1)].append(s)
    out = []
    for i in sorted(by):
        got = by[i]
        out.append(
            {
                "t_min": round((i + 1) * width / 60, 3),
                "p95_ms": pct([s.ms for s in got], 0.95),
                "error_rate": round(sum(1 for s in got if not 200 <= s.status < 300) / len(got), 4),
            }
        )
    return out


def _target(text: str, value: Any, limit: str, met: bool | None) -> dict[str, Any]:
    return {"target": text, "value": value, "limit": limit, "met": met}


def targets(spec: Spec, rep: dict[str, Any]) -> list[dict[str, Any]]:
    by_scenario = {"s1": _s1_targets, "s2": _s2_targets, "s3": _s3_targets}
    return by_scenario[spec.name](spec, rep)


def _s1_targets(spec: Spec, rep: dict[str, Any]) -> list[dict[str, Any]]:
    d, g = rep["direct"], rep["gateway"]
    out = []
    bad = g["errors"]["400"] + g["errors"]["409"]
    out.append(_target("gateway: client responses 400/409", bad, "= 0", bad == 0))
    pg_bad = g["db_errors"].get("400", 0) + g["db_errors"].get("409", 0)
    out.append(
        _target(
            "gateway: PostgREST-equivalent 400/409 (the app's failed statements)",
            pg_bad,
            "= 0",
            pg_bad == 0,
        )
    )
    p = g["p95_ms"].get("presence_ping")
    out.append(_target("gateway: presence_ping p95 ms", p, "< 500", p is not None and p < 500))
    p = g["p95_ms"].get("access_track")
    out.append(_target("gateway: access_track p95 ms", p, "< 1000", p is not None and p < 1000))
    full = round(g["db_queries_per_min"] * 1000 / spec.viewers, 1)
    out.append(
        _target("gateway: DB queries/min scaled to 1,000 viewers", full, "< 10000", full < 10000)
    )
    r = _ratio(g["db_queries_per_min"], d["db_queries_per_min"])
    out.append(
        _target(
            "gateway (bulk joins) DB queries/min vs direct",
            r,
            "<= 2 %",
            r is not None and r <= 0.02,
        )
    )
    f = rep.get("gateway_join_forward")
    if f is not None:
        rf = _ratio(f["db_queries_per_min"], d["db_queries_per_min"])
        out.append(_target("gateway, joins forwarded: DB queries/min vs direct", rf, "—", None))
    for name in ("gateway", "gateway_join_forward"):
        check = rep.get(name, {}).get("last_seen_check")
        if check is not None:
            out.append(
                _target(
                    f"{name}: viewers whose DB last-seen lags the client's by more than"
                    " one flush interval (or is missing)",
                    check["lagging_more_than_one_flush_interval"] + check["missing"],
                    "= 0",
                    check["ok"],
                )
            )
    return out


def _s2_targets(spec: Spec, rep: dict[str, Any]) -> list[dict[str, Any]]:
    d, g = rep["direct"], rep["gateway"]
    out = []
    r = _ratio(g["upstream_requests_per_min"], d["upstream_requests_per_min"])
    out.append(
        _target("gateway upstream requests/min vs direct (whole run)", r, "<= 20 %", _le(r, 0.2))
    )
    outage = [p for p in spec.phases if p.realtime_down]
    gq = sum(g["phases"][p.name]["chat_poll_upstream_per_min"] for p in outage) / len(outage)
    dq = sum(d["phases"][p.name]["chat_poll_upstream_per_min"] for p in outage) / len(outage)
    r2 = _ratio(gq, dq)
    out.append(
        _target(
            "gateway chat polls reaching the app vs direct (outage phases)",
            r2,
            "<= 20 %",
            _le(r2, 0.2),
        )
    )
    limit = 60 * len(spec.webinars)
    out.append(
        _target(
            "gateway: chat polls reaching the app/min in the outage phases"
            f" ({rep['signed_in_viewers']} pollers; 1 per 1 s micro-cache TTL per webinar)",
            round(gq, 1),
            f"<= {limit}, whatever the number of pollers",
            gq <= limit,
        )
    )
    ok = [
        g["phases"][p.name]["success_ratio"].get(r, 1.0)
        for p in outage
        for r in ("presence_ping", "access_track")
    ]
    worst = min((x for x in ok if x is not None), default=None)
    out.append(
        _target(
            "gateway: ping/track success ratio, worst outage phase",
            worst,
            ">= 0.99",
            _ge(worst, 0.99),
        )
    )
    return out


def _s3_targets(spec: Spec, rep: dict[str, Any]) -> list[dict[str, Any]]:
    d, g = rep["direct"], rep["gateway"]
    out = []
    other = spec.webinars[0]
    for side_name, s in (("direct", d), ("gateway", g)):
        per = s["per_webinar_p95_ms"][other]
        shift = _ratio(per["during_surge"], per["before_surge"])
        shift_pct = round((shift - 1) * 100, 1) if shift is not None else None
        err = s["per_webinar_error_rate"][other]["during_surge"]
        if side_name == "direct":
            # The constrained app must show the surge, or the comparison shows nothing.
            text, limit = "degrades visibly (the surge saturates the app)", "> 20 % or errors"
            met = shift_pct is not None and (shift_pct > 20 or bool(err))
        else:
            text, limit = "within 20 % of its unloaded p95, no errors", "<= 20 %, 0 errors"
            met = shift_pct is not None and shift_pct <= 20 and not err
        out.append(
            _target(
                f"{side_name}: {other} p95 shift during the other webinar's surge (%),"
                f" error rate {_fmt(err)}: {text}",
                shift_pct,
                limit,
                met,
            )
        )
    admin_limit = round(len(spec.webinars) * 60 / 10 + spec.admins * 60 / 300, 1)
    v = g["admin_stats_upstream_per_min"]
    out.append(
        _target(
            "gateway: admin stats upstream calls/min"
            " (1 per 10 s TTL per webinar + 1 per admin per 5 min authz)",
            v,
            f"<= {admin_limit}",
            v <= admin_limit,
        )
    )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def _le(v: float | None, limit: float) -> bool | None:
    return None if v is None else v <= limit


def _ge(v: float | None, limit: float) -> bool | None:
    return None if v is None else v >= limit


def build(spec: Spec, pop: Population, raws: list[SideRaw]) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "scenario": spec.name,
        "viewers": spec.viewers,
        "duration_s": spec.duration_s,
        "time_scale": spec.time_scale,
        "quick": spec.quick,
        "gateway_access_track_forward_s": spec.track_forward,
        "gateway_flush_interval_s": spec.flush_interval,
        "gateway_join": spec.gateway_sides,
        "sim_app": {"pool_size": spec.pool_size, "statement_ms": spec.statement_ms},
        "webinars": spec.webinars,
        "admins": spec.admins,
        "surge_viewers": spec.surge,
        "signed_in_viewers": sum(1 for v in pop.viewers if v.uid),
        "phases": [
            {"name": p.name, "start_min": round(p.start, 3), "end_min": round(p.end, 3)}
            for p in spec.phases
        ],
        "surge_window_min": (
            [spec.surge_at, round(spec.surge_at + spec.surge_window, 3)] if spec.surge else None
        ),
    }
    for raw in raws:
        rep[raw.side] = side(spec, raw)
    rep["sides"] = [raw.side for raw in raws]
    rep["targets"] = targets(spec, rep)
    return rep


# ------------------------------------------------------------------ Markdown


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 or v == 0 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def _ratio3(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}"


def _row(label: str, *values: Any) -> str:
    return f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |"


def _worst_ok(phase: dict[str, Any]) -> float | None:
    ok = phase["success_ratio"]
    vals = [ok[r] for r in ("presence_ping", "access_track") if r in ok]
    return min(vals) if vals else None


def _head(rep: dict[str, Any]) -> str:
    head = f"### {rep['scenario'].upper()}: {rep['viewers']:,} viewers"
    if rep.get("surge_viewers"):
        head += f" + {rep['surge_viewers']:,} surge"
    head += f", {rep['duration_s'] / 60:g} scenario min, time scale {rep['time_scale']:g}"
    if rep["quick"]:
        head += " (quick)"
    return head


def _side_rows(rep: dict[str, Any], names: list[str]) -> list[str]:
    cols = [rep[n] for n in names]
    d = cols[0]
    lines = []
    for key, label in (
        ("db_queries_per_min", "DB queries / min"),
        ("upstream_requests_per_min", "upstream requests / min"),
        ("auth_user_calls_per_min", "/auth/v1/user calls / min"),
        ("admin_stats_upstream_per_min", "admin stats upstream / min"),
    ):
        if key in d:
            lines.append(_row(label, *(c[key] for c in cols)))
    for k in ("400", "409", "5xx", "429", "4xx_other", "failed"):
        if any(k in c["errors"] for c in cols):
            lines.append(_row(f"client responses {k}", *(c["errors"].get(k, 0) for c in cols)))
    for k in ("400", "409"):
        lines.append(
            _row(
                f"PostgREST-equivalent {k} (failed app statements)",
                *(c["db_errors"].get(k, 0) for c in cols),
            )
        )
    for r in ROUTES:
        if any(r in c["p95_ms"] for c in cols):
            lines.append(_row(f"{r} p95 ms", *(c["p95_ms"].get(r) for c in cols)))
    when = ("before_surge", "during_surge", "after_surge")
    for w in d.get("per_webinar_p95_ms", {}):
        cells = [" / ".join(_fmt(c["per_webinar_p95_ms"][w][k]) for k in when) for c in cols]
        lines.append(
            f"| {w} viewer ping p95 ms before / during / after surge | {' | '.join(cells)} |"
        )
        cells = [" / ".join(_pct(c["per_webinar_error_rate"][w][k]) for k in when) for c in cols]
        lines.append(f"| {w} viewer errors before / during / after surge | {' | '.join(cells)} |")
    if any("last_seen_check" in c for c in cols):
        cells = []
        for c in cols:
            chk = c.get("last_seen_check")
            if chk is None:
                cells.append("—")
                continue
            good = chk["viewers"] - chk["missing"] - chk["lagging_more_than_one_flush_interval"]
            cells.append(f"{good} / {chk['viewers']} (max lag {_fmt(chk['max_lag_s'])} s)")
        lines.append(
            "| viewers with DB last-seen within one flush interval of the client's | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        _row(
            "pg_stat_database transactions / (statements + pool resets) counted",
            *(_ratio3(c["pg_stat_database"]["ratio"]) for c in cols),
        )
    )
    cpu = [_fmt(d["cpu_s"].get("sim_app"))] + [
        f"{_fmt(c['cpu_s'].get('sim_app'))} / {_fmt(c['cpu_s'].get('gateway'))}" for c in cols[1:]
    ]
    lines.append(f"| CPU s (sim app / gateway) | {' | '.join(cpu)} |")
    return lines


def markdown(rep: dict[str, Any]) -> str:
    names = [n for n in rep.get("sides", ["direct", "gateway"]) if n in rep]
    d, g = rep["direct"], rep["gateway"]
    lines = [
        _head(rep),
        "",
        "| figure | " + " | ".join(SIDE_TITLES.get(n, n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
        *_side_rows(rep, names),
    ]
    if "phases" in d:
        lines += [
            "",
            "| phase | upstream req/min direct / gateway | chat polls reaching the app/min"
            " direct / gateway | worst ping/track success direct / gateway |",
            "|---|---:|---:|---:|",
        ]
        for name, dp in d["phases"].items():
            gp = g["phases"][name]
            cells = [
                (dp["upstream_requests_per_min"], gp["upstream_requests_per_min"]),
                (dp["chat_poll_upstream_per_min"], gp["chat_poll_upstream_per_min"]),
                (_worst_ok(dp), _worst_ok(gp)),
            ]
            lines.append(
                f"| {name} | " + " | ".join(f"{_fmt(a)} / {_fmt(b)}" for a, b in cells) + " |"
            )
    lines += ["", "Targets (incident review; reported, not asserted):", ""]
    for t in rep["targets"]:
        mark = {True: "met", False: "NOT met", None: "info"}[t["met"]]
        lines.append(f"- {t['target']}: {_fmt(t['value'])} (target {t['limit']}) — {mark}")
    if rep.get("chart"):
        lines += ["", f"Chart: `{rep['chart']}`"]
    return "\n".join(lines) + "\n"
