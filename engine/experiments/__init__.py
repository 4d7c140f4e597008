"""Runners of experiment grids: ablation tables (``tools/ablate.py``) and offline W&B sweeps (``tools/sweep.py``).

A grid is expanded into runs (:mod:`.grid`), each run is a command line of a training script (:mod:`.commands`)
run as a subprocess with its share of the CPUs (:mod:`.jobs`); what a run measured is read back from its
``summary.json`` (:mod:`.collect`), summarised over seeds (:mod:`.stats`) and rendered as Markdown, CSV and a
plot (:mod:`.tables`). Table and sweep files are read by :mod:`.specs`; :mod:`.configs` resolves what a run
trains, so that a finished run of the same configuration is reused instead of trained again.

A runner only runs scripts and reads files: no module here imports a model family.
"""
