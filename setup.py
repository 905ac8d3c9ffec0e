"""The optional compiled build (issue 16; docs/performance.md, "The compiled build").

    pip install "mypy>=1.10" "setuptools>=77"
    AUTHPROXY_COMPILE=1 pip install --no-build-isolation .

compiles the hot path's modules (COMPILED, below) with mypyc (a C compiler and
the Python headers are needed where it builds); without AUTHPROXY_COMPILE the
package is pure Python, and that is the fallback: the same source, the same
tests (.ci/run runs the suite on both). In a checkout,
``AUTHPROXY_COMPILE=1 python setup.py build_ext --inplace`` puts the compiled
modules beside their sources, where they win over the .py files until
``find proxy -name '*.so' -delete; rm -rf build`` takes them away again.
"""

import os

from setuptools import setup

# The hot path's modules: the HTTP rules, routing, forwarding, the access
# log, the per-request metrics and the two protocol modules (AppConnection
# and _Connection stay Python classes, subclasses of aiohttp's, with
# compiled methods; the other classes there are native). Not proxy/http1/spelling.py: a compiled subclass of aiohttp's
# Python parser would get the C parser as its base (mypyc resolves
# HttpRequestParserPy through aiohttp's alias to HttpRequestParser).
COMPILED = [
    "proxy/http1/policy.py",
    "proxy/routing/router.py",
    "proxy/routing/table.py",
    "proxy/forwarding/forwarder.py",
    "proxy/forwarding/headers.py",
    "proxy/forwarding/send.py",
    "proxy/metrics.py",
    "proxy/log.py",
    "proxy/http1/listener.py",
    "proxy/http1/upstream.py",
]

ext_modules = []
if os.environ.get("AUTHPROXY_COMPILE") == "1":
    from mypyc.build import mypycify

    # group_name: the shared runtime library goes inside the package
    # (proxy/_native__mypyc...so), not beside it at the top level.
    ext_modules = mypycify(COMPILED, opt_level="3", group_name="proxy._native")

setup(ext_modules=ext_modules)
