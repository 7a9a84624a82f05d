"""The run directory: the one place that writes one, recognises one and opens one.

A single run (``mmfuse train DATA --out RUN``) holds::

    config.yaml          the resolved config
    labels.json          the class names, in the order of the model's outputs
    towers.json          each tower's spec: what rebuilds it, offline
    model.safetensors    the weights ``classifier.stored_state`` picks
    <modality>_tower/    a stored tower's config and tokenizer or processor
    history.csv, training_curves.png, val_confusion_matrix.png, metrics.jsonl, skipped.csv, captions.csv
    metrics.json         the validation report; the mark of a finished run

A bagged run (``--bag K``) holds config.yaml, labels.json, metrics.json, oof_predictions.csv and
val_confusion_matrix.png, its members ``members/<k>/`` (and ``full/``), each a single run, the frozen Hugging Face
towers they share (``frozen_towers.safetensors``), and ``bag.json``: the members, and which models predict averages.

An ensemble (``--preset ensemble``) holds config.yaml, labels.json, metrics.json, oof_predictions.csv,
leaderboard.csv (every member's out-of-fold scores, weight and time) and ``ensemble.json``: the members that predict,
each a bagged run in ``members/<name>/``, and their weights; predict sums the members' probabilities so weighted.

All are written through ``staged``: into ``RUN/.staging`` first, then moved into place with the files that mark a
finished run removed first and put back last, so a kill while writing never leaves a directory that looks finished,
nor a finished one that mixes two runs' files.

``layout`` recognises one and imports no torch (the CLI checks ``--out`` before any work); ``weights`` writes and
opens one, with torch.
"""
