"""A soak of the relay: many connections, mixed sizes, faults sprinkled in (not part of CI).

python -m soak                          # 100 000 connections; plot and summary in bench/results
python -m soak --connections 20000 --workers 16 --out /tmp/soak
python -m soak --quick                  # 2 000 connections, well under a minute (the test suite)

It starts ``tls_backend.py`` and a ``twist acrrelay`` (the installed one) on loopback, as
the end-to-end tests do, and runs the connections on worker threads, each kind drawn at
random (seeded): small plain-HTTP requests, blobs of 1 KiB to 1 MiB over plain HTTP and
over TLS, a few large blobs, and faults: backends that reset mid-blob, clients that reset
mid-blob, clients that connect and send nothing or one byte. Every blob is checked by
sha256; every fault must end the way the relay promises (a backend's reset reaches the
client as a reset, after every byte the relay read from that backend, which its access log
counts as ``bytes_down``; a silent client is closed at the peek timeout). Bytes a backend
wrote but still held in its own kernel when it reset die with the reset before the relay
can read them: such a transfer is counted as cut short by the backend, not as an error.

It samples the relay's RSS, open file descriptors and active connections (from its
metrics page) as it goes, and writes ``soak-<time>.png`` (the three over time),
``soak-<time>.csv`` (the samples) and ``soak-<time>.txt`` (the summary line, also printed
last). It exits 1 if any connection went wrong, the relay died, a file descriptor was
left open, or the access log does not have one line per connection.
"""
