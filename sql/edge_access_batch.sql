-- edge_access_batch(payload jsonb): write-behind target of EventLive Edge for viewer
-- heartbeats (access/track, and presence/ping with bulk joins).
--
-- The gateway's heartbeat policy (mode: batch) POSTs one request per webinar per
-- flush_interval to PostgREST:
--
--   POST /rest/v1/rpc/edge_access_batch
--   apikey: <service key>            Authorization: Bearer <service key>
--   {"payload": {"webinar_id": "<id>",
--                "viewers": [{"user_id": "<auth.users id>",
--                             "last_seen_at": "2026-11-26T10:00:00.000+00:00",
--                             "join": true}, ...]}}
--
-- `join` is present (true) on a viewer's first heartbeat when the route has `join: batch`:
-- the edge did not forward it to the app, so this function does what the app's first
-- heartbeat did. In ONE statement (data-modifying CTEs) it
--   - refuses: every viewer of an unknown webinar; a joining viewer of an `ended` webinar
--     without a registration. Nothing is written for a refused viewer; its id comes back
--     in `refused` and the gateway answers that viewer's heartbeats with a negative
--     response (the unregistered-viewer error loop stops at the edge);
--   - registers the other joining viewers (registrations, `on conflict do nothing`: no
--     23505, no re-select);
--   - upserts presence (webinar_live_presence.last_seen_at, never backwards);
--   - upserts the viewer's session: last_seen never moves backwards, and watch time
--     grows by min(new last_seen - stored last_seen, max_gap) only when last_seen
--     advances, so a duplicate flush, a retry after a timeout that did reach the
--     database, or an older flush arriving late adds 0 (the row lock of ON CONFLICT
--     serialises concurrent flushes of one viewer). A gap longer than max_gap (default
--     600 s, payload.max_gap_s) is a viewer who left and came back: it counts max_gap;
--   - logs one `event_access_logs` row per session it creates (the viewer's entry).
-- Returns {"written": <session rows upserted>, "refused": [<user ids>]}.
--
-- Ids are typed by webinar_live_presence's own columns (jsonb_populate_record), so uuid
-- or text ids both work. `set search_path from current` pins the schema the function is
-- created in (public on Supabase). Needs unique constraints on
-- webinar_live_presence (webinar_id, user_id), webinar_user_sessions (webinar_id,
-- session_key) and registrations (webinar_id, user_id).

-- Watch time per session (seconds; fractional so compressed bench runs add up too).
alter table webinar_user_sessions
  add column if not exists watch_seconds double precision not null default 0;

create or replace function edge_access_batch(payload jsonb)
returns jsonb
language plpgsql
volatile
set search_path from current
as $$
declare
  max_gap double precision;
  result jsonb;
begin
  if payload is null or jsonb_typeof(payload -> 'viewers') is distinct from 'array' then
    raise exception 'edge_access_batch: payload.viewers must be an array'
      using errcode = '22023';
  end if;
  max_gap := coalesce((payload ->> 'max_gap_s')::double precision, 600);

  with v as (
    -- One row per viewer (a payload may repeat one): the latest time, a join if any
    -- entry says so.
    select p.webinar_id, p.user_id, max(p.last_seen_at) as last_seen_at,
           bool_or(coalesce((e ->> 'join')::boolean, false)) as is_join
    from jsonb_array_elements(payload -> 'viewers') as e
    cross join lateral jsonb_populate_record(
      null::webinar_live_presence,
      e || jsonb_build_object('webinar_id', payload -> 'webinar_id')) as p
    where p.user_id is not null and p.last_seen_at is not null
    group by p.webinar_id, p.user_id
  ), d as (
    select v.*,
           w.id is null
             or (v.is_join and w.status = 'ended' and r.user_id is null) as refused
    from v
    left join webinars w on w.id = v.webinar_id
    left join registrations r on v.is_join and r.webinar_id = v.webinar_id
                             and r.user_id = v.user_id
  ), reg as (
    insert into registrations (webinar_id, user_id, full_name, source)
    select d.webinar_id, d.user_id, pr.full_name, 'auto'
    from d left join profiles pr on pr.id = d.user_id
    where d.is_join and not d.refused
    on conflict do nothing
    returning 1
  ), pres as (
    insert into webinar_live_presence as p (webinar_id, user_id, last_seen_at)
    select d.webinar_id, d.user_id, d.last_seen_at from d where not d.refused
    on conflict (webinar_id, user_id)
    do update set last_seen_at = greatest(p.last_seen_at, excluded.last_seen_at)
    returning 1
  ), sess as (
    insert into webinar_user_sessions as s
      (webinar_id, session_key, user_id, first_seen, last_seen, hits, watch_seconds)
    select d.webinar_id, d.user_id::text, d.user_id, d.last_seen_at, d.last_seen_at, 1, 0
    from d where not d.refused
    on conflict (webinar_id, session_key) do update set
      -- Every right-hand side reads the stored row (s.*), before this update.
      watch_seconds = s.watch_seconds + case
        when excluded.last_seen > s.last_seen
          then least(extract(epoch from excluded.last_seen - s.last_seen), max_gap)
        else 0 end,
      hits = s.hits + case when excluded.last_seen > s.last_seen then 1 else 0 end,
      last_seen = greatest(s.last_seen, excluded.last_seen)
    -- xmax = 0: the row was inserted by this statement (a new session, i.e. an entry).
    returning s.webinar_id, s.user_id, s.session_key, s.first_seen, (s.xmax = 0) as created
  ), logs as (
    insert into event_access_logs (webinar_id, user_id, session_key, created_at)
    select sess.webinar_id, sess.user_id, sess.session_key, sess.first_seen
    from sess where sess.created
    returning 1
  )
  select jsonb_build_object(
           'written', (select count(*) from sess),
           'refused', coalesce((select jsonb_agg(d.user_id order by d.user_id)
                                from d where d.refused), '[]'::jsonb))
  into result;
  return result;
end;
$$;

-- Only the gateway (service role) may call it; PostgREST exposes functions to anon and
-- authenticated by default. The guard keeps the file runnable on a plain PostgreSQL.
revoke all on function edge_access_batch(jsonb) from public;
do $$
begin
  if exists (select 1 from pg_roles where rolname = 'service_role') then
    execute 'grant execute on function edge_access_batch(jsonb) to service_role';
  end if;
  if exists (select 1 from pg_roles where rolname = 'anon') then
    execute 'revoke all on function edge_access_batch(jsonb) from anon';
  end if;
  if exists (select 1 from pg_roles where rolname = 'authenticated') then
    execute 'revoke all on function edge_access_batch(jsonb) from authenticated';
  end if;
end
$$;
