"""One base for every error that is about the user's inputs, files, settings or machine.

Anything raised as a :class:`VimpacError` is reported by the command line as one line (``error:
...``, exit code 2), never with a traceback: its message names the file, key or value at fault. Any
other exception is a bug in vimpac (traceback, exit code 3). The subclasses say where a problem was
found; they live beside the code that raises them:

* ``ConfigError`` (:mod:`vimpac.common.config`): a pipelines.yaml or ``--set`` value;
* ``ArchiveError`` and its ``ShardError`` / ``ChecksumError`` (:mod:`vimpac.archive`);
* ``VideoError`` (:mod:`vimpac.common.video`) and ``FFmpegNotFound``;
* ``DatasetError`` (:mod:`vimpac.data.datasets`): a dataset root or annotation file;
* ``CheckpointError`` (:mod:`vimpac.common.checkpoint`): a checkpoint or weights file;
* ``PretrainError`` (:mod:`vimpac.pretrain.train`): settings pre-training cannot run with;
* ``PipelineError`` (:mod:`vimpac.pipeline`): a pipeline that cannot be planned or run;
* ``StorageError`` (:mod:`vimpac.common.storage`): an object-store read or write that failed;
* ``TokenizerError`` (:mod:`vimpac.tokenize.base`): a tokenizer folder or weights file.
"""

from __future__ import annotations


class VimpacError(Exception):
    """A problem with the user's inputs, files, settings or machine: one line naming it."""
