"""The core layer: what datasets, models, methods and the harness all share, importing nothing of
the suite itself.

- `mmbalance.core.types`: a modality's spec (`Modality`), a batch (`Batch`), a method's prediction
  (`Prediction`);
- `mmbalance.core.params`: `Strict` / `NoParams`, the base of every class's typed Params;
- `mmbalance.core.errors`: the suite's exceptions, warnings and exit codes;
- `mmbalance.core.hub`: where Hugging Face files are looked for (tokenizers, text encoders);
- `mmbalance.core.registry`: the name -> class registries (`METHODS`, `DATASETS`, `ENCODERS`).
"""
