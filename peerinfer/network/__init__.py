"""The peer-to-peer layer: identities, signed peer records, the OpenDHT seam, discovery, announcing.

- ``identity``: the worker's Ed25519 key pair and peer id (the only module importing ``cryptography``).
- ``records``: the signed peer record, its canonical encoding and the reader's checks. Pure.
- ``addresses``: bootstrap lists, bind hosts and endpoint guesses. Pure.
- ``dht``: the only module importing ``opendht``; put, get and a private network id.
- ``discovery``: live, verified peer records for a model, with counts of what was dropped.
- ``worker``: what a worker adds to its app: the DHT node, the announcer and ``/peer/challenge``.
- ``cli``: ``python3 -m peerinfer bootstrap`` and ``python3 -m peerinfer peers``.
"""
