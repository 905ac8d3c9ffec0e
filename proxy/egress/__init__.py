"""HTTPS egress: CONNECT interception and blind tunnels."""
