"""Route policies. Each module owns one policy: its config section (a pydantic model that
config.py mounts on the route), its behaviour (a pure-ASGI-style handler wrapper built once
per route in `__init__`), and its metrics. The order they run in lives in app.py."""
