"""notifier's benchmark: ``python -m bench`` (see README.rst, "Benchmark").

Three scenarios on 127.0.0.1, side by side: Floor A (plain ``requests`` loops, the sender
limit), Floor B (one Celery task per POST, the Celery limit) and notifier itself; then (bench/extra.py)
end-to-end latency at half of notifier's rate, POST /v3/events, isolation and many webhooks;
and (bench/soak.py) the soak.
"""
