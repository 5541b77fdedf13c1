-- Schema of the simulated EventLive app (bench/sim_app.py): the tables the incident
-- review's hot paths touch, with the real production quirk that `registrations` has NO
-- `id` column (its primary key is (webinar_id, user_id)), so the app's
-- `select id from registrations` fails with 42703 on every heartbeat.
--
-- Ids are text so one schema serves uuid-looking ids and short bench ids alike. Loaded
-- into a throw-away database per bench run (see bench/scenarios/runner.py), together
-- with sql/edge_presence_batch.sql and sql/edge_access_batch.sql (the gateway's
-- batch-mode flush targets).

create table webinars (
  id          text primary key,
  title       text not null,
  status      text not null default 'live',       -- scheduled | live | ended
  starts_at   timestamptz not null default now(),
  created_at  timestamptz not null default now()
);

-- What GoTrue reads on every GET /auth/v1/user (auth.users on Supabase).
create table auth_users (
  id          text primary key,
  email       text not null,
  role        text not null default 'authenticated',
  created_at  timestamptz not null default now()
);

create table profiles (
  id          text primary key,
  full_name   text not null,
  role        text not null default 'viewer',     -- viewer | host | admin
  created_at  timestamptz not null default now()
);

create table registrations (
  webinar_id  text not null references webinars (id),
  user_id     text not null,
  full_name   text,
  source      text not null default 'form',       -- form | auto (presence/ping, access/track)
  created_at  timestamptz not null default now(),
  primary key (webinar_id, user_id)
);

create table webinar_user_sessions (
  webinar_id   text not null,
  session_key  text not null,                      -- user id, or the guest cookie / IP
  user_id      text,
  first_seen   timestamptz not null default now(),
  last_seen    timestamptz not null default now(),
  hits         integer not null default 1,
  -- Written by edge_access_batch (which also adds it when missing): seconds watched.
  watch_seconds double precision not null default 0,
  primary key (webinar_id, session_key)
);

create table event_access_logs (
  id           bigserial primary key,
  webinar_id   text not null,
  user_id      text,
  session_key  text not null,
  event        text not null default 'view',
  created_at   timestamptz not null default now()
);
create index event_access_logs_webinar on event_access_logs (webinar_id, created_at);

create table webinar_live_presence (
  webinar_id    text not null,
  user_id       text not null,
  last_seen_at  timestamptz not null,
  primary key (webinar_id, user_id)
);

create table chat_messages (
  id          bigserial primary key,
  webinar_id  text not null,
  user_id     text not null,
  body        text not null,
  created_at  timestamptz not null default now()
);
create index chat_messages_webinar on chat_messages (webinar_id, id);
