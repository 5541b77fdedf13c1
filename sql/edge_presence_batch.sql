-- edge_presence_batch(payload jsonb): the batch-mode flush target of EventLive Edge.
--
-- The gateway's heartbeat policy (mode: batch) POSTs one request per webinar per
-- flush_interval to PostgREST:
--
--   POST /rest/v1/rpc/edge_presence_batch
--   apikey: <service key>            Authorization: Bearer <service key>
--   {"payload": {"webinar_id": "<id>",
--                "viewers": [{"user_id": "<auth.users id>",
--                             "last_seen_at": "2026-11-26T10:00:00.000+00:00"}, ...]}}
--
-- and this function writes all of it with ONE upsert into webinar_live_presence, so a
-- 1,000-viewer webinar costs one statement per flush instead of 4-10 queries per ping.
-- Columns are converted with the table's own types (jsonb_populate_recordset), so the
-- function works whether the ids are uuid or text. last_seen_at never moves backwards
-- (a retried or late flush cannot overwrite a newer time). Returns the rows written.
--
-- Needs a unique constraint or index on webinar_live_presence (webinar_id, user_id).
-- `set search_path from current` pins the schema the function is created in (public on
-- Supabase), so PostgREST's or a caller's search_path cannot redirect the table.

create or replace function edge_presence_batch(payload jsonb)
returns integer
language plpgsql
volatile
set search_path from current
as $$
declare
  written integer;
begin
  if payload is null or jsonb_typeof(payload -> 'viewers') is distinct from 'array' then
    raise exception 'edge_presence_batch: payload.viewers must be an array'
      using errcode = '22023';
  end if;

  insert into webinar_live_presence as p (webinar_id, user_id, last_seen_at)
  select distinct on (r.user_id) r.webinar_id, r.user_id, r.last_seen_at
  from jsonb_populate_recordset(
         null::webinar_live_presence,
         (select coalesce(jsonb_agg(v || jsonb_build_object('webinar_id', payload -> 'webinar_id')),
                          '[]'::jsonb)
          from jsonb_array_elements(payload -> 'viewers') as v)
       ) as r
  where r.user_id is not null and r.last_seen_at is not null
  -- One row per viewer even if a payload repeats one (ON CONFLICT may touch a row once).
  order by r.user_id, r.last_seen_at desc
  on conflict (webinar_id, user_id)
  do update set last_seen_at = greatest(p.last_seen_at, excluded.last_seen_at);

  get diagnostics written = row_count;
  return written;
end;
$$;

-- Only the gateway (service role) may call it; PostgREST exposes functions to anon and
-- authenticated by default. The guard keeps the file runnable on a plain PostgreSQL.
revoke all on function edge_presence_batch(jsonb) from public;
do $$
begin
  if exists (select 1 from pg_roles where rolname = 'service_role') then
    execute 'grant execute on function edge_presence_batch(jsonb) to service_role';
  end if;
  if exists (select 1 from pg_roles where rolname = 'anon') then
    execute 'revoke all on function edge_presence_batch(jsonb) from anon';
  end if;
  if exists (select 1 from pg_roles where rolname = 'authenticated') then
    execute 'revoke all on function edge_presence_batch(jsonb) from authenticated';
  end if;
end
$$;
