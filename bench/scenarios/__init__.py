"""Load scenarios S1-S3 against the simulated EventLive app (bench/sim_app.py), run
straight at the app and through the gateway: `python -m bench s1|s2|s3 [--quick]`."""
