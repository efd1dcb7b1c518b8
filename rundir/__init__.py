"""The run directory: the one contract between training and serving (SPEC section 6, docs/ARCHITECTURE.md).

Everything that reads or writes a run goes through this package: training writes it (``writer``), the
service, the batch jobs, the benchmark and the load tests read it (``reader``), the batch refresh
rewrites its preferences (``preferences``, ``manifest``). It sits above ``llm`` and ``retrieval`` (whose
objects a run holds) and below ``training``, ``service`` and the CLI.

- ``manifest``: ``manifest.json`` (checksums, version), ``verify``, atomic writes, the staging folder;
- ``spec``: ``llm.json`` as a dataclass, written from and read into the same ``LLMSpec``;
- ``preferences``: ``preferences.jsonl`` + ``preference_vectors.npy``;
- ``items``: a catalog item as the prompts show it (the one conversion training and serving share);
- ``reader``: the typed, cross-checked view of a whole run (``load_artifacts``) and its small parts;
- ``writer``: the whole run, from the parts training made (``write_run``).
"""
