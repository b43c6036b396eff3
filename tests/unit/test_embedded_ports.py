"""Servers built together take their ports before any binds: no port may be handed out twice."""
from app.embedded import free_port


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
