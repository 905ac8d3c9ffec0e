"""The HTTP/1.1 engine, the only place that speaks sockets: the apps' side
(:mod:`~proxy.http1.listener`), the partners' side (:mod:`~proxy.http1.upstream`),
the HTTP/1.1 policy both apply (:mod:`~proxy.http1.policy`) and the check of
the aiohttp internals they rely on (:mod:`~proxy.http1.compat`). Every aiohttp
exception is translated into :mod:`proxy.errors` here.
"""
