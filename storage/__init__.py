"""Storage: ids, shard routing, pools, migrations, data access, Redis keys.

Below fanout and gateway, above core. Nothing here imports `fanout` or `gateway`.
"""
