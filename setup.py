"""The optional compiled build (issue 16; docs/performance.md, "The compiled build").

    pip install "mypy>=1.10" "setuptools>=77"
    AUTHPROXY_COMPILE=1 pip install --no-build-isolation .

compiles the modules on every request's path with mypyc (a C compiler and
the Python headers are needed where it builds); without AUTHPROXY_COMPILE the
package is pure Python, and that is the fallback: the same source, the same
tests (.ci/run runs the suite on both). In a checkout,
``AUTHPROXY_COMPILE=1 python setup.py build_ext --inplace`` puts the compiled
modules beside their sources, where they win over the .py files until
``find proxy -name '*.so' -delete; rm -rf build`` takes them away again.
"""

import os

from setuptools import setup

# The hot path's pure and forwarding modules: the HTTP rules, routing,
# forwarding, the access log and the per-request metrics. The two protocol
# modules (http1/listener.py, http1/upstream.py) stay interpreted: their
# classes subclass aiohttp's, mypyc trusts mypy's narrowing of an attribute
# across a call that changes it (a TypeError at run time, found by the
# suite), which their state machines do on purpose, and with that fixed the
# suite hit a segmentation fault in the apps' side's refusal path.
COMPILED = [
    "proxy/http1/policy.py",
    "proxy/routing/router.py",
    "proxy/routing/table.py",
    "proxy/forwarding/forwarder.py",
    "proxy/forwarding/headers.py",
    "proxy/forwarding/send.py",
    "proxy/metrics.py",
    "proxy/log.py",
]

ext_modules = []
if os.environ.get("AUTHPROXY_COMPILE") == "1":
    from mypyc.build import mypycify

    # group_name: the shared runtime library goes inside the package
    # (proxy/_native__mypyc...so), not beside it at the top level.
    ext_modules = mypycify(COMPILED, opt_level="3", group_name="proxy._native")

setup(ext_modules=ext_modules)
