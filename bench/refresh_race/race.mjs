// Several supabase-js clients sharing one session race to refresh it.
//
// Driven by bench/refresh_race.py, which starts the fake GoTrue (and the gateway) and
// passes a JSON plan file: { url, anonKey, sessions: [session...], clientsPerUser,
// rounds, participate, jitterMs, pauseMs, seed }.
//
// Model: per user, `clientsPerUser` clients (two tabs, the Next.js middleware, a server
// component...) each hold their own copy of the session, as cookies/localStorage copies
// do. In each round every still-signed-in client takes part with probability
// `participate`; a participant's access token has just expired (the tab woke up, a new
// server request came in), so it refreshes, and all participants of the round do so at
// once (within `jitterMs`). A client that sat a round out keeps an older refresh token:
// that is how real clients end up presenting a grandparent token. A refresh rejected while
// the access token has expired makes supabase-js remove the session (SIGNED_OUT).
//
// Prints one JSON object with the counts.

import { readFileSync } from 'node:fs'
import { createClient } from '@supabase/supabase-js'

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'))
const STORAGE_KEY = 'sb-race-auth-token'
// Realtime is never used here; Node 20 has no global WebSocket and supabase-js builds its
// realtime client eagerly, so it gets a stand-in that is never opened.
class NoWebSocket {
  constructor() {
    throw new Error('realtime is not used by this bench')
  }
}

// mulberry32: a seeded PRNG so both runs (with and without the gateway) draw the same
// participation pattern.
function prng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const rand = prng(plan.seed)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function memoryStorage(initial) {
  const m = new Map(Object.entries(initial))
  return {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => void m.set(k, v),
    removeItem: (k) => void m.delete(k),
    map: m,
  }
}

function expireAccessToken(storage) {
  // The access token ran out while this client was idle: only the refresh token is left.
  const raw = storage.getItem(STORAGE_KEY)
  if (raw === null) return false
  const s = JSON.parse(raw)
  s.expires_at = Math.floor(Date.now() / 1000) - 5
  storage.setItem(STORAGE_KEY, JSON.stringify(s))
  return true
}

const counts = {
  clients: 0,
  token_requests: 0,
  refresh_attempts: 0,
  refresh_ok: 0,
  refresh_errors: {},
  signed_out_events: 0,
  clients_signed_out: 0,
  users_with_a_signed_out_client: 0,
}

// Counts the HTTP refresh calls the clients really make: refreshSession() on an expired
// session makes two (the session load refreshes first, then the explicit refresh).
const countingFetch = (input, init) => {
  const url = typeof input === 'string' ? input : input.url
  if (url.includes('grant_type=refresh_token')) counts.token_requests++
  return fetch(input, init)
}

const users = []
for (const session of plan.sessions) {
  const clients = []
  for (let i = 0; i < plan.clientsPerUser; i++) {
    const storage = memoryStorage({ [STORAGE_KEY]: JSON.stringify(session) })
    const client = createClient(plan.url, plan.anonKey, {
      auth: {
        storage,
        storageKey: STORAGE_KEY,
        autoRefreshToken: false,
        persistSession: true,
        detectSessionInUrl: false,
      },
      realtime: { transport: NoWebSocket },
      global: { fetch: countingFetch },
    })
    const c = { client, storage, signedOut: false }
    client.auth.onAuthStateChange((event) => {
      if (event === 'SIGNED_OUT') {
        counts.signed_out_events++
        c.signedOut = true
      }
    })
    clients.push(c)
    counts.clients++
  }
  users.push(clients)
}
// Let every client finish initialize() with its (still valid) session.
await Promise.all(users.flat().map((c) => c.client.auth.getSession()))

async function refresh(c) {
  await sleep(rand() * plan.jitterMs)
  counts.refresh_attempts++
  const { error } = await c.client.auth.refreshSession()
  if (error) {
    const code = error.code || error.name || 'error'
    counts.refresh_errors[code] = (counts.refresh_errors[code] || 0) + 1
  } else {
    counts.refresh_ok++
  }
}

for (let round = 0; round < plan.rounds; round++) {
  const tasks = []
  for (const clients of users) {
    for (const c of clients) {
      if (c.signedOut || rand() >= plan.participate) continue
      if (!expireAccessToken(c.storage)) continue
      tasks.push(refresh(c))
    }
  }
  await Promise.all(tasks)
  if (round < plan.rounds - 1) await sleep(plan.pauseMs)
}

for (const clients of users) {
  let any = false
  for (const c of clients) {
    if (c.storage.getItem(STORAGE_KEY) === null) {
      counts.clients_signed_out++
      any = true
    }
  }
  if (any) counts.users_with_a_signed_out_client++
}
console.log(JSON.stringify(counts))
process.exit(0)
