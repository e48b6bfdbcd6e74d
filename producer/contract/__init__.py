"""The contract between producers and workers: what both sides import, and nothing else of the project.

- :mod:`.settings`: every ``M3Q_*`` setting, with its doc and range;
- :mod:`.errors`: the one error hierarchy, caught by type on both sides;
- :mod:`.checks`: one rule each for a text, an id and a metadata value;
- :mod:`.wire`: task and queue names, payloads and the result codec, Redis keys and heartbeats;
- :mod:`.stream`: the query stream's entries and replies;
- :mod:`.milvus`: a collection's layout and the Milvus calls both sides make (pymilvus, imported by whoever
  uses it, never by ``import producer``).

The worker imports nothing of ``producer/`` outside this package (tests/test_layout.py holds it).
"""
