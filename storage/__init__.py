"""Storage: settings, errors, ids, shard routing, pools, migrations, data access, Redis keys.

The lowest layer. Nothing here imports `fanout` or `gateway`.
"""
