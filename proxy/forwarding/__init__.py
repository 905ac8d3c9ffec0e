"""The forwarding path: the typed seams an engine implements, the header
rules, the expired-token rule, the body copy, and the :class:`~proxy.forwarding.forwarder.Forwarder`
that takes a request from the app to the partner and back. No aiohttp here.
"""
