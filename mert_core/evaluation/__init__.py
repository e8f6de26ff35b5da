"""Downstream evaluation with the MARBLE protocol.

- :mod:`.upstreams`: feature extractors (mert checkpoints, random students,
  Hugging Face HuBERT/MERT folders, the handcrafted baseline).
- :mod:`.extract`: features of every layer, cached memory-mapped on disk.
- :mod:`.probe`: the constrained MLP probe searched over lr and layer.
- scoring: :mod:`mert_core.metrics`, :mod:`mert_core.beats` and :mod:`mert_core.scoring`, leaves
  the task contract uses (tested against mir_eval / scikit-learn).
- :mod:`.report`: table, JSON, CSV, plots.
- :mod:`.api`: what ``mert extract / probe / eval`` call.

Tasks are plugins: see :mod:`mert_core.tasks`.
"""
