"""The Lua scripts of the service, shipped as package data (app/engine/scripts.py loads them)."""
