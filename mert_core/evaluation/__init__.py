"""Downstream evaluation with the MARBLE protocol.

- :mod:`.upstreams`: feature extractors (mert checkpoints, random students,
  Hugging Face HuBERT/MERT folders, the handcrafted baseline).
- :mod:`.extract`: features of every layer, cached memory-mapped on disk.
- :mod:`.probe`: the constrained MLP probe searched over lr and layer.
- :mod:`.metrics`, :mod:`.beats`: scoring (tested against mir_eval / scikit-learn).
- :mod:`.report`: table, JSON, CSV, plots.
- :mod:`.api`: what ``mert extract / probe / eval`` call.

Tasks are plugins: see :mod:`mert_core.tasks`.
"""
