"""The caching registry gateway: acrrelay's second role, on the data-centre side.

The relay (the first role) sits in the registry's region and splices TLS it never opens. The
gateway sits in the data centre, in front of that relay, terminates TLS for the routed registry
names with certificates from the operator's own CA, and keeps blobs by digest so that a layer
crosses the data centre's line once. It never widens access: before a single cached byte reaches
a client, the registry has accepted that client's own credential for that repository and digest
(see :mod:`acrrelay.gateway.proof`). A TOML file with a ``[gateway]`` table runs this role.

Modules (pure ones need no reactor and open no socket):

- :mod:`~acrrelay.gateway.registryapi` (pure): ``classify(method, target)``, which requests
  are cacheable (GET/HEAD of a blob or manifest by sha256 digest) and which pass through.
- :mod:`~acrrelay.gateway.proof` (pure): ``ProofCache``, what upstream has proven, per hashed
  credential and repository, for a short time never past the token's expiry.
- :mod:`~acrrelay.gateway.store` (plain file I/O): ``BlobStore``, content-addressed blobs under a
  size cap with LRU eviction, verified before an atomic publish; ``Spool`` for a download and
  the readers (from :mod:`~acrrelay.gateway.spool`, re-exported).
- :mod:`~acrrelay.gateway.ca` (pure): the internal CA and a leaf certificate per routed name.
- :mod:`~acrrelay.gateway.config` (pure): the ``[gateway]`` table, ``load_gateway``.
- :mod:`~acrrelay.gateway.commands`: ``acrrelay ca init`` and ``acrrelay cache verify``.
- The Twisted side (TLS termination, the HTTP server, the upstream client, the blob path and
  the service) lives in its own modules beside these.
"""
