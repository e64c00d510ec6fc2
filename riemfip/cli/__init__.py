"""The ``riemfip`` command line.

One module per subcommand, each wrapping one library call (``demo`` runs the main
job by composing ``train``, ``connect`` and ``continual``); the CLI adds options,
progress, checkpoints and files, and computes nothing of its own (``bench``'s timing
excepted):

========== =================================================================
demo       two MLPs on the offline MNIST subset, the geodesic between them
           against the line and a Bézier curve, and two-task FIP continual
           learning against fine-tuning and replay
train      a network, saved as a checkpoint (``model.pt``)
connect    the geodesic between two network checkpoints (:func:`riemfip.connect`)
continual  :func:`~riemfip.applications.continual.run_continual`, per method
sparsify   :func:`~riemfip.applications.sparsify.sparsify_sweep`
ensemble   :func:`~riemfip.applications.robust_ensemble.compare_ensembles`
bench      cost ratios of the metric-vector product and of a FIP step
========== =================================================================

A subcommand module holds ``NAME``, ``SUMMARY``, ``EXAMPLE`` and three functions, which
:func:`main` calls in order:

``add_arguments(parser)``
    Its options (the run options ``--out``, ``--seed``, ``--device``, ... are added for it).
``prepare(args, device, progress) -> job``
    Reads and checks every input (data, checkpoints, option ranges); writes nothing, so
    that bad input fails before ``--out`` is touched.
``execute(job, folder) -> Outcome``
    The library call(s), checkpointed in ``folder``; the outcome is published by
    :meth:`RunFolder.finish <riemfip.cli.run_folder.RunFolder.finish>`.

Shared pieces: :mod:`.command` (parser, exit codes, errors), :mod:`.config`
(``--config FILE.toml``), :mod:`.run_folder` (``--out``, ``--force``, ``--resume``,
checkpoints, the record), :mod:`.report` (the HTML page), :mod:`.progress`,
:mod:`.datasets` (``--data``) and :mod:`.networks` (the MLPs and their files).
"""

from .command import main

__all__ = ["main"]
