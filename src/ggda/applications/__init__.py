"""Applications built on the library: whole studies that train, attribute, evaluate and report.

* :mod:`~ggda.applications.experiment` — methods × groupings × K on one data set (``ggda experiment``);
* :mod:`~ggda.applications.text` — the MiniLM review classifier and its benchmark (``ggda text-train``,
  ``ggda text-bench``).

The CLI parses arguments and calls these; the library below them knows nothing of them.
"""
