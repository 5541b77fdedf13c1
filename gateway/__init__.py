"""EventLive Edge: an ASGI edge gateway in front of a Next.js + Supabase webinar app."""

__version__ = "0.1.0"
