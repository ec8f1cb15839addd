"""The acrrelay benchmark suite: acrrelay against nginx, HAProxy and sniproxy.

``python -m bench run [--quick] [--rounds N] [--only bulk,conn,ttfb,slow,idle]
[--peers acrrelay,acrrelay-splice-off,nginx,haproxy,sniproxy]`` installs what is missing
(Debian packages, daemons kept stopped), sets up a TLS backend on loopback, and measures
direct and each relay with the same SNI route, round by round, writing
``bench/results/latest.md``, ``latest.png`` and ``latest.json``.

Modules: :mod:`bench.tools` (finding and installing peers), :mod:`bench.servers` (the
backend and the relays as processes), :mod:`bench.clients` (the bench's Python clients),
:mod:`bench.procs` (CPU and memory from /proc), :mod:`bench.run` (the measurements),
:mod:`bench.report` (Markdown and chart).

``python -m bench gateway [--quick]`` is issue 11's benchmark of the caching gateway: N
clients pull one image through the relay alone and through gateway + relay over a 50 MB/s
user-space line, then a hit beside nginx ``proxy_cache``; it writes
``bench/results/gateway-latest.md`` and ``.json``. Modules: :mod:`bench.gateway` (the
scenario), :mod:`bench.gwservers` (fake registry on nginx, relay, gateway, proxy_cache),
:mod:`bench.shaper` (the line), :mod:`bench.pullclient` (one client),
:mod:`bench.tlsserve` (minimal Python TLS file servers), :mod:`bench.gwreport` (Markdown).
"""
