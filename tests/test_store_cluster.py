"""The store at scale: the store contract and the refresh, rate-limit, heartbeat and cache
tests run again on a real 3-master Redis Cluster (`redis+cluster://`) and on Sentinel
(`redis+sentinel://`, one master + one replica + one sentinel), plus what only those
topologies have: keys of one script in one slot, batches spread over masters, a master
dying, a Sentinel failover.

How the shared tests are reused without touching their files: they are imported here, and
this module's own `redis_url` / `store_url` / `backend` / `store` fixtures (which take
precedence over conftest's for tests collected in this module) hand them the cluster or
sentinel URL. The servers are started by session fixtures below (tests/redis_cluster.py)
on free loopback ports: nothing outside the test run is needed, and nothing shared is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from gateway.policies.heartbeat.policy import _index_keys, _webinar_keys, seen_key
from gateway.policies.ratelimit.policy import compile_rules
from gateway.policies.refresh.policy import _keys as refresh_keys
from gateway.policies.refresh.policy import token_digest
from gateway.store import Store, StoreError
from gateway.store.redis import RedisStore, parse_store_url
from tests.fakes.app import FakeApp
from tests.helpers import run_gateway
from tests.redis_cluster import RedisClusterServers, SentinelServers

# The shared tests, collected again in this module (see the module docstring).
from tests.test_cache import (
    test_cache_status_and_age,
    test_other_replica_waits_for_the_refresh,
    test_stale_while_revalidate,
    test_waiters_share_the_leaders_error,
)
from tests.test_heartbeat import (
    test_batch_flushes_on_shutdown,
    test_negative_answer_is_cached_per_viewer,
    test_one_forward_per_viewer_per_interval,
    test_presence_counts_viewers_within_window,
    test_recorder_sends_one_round_trip_for_heartbeats_of_one_turn,
    test_webinars_are_separate,
)
from tests.test_ratelimit import (
    HOUR,
    config,
    route,
    test_all_rules_in_one_decision,
    test_burst_then_refused_with_headers,
    test_keys_are_independent,
    test_lua_and_python_twin_agree,
    test_shared_limit_across_two_gateways,
    test_user_key_falls_back_to_ip,
    test_user_limit_with_verified_tokens,
)
from tests.test_refresh import (
    gotrue,
    test_50_concurrent_refreshes_make_one_upstream_call,
    test_different_tokens_are_not_merged,
    test_errors_pass_through_unchanged_and_are_not_cached,
    test_follower_times_out_with_504_when_the_leader_never_answers,
    test_replay_never_outlives_the_new_access_token,
    test_replay_within_grace_then_upstream_after_it,
    test_two_replicas_sharing_the_store_make_one_upstream_call,
)
from tests.test_store import (
    COUNTER,
    test_get_set_delete,
    test_incr_sets_ttl_once,
    test_script_is_atomic_and_prefixed,
    test_set_nx_is_a_lock,
    test_ttl_expires,
)

REUSED = [
    test_cache_status_and_age,
    test_negative_answer_is_cached_per_viewer,
    test_other_replica_waits_for_the_refresh,
    test_stale_while_revalidate,
    test_waiters_share_the_leaders_error,
    test_batch_flushes_on_shutdown,
    test_one_forward_per_viewer_per_interval,
    test_presence_counts_viewers_within_window,
    test_recorder_sends_one_round_trip_for_heartbeats_of_one_turn,
    test_webinars_are_separate,
    gotrue,
    test_all_rules_in_one_decision,
    test_burst_then_refused_with_headers,
    test_keys_are_independent,
    test_lua_and_python_twin_agree,
    test_shared_limit_across_two_gateways,
    test_user_key_falls_back_to_ip,
    test_user_limit_with_verified_tokens,
    test_50_concurrent_refreshes_make_one_upstream_call,
    test_different_tokens_are_not_merged,
    test_errors_pass_through_unchanged_and_are_not_cached,
    test_follower_times_out_with_504_when_the_leader_never_answers,
    test_replay_never_outlives_the_new_access_token,
    test_replay_within_grace_then_upstream_after_it,
    test_two_replicas_sharing_the_store_make_one_upstream_call,
    test_get_set_delete,
    test_incr_sets_ttl_once,
    test_script_is_atomic_and_prefixed,
    test_set_nx_is_a_lock,
    test_ttl_expires,
]


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelServers]:
    servers = SentinelServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


# The store contract runs on both topologies; the policy tests on the cluster only (the
# topology with the extra rule, one slot per script), to keep this module well under 30 s.
BOTH_TOPOLOGIES = {
    test_get_set_delete,
    test_incr_sets_ttl_once,
    test_script_is_atomic_and_prefixed,
    test_set_nx_is_a_lock,
    test_ttl_expires,
    test_two_replicas_sharing_the_store_make_one_upstream_call,
    test_shared_limit_across_two_gateways,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "topology" in metafunc.fixturenames:
        both = metafunc.function in BOTH_TOPOLOGIES
        params = ["cluster", "sentinel"] if both else ["cluster"]
        metafunc.parametrize("topology", params, indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, topology: str) -> str:
    """Overrides conftest's db-15 fixture for every test in this module: a flushed Redis
    Cluster, or a flushed Sentinel-managed master."""
    name = "redis_cluster" if topology == "cluster" else "redis_sentinel"
    servers: RedisClusterServers | SentinelServers = request.getfixturevalue(name)
    servers.flush()
    return servers.url


@pytest.fixture
def store_url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
def backend() -> str:
    return "redis"


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[tuple[Store, None]]:
    s = RedisStore(redis_url, "t:", timeout=0.5)
    await s.start()
    yield s, None
    await s.close()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    redis_cluster.flush()
    return redis_cluster.url


# ------------------------------------------------------------------------------ URLs


def test_cluster_and_sentinel_urls_parse() -> None:
    c = parse_store_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert c is not None and c.kind == "cluster"
    assert c.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (c.username, c.password) == ("u", "p@ss")
    s = parse_store_url("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/3")
    assert s is not None and (s.kind, s.service, s.db, s.password) == (
        "sentinel",
        "mymaster",
        3,
        "pw",
    )
    assert parse_store_url("redis://localhost:6379/0") is None
    for bad in (
        "redis+cluster://h",
        "redis+cluster://h:1/2",
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/m/x",
    ):
        with pytest.raises(ValueError, match=r"redis\+|database|path"):
            parse_store_url(bad)


def test_config_check_names_a_bad_store_url() -> None:
    from gateway.config import StoreConfig

    assert StoreConfig(url="redis+sentinel://s1:26379,s2:26379/mymaster").url.endswith("master")
    with pytest.raises(ValueError, match="host:port"):
        StoreConfig(url="redis+cluster://10.0.0.1")
    with pytest.raises(ValueError, match="unsupported store scheme 'memcached'"):
        StoreConfig(url="memcached://10.0.0.1:11211")


def test_cluster_refuses_a_key_prefix_with_braces() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore("redis+cluster://127.0.0.1:1", "edge:{x}:")


# ------------------------------------------------------------------------ hash tags


def _one_slot(keys: list[str], prefix: str = "edge:") -> bool:
    return len({key_slot((prefix + k).encode()) for k in keys}) == 1


@pytest.mark.parametrize("value", ["w1", "webinar-{evil}", "}{", "a" * 64])
def test_every_multi_key_script_keeps_its_keys_in_one_slot(value: str) -> None:
    # heartbeat_record/outcome/flush (webinar keys), heartbeat_index (route keys)
    assert _one_slot(_webinar_keys(value, "hb-route"))
    assert _one_slot([seen_key(value), *_webinar_keys(value, "other-route")])
    assert _one_slot(_index_keys(value))
    # refresh_begin/poll/commit: replay entry, lock and the flight's answer
    k = refresh_keys(token_digest(value))  # keys are named by the token's digest
    assert _one_slot([k.res, k.lock, k.done("flight-1")])
    # gcra: every rule of one route, whatever each rule keys on
    from gateway.policies.ratelimit.config import RateLimitRule

    rules = compile_rules(
        value,
        [
            RateLimitRule.model_validate({"by": "ip", "rate": "10/s"}),
            RateLimitRule.model_validate({"by": "user", "rate": "1/m", "burst": 3}),
            RateLimitRule.model_validate({"by": "header:x-api-key", "rate": "5/s"}),
        ],
        "open",
    )
    assert _one_slot([r.key(v) for r, v in zip(rules, ["1.2.3.4", "u-1", value], strict=True)])
    # cache_lock/fill/mget: the entry, its lock and per-user copies share
    # "cache:{route:digest}" (checked end to end in the cache tests); a tag is never escaped
    assert Store.tag(value).count("{") == 1 and Store.tag(value).count("}") == 1


# ------------------------------------------------------------------- cluster behaviour


async def test_run_many_spreads_over_masters_and_keeps_order(
    cluster_url: str, redis_cluster: RedisClusterServers
) -> None:
    s = RedisStore(cluster_url, "t:", timeout=1)
    await s.start()
    try:
        tags = [Store.tag(f"w{i}") for i in range(12)]
        owners = {redis_cluster.owner_of(f"t:a:{t}") for t in tags}
        assert len(owners) == 3  # the batch really touches every master
        calls = [([f"a:{t}", f"b:{t}"], [i + 1]) for i, t in enumerate(tags)]
        assert await s.run_many(COUNTER, calls) == [[i + 1, i + 1] for i in range(12)]
        assert await s.run_many(COUNTER, calls) == [[2 * (i + 1)] * 2 for i in range(12)]
        # A call that fails on its own (wrong type) fails alone; the others ran.
        await s.set(f"a:{tags[5]}", b"not a number")
        replies = await s.run_many(COUNTER, calls[4:7])
        assert replies[0] == [15, 15] and replies[2] == [21, 21]
        assert isinstance(replies[1], StoreError) and replies[1].kind == "response"
        assert s.health.ok
        # A new master (or SCRIPT FLUSH) without the script: loaded again, run once.
        redis_cluster.flush()
        assert await s.run_many(COUNTER, calls[:3]) == [[1, 1], [2, 2], [3, 3]]
    finally:
        await s.close()


async def test_a_frozen_master_fails_only_its_calls_in_a_batch() -> None:
    """One master hangs (SIGSTOP: no RST, just silence). A batch over every master
    answers the healthy masters' calls and fails only the frozen one's, within
    store.timeout, without pushing the whole store into back-off."""
    servers = RedisClusterServers(node_timeout_ms=60_000)
    servers.start()
    try:
        s = RedisStore(servers.url, "t:", timeout=0.3, failure_threshold=2)
        await s.start()
        try:
            tags = [Store.tag(f"w{i}") for i in range(12)]
            victim = servers.owner_of(f"t:a:{tags[0]}")
            calls = [([f"a:{t}", f"b:{t}"], [1]) for t in tags]
            assert len(await s.run_many(COUNTER, calls)) == 12
            servers.freeze(victim)
            for _ in range(3):  # more batches than failure_threshold
                t0 = time.perf_counter()
                replies = await s.run_many(COUNTER, calls)
                assert time.perf_counter() - t0 < 1.0
                for t, reply in zip(tags, replies, strict=True):
                    if servers.owner_of(f"t:a:{t}") == victim:
                        assert isinstance(reply, StoreError)
                    else:
                        assert isinstance(reply, list)
            assert s.health.backoff_until == 0.0
        finally:
            await s.close()
    finally:
        servers.stop()


async def test_more_callers_than_connections_queue_instead_of_failing(cluster_url: str) -> None:
    # redis-py's cluster pool raises "too many connections" when full; the store makes
    # callers wait for a connection instead (within store.timeout), like one server's.
    s = RedisStore(cluster_url, "t:", timeout=2, max_connections=2)
    await s.start()
    try:
        await s.set("k:{a}", b"v")
        got = await asyncio.gather(*[s.get("k:{a}") for _ in range(200)])
        assert got == [b"v"] * 200
        assert s.health.ok and not s.health.counters
    finally:
        await s.close()


async def test_keys_across_slots_are_a_bug_not_an_outage(cluster_url: str) -> None:
    s = RedisStore(cluster_url, "t:", timeout=1, failure_threshold=1)
    await s.start()
    try:
        with pytest.raises(StoreError) as exc:
            await s.run(COUNTER, ["a:{x}", "b:{y}"], [1])
        assert exc.value.kind == "response"
        assert s.health.ok  # no back-off: the next call goes through
        assert await s.run(COUNTER, ["a:{x}", "b:{x}"], [1]) == [1, 1]
    finally:
        await s.close()


async def test_rate_limit_batches_across_masters_stay_exact(
    fake_app: FakeApp, cluster_url: str, redis_cluster: RedisClusterServers
) -> None:
    """Concurrent checks of routes whose keys live on different masters travel in the
    batcher's pipelines (one per master) and each route still admits exactly its burst."""
    names = [f"r{i}" for i in range(6)]
    owners = {redis_cluster.owner_of("edge:rl:" + Store.tag("rl:" + n)) for n in names}
    assert len(owners) >= 2
    cfg = config(
        fake_app.url,
        [route(n, f"/{n}", [{"by": "route", "rate": HOUR, "burst": 3}]) for n in names],
        {"url": cluster_url, "timeout": "2s"},
    )
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        paths = [f"/{n}" for n in names for _ in range(5)]
        replies = await asyncio.gather(*[c.get(p) for p in paths])
        for n in names:
            codes = sorted(
                r.status_code for r, p in zip(replies, paths, strict=True) if p == f"/{n}"
            )
            assert codes == [200, 200, 200, 429, 429], n
        status = gw.app.rt.services.status("ratelimit")
        assert status["redis_batches"] < status["redis_checks"]


# Failover tests share one 3 + 3 cluster (one replica per master); each takes a master
# of its own (`claim`) and may kill, freeze or replace it. The long node timeout keeps the
# cluster serving the other masters' slots meanwhile instead of declaring itself down.
class FailoverCluster:
    def __init__(self) -> None:
        self.servers = RedisClusterServers(replicas=1, node_timeout_ms=60_000)
        self.claimed: set[int] = set()

    def claim(self, *, slot_zero: bool = False) -> tuple[int, str]:
        """A master no other test has touched (with `slot_zero`, the one serving slot 0,
        which redis-py makes its default node), and a hash tag whose slot it serves."""
        s = self.servers
        if slot_zero:
            port = s.owner_of_slot(0, via=s.live[0])
            assert port not in self.claimed
        else:
            masters = {s.owner_of("t:" + Store.tag(f"w{i}")) for i in range(64)}
            port = min(masters - self.claimed - {s.owner_of_slot(0, via=s.live[0])})
        self.claimed.add(port)
        tag = next(t for i in range(10_000) if s.owner_of("t:" + (t := Store.tag(f"w{i}"))) == port)
        return port, tag


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[FailoverCluster]:
    cluster = FailoverCluster()
    try:
        cluster.servers.start()
        yield cluster
    finally:
        cluster.servers.stop()


async def test_a_dead_master_fails_its_slots_fast_and_the_rest_keep_working(
    failover_cluster: FailoverCluster,
) -> None:
    """The master of slot 0 dies (the worst one: redis-py's default node, asked for
    COMMAND whenever it re-reads the map). Its slots fail fast; the others keep working,
    scripts included, for a process that was running and for one started afterwards."""
    servers = failover_cluster.servers
    victim, tag = failover_cluster.claim(slot_zero=True)
    s = RedisStore(servers.url, "t:", timeout=0.3, failure_threshold=100)
    await s.start()
    try:
        keys = [f"k{i}" for i in range(30)]
        healthy = set(servers.live)
        alive = [k for k in keys if servers.owner_of("t:" + k) in healthy - {victim}]
        assert alive
        for k in [f"k:{tag}", *alive]:
            await s.set(k, b"v")
        servers.kill(victim)
        t0 = time.perf_counter()
        with pytest.raises(StoreError) as exc:
            await s.get(f"k:{tag}")
        assert exc.value.kind in {"connection", "timeout"}
        assert time.perf_counter() - t0 < 0.5  # bounded by store.timeout, no retries
        for k in alive:
            assert await s.get(k) == b"v"
        await s.ping()  # the health check moved off the dead default node
        fresh = RedisStore(servers.url, "t:", timeout=0.3, failure_threshold=100)
        await fresh.start()
        try:
            for k in alive:
                assert await fresh.get(k) == b"v"
            ok = next(
                t
                for t in (Store.tag(f"c{i}") for i in range(100))
                if servers.owner_of(f"t:a:{t}") in healthy - {victim}
            )
            assert await fresh.run(COUNTER, [f"a:{ok}", f"b:{ok}"], [1]) == [1, 1]
            await fresh.ping()
        finally:
            await fresh.close()
    finally:
        await s.close()


async def test_cluster_failover_is_followed_without_an_error(
    failover_cluster: FailoverCluster,
) -> None:
    """A replica takes over a master's slots: the store's stale slot map gets MOVED,
    follows it, loads the script on the new master (NOSCRIPT) and the counts carry on
    from the replicated state, for single calls and for batches."""
    servers = failover_cluster.servers
    old, tag = failover_cluster.claim()
    s = RedisStore(servers.url, "t:", timeout=1, failure_threshold=100)
    await s.start()
    try:
        keys = [f"a:{tag}", f"b:{tag}"]
        # Batch companions on the masters that are still up.
        others = [
            ([f"a:{t}", f"b:{t}"], [1])
            for t in (Store.tag(f"o{i}") for i in range(40))
            if servers.owner_of(f"t:a:{t}") in servers.live
        ][:6]
        assert await s.run(COUNTER, keys, [1]) == [1, 1]
        assert await s.run_many(COUNTER, [(keys, [1]), *others]) == [[2, 2]] + [[1, 1]] * 6
        new = servers.replica_of(old)
        with servers.client(old) as c:
            c.execute_command("WAIT", 1, 2000)  # the replica has every write so far
        servers.promote(new)
        assert servers.owner_of("t:" + keys[0]) == new
        assert await s.run(COUNTER, keys, [1]) == [3, 3]
        assert await s.run_many(COUNTER, [(keys, [1]), *others]) == [[4, 4]] + [[2, 2]] * 6
        assert s.health.ok and not s.health.counters
    finally:
        await s.close()


async def test_a_hung_master_replaced_by_its_replica_is_found_again(
    failover_cluster: FailoverCluster,
) -> None:
    """A master that stops answering without closing connections (a frozen VM: no RST)
    lets no call fail with a connection error, so nothing in redis-py re-reads the slot
    map. The store does, in the background, after a timeout: once the replica has taken
    over, calls for those slots work again although the old master never answers."""
    servers = failover_cluster.servers
    old, tag = failover_cluster.claim()
    s = RedisStore(servers.url, "t:", timeout=0.1, failure_threshold=1000)
    await s.start()
    try:
        assert await s.incr(f"n:{tag}", 1) == 1
        new = servers.replica_of(old)
        with servers.client(old) as c:
            c.execute_command("WAIT", 1, 2000)
        servers.freeze(old)  # for good: it never answers again
        servers.promote(new)
        t0 = time.monotonic()
        outcomes: list[Any] = []
        while time.monotonic() - t0 < 5:
            try:
                outcomes.append(await s.incr(f"n:{tag}", 1))
                break
            except StoreError as exc:
                outcomes.append(exc.kind)
                await asyncio.sleep(0.05)
        assert outcomes[-1] == 2, outcomes  # on the new master, from the replicated count
        assert set(outcomes[:-1]) <= {"timeout"}
    finally:
        await s.close()


# ------------------------------------------------------------------ sentinel failover


async def test_sentinel_failover_moves_writes_to_the_new_master() -> None:
    servers = SentinelServers()
    try:
        servers.start()
        s = RedisStore(servers.url, "t:", timeout=0.5, failure_threshold=100)
        await s.start()
        assert await s.incr("n", 1) == 1
        old = servers.master()
        new = servers.failover()
        assert new != old
        # The first call meets the dead master's connection: it fails as a StoreError
        # like any outage, and the next connection asks the sentinel for the master.
        results: list[Any] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                results.append(await s.incr("n", 1))
                break
            except StoreError as exc:
                results.append(exc.kind)
                await asyncio.sleep(0.05)
        assert results[-1] == 2  # the write before the failover was replicated
        assert set(results[:-1]) <= {"connection", "timeout"}
        assert len(results) <= 3
        with servers.client(new) as c:
            assert c.get("t:n") == b"2"
        await s.close()
    finally:
        servers.stop()


async def test_sentinel_failover_away_from_a_frozen_master() -> None:
    """The master freezes (no RST: every pooled connection just stops answering) and the
    sentinel promotes the replica: calls time out at store.timeout, each timed-out
    connection is dropped, and the next connection asks the sentinel, so service comes
    back after a few timeouts, not after the whole pool has been tried."""
    servers = SentinelServers()
    try:
        servers.start()
        # 0.5 s, not less: on a busy machine a fresh connection's sentinel lookup plus the
        # command can take longer than a tight budget, which would add timeouts that say
        # nothing about the pool. Five outcomes against 20 pooled connections still shows
        # the pool is not walked.
        s = RedisStore(servers.url, "t:", timeout=0.5, failure_threshold=1000)
        await s.start()
        # Several pooled connections to the master that is about to freeze.
        assert len(set(await asyncio.gather(*[s.incr("n", 1) for _ in range(20)]))) == 20
        servers.failover(freeze=True)
        outcomes: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                outcomes.append(await s.incr("n", 1))
                break
            except StoreError as exc:
                outcomes.append(exc.kind)
        assert outcomes[-1] == 21, outcomes
        assert set(outcomes[:-1]) <= {"timeout", "connection"}
        assert len(outcomes) <= 5, outcomes
        await s.close()
    finally:
        servers.stop()


async def test_a_dead_first_sentinel_does_not_take_the_store_down() -> None:
    """The first sentinel in the URL accepts connections and never answers. Every new
    connection's master lookup would spend store.timeout on it; the store looks the
    master up in the background instead, and the live sentinel moves to the front."""
    servers = SentinelServers()
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)  # the kernel completes handshakes; nothing ever reads
    try:
        servers.start()
        good = servers.url.removeprefix("redis+sentinel://")
        url = f"redis+sentinel://127.0.0.1:{blackhole.getsockname()[1]},{good}"
        s = RedisStore(url, "t:", timeout=0.05, failure_threshold=100)
        await s.start()
        try:
            ok = 0
            for i in range(20):
                with contextlib.suppress(StoreError):
                    await s.set(f"k{i}", b"v")
                    ok += 1
            assert ok == 20
        finally:
            await s.close()
    finally:
        blackhole.close()
        servers.stop()
