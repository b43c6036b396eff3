"""The reservation engine: live counters, holds, carts and their expiry in Redis.

Layering: api -> services -> engine / persistence. Nothing here imports Flask, the services or the
jobs; every script call goes through `runner.ScriptRunner`.
"""
