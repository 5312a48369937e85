"""The streaming engine under ``diff``, ``merge`` and ``prior``: what to select, and one executor to run it.

- :mod:`deltakit.engine.selection`: :class:`Selection` (module kinds, layer ranges, skip-first, name
  globs; one grammar for every command and the merge YAML). Imports no torch.
- :mod:`deltakit.engine.executor`: :class:`Job` (inputs, rows, per-block computation) and
  :func:`execute` (reader threads with ``pread``, compute, ``pwrite`` into the output).

Each command builds its plan (a list of jobs) from a pairing of checkpoints and runs it with
:func:`execute`; the plan is data that can be inspected before anything is read.
"""
