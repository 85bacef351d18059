"""Reproducible benchmarks of Agora against the real stack on localhost.

One command each (`python -m bench.storm`, `bench.reconnect`, `bench.fanout`, `bench.feeds`);
each starts its own engines and processes, writes `bench/results/<name>.json` and updates
`bench/RESULTS.md`. See `bench/RESULTS.md` for the commands, the machine and the numbers.
"""
