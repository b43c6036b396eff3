"""The Lua scripts of the service, shipped as package data (app/scripts.py loads them)."""
