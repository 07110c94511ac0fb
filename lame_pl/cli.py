"""The command line: LightningCLI with subclass mode for model and data.

Installed as ``lightning`` and ``lame`` (Lightning 2.6 ships no ``lightning`` command; this is
the project's own), and runnable as ``python -m lame_pl``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lame_pl.callbacks.checkpointing import newest_loadable_checkpoint
from lame_pl.callbacks.console import ParameterSummary, SamplesPerSecond, StepProgressBar
from lame_pl.checkpoint import CheckpointError, load_checkpoint_file, read_checkpoint
from lame_pl.clip_anchor import CLIPAnchor

# The project's models and data modules, imported so that jsonargparse knows them: `--model
# LaMEModule` resolves by class name, and `fit --help` lists them among the known subclasses.
from lame_pl.datamodules import CorpusDataModule, ImageTextDataModule, InstructionPairDataModule, ShardDataModule
from lame_pl.datamodules.clip import CLIPImageTextDataModule
from lame_pl.module import LaMEModule
from lame_pl.package_alias import SHORT_NAMES
from lame_pl.run_dir import checkpoint_folders, existing_checkpoints, remove_checkpoints, resumed_step, set_purge_step

MODELS = (LaMEModule, CLIPAnchor)
DATAMODULES = (ImageTextDataModule, InstructionPairDataModule, CLIPImageTextDataModule, CorpusDataModule)

# Model settings that say how to encode, not what was trained: given for a run with --ckpt_path,
# they win over the checkpoint's hyper-parameters.
ENCODE_TIME_SETTINGS = ("encode_mode", "cot_tokens")
# The environment variable that lets --ckpt_path be a URL (read weights-only even then).
ALLOW_REMOTE = "LAME_PL_ALLOW_REMOTE_CHECKPOINTS"
# What ModelCheckpoint names its last checkpoint: last.ckpt, last-v1.ckpt...
LAST_CHECKPOINT = re.compile(r"^last(-v\d+)?\.ckpt$")


class LaMECLI(LightningCLI):
    """LightningCLI that hands the model's backbone spec to the datamodule (one processor, one truth)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.add_argument(
            "--start_over",
            type=bool,
            default=False,
            help="fit only: delete the checkpoints an earlier run left in this run's checkpoint folder and hide "
            "its TensorBoard steps, then train from scratch (without it, such a fit is refused)",
        )

    def _model_init_args(self) -> Any:
        """The model's ``init_args`` in the config of the subcommand being run (None if absent)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        return config.model.get("init_args") if config and config.get("model") else None

    def _subcommand_config(self) -> Any:
        """The config of the subcommand being run (the whole config without one)."""
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand) if subcommand else self.config

    def _resolve_ckpt_file(self) -> None:
        """Checks a ``--ckpt_path`` file before anything reads it, and resolves a ``last.ckpt``.

        A path to ``last.ckpt`` (``last-vN.ckpt``) stands for the newest checkpoint of its
        directory that loads (a kill may have cut the newest short: each skipped file is warned
        about); any other file must load, else the run ends with one line naming it.
        """
        config = self._subcommand_config()
        ckpt = config.get("ckpt_path") if config else None
        if isinstance(ckpt, str) and "://" in ckpt:
            if os.environ.get(ALLOW_REMOTE) != "1":
                raise SystemExit(
                    f"error: --ckpt_path {ckpt} is a URL: remote checkpoints are refused (Lightning would fetch it over "
                    f"the network and unpickle it); download it and give the file, or set {ALLOW_REMOTE}=1"
                )
            rank_zero_info(f"--ckpt_path {ckpt}: a remote checkpoint, allowed by {ALLOW_REMOTE}=1, read weights-only")
            config.weights_only = True
            return
        if not ckpt or not isinstance(ckpt, str):
            return  # none, or "last"/"best" (the Trainer resolves them)
        path = Path(ckpt)
        try:
            if LAST_CHECKPOINT.match(path.name) and (path.exists() or path.is_symlink()):
                newest = newest_loadable_checkpoint(path.parent)
                if newest is None:
                    if path.is_file():
                        load_checkpoint_file(path, "--ckpt_path")  # says what is wrong with the file asked for
                    raise CheckpointError(f"--ckpt_path {path}: no checkpoint in {path.parent} loads")
                if newest.resolve() != path.resolve():
                    rank_zero_info(
                        f"--ckpt_path {path}: using {newest}, the newest checkpoint in its folder that loads"
                    )
                    config.ckpt_path = str(newest)
            elif path.is_file():  # a folder is a sharded checkpoint: its strategy reads it
                load_checkpoint_file(path, "--ckpt_path")
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None

    def _parse_ckpt_path(self) -> None:
        self._resolve_ckpt_file()
        # LightningCLI lets the checkpoint's hyper-parameters override every model setting given
        # for the run. That is right for what the weights were trained with, not for how to
        # encode: a lame checkpoint may be tested in another encode mode.
        init_args = self._model_init_args()
        asked = {key: init_args.get(key) for key in ENCODE_TIME_SETTINGS} if init_args else {}
        super()._parse_ckpt_path()
        init_args = self._model_init_args()
        for key, value in asked.items():
            if value is not None and init_args is not None:
                init_args[key] = value

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        # SaveConfigCallback writes into the logger's folder, which a validate/test/predict run
        # given the training config shares with the training run: its config.yaml stays the fit's.
        if subcommand and subcommand != "fit":
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{subcommand}.yaml"}
            if self._subcommand_config().get("start_over"):
                raise SystemExit(f"error: --start_over is for fit, not {subcommand}")
        # A full checkpoint restores every weight, so the weights that started the run
        # (init_from, e.g. stage 1's checkpoint) are neither needed nor required to still exist.
        config = self.config.get(subcommand) if subcommand else self.config
        init_args = self._model_init_args()
        ckpt = config.get("ckpt_path") if config else None
        if ckpt and init_args and init_args.get("init_from"):
            init_args.init_from = None
        # A damaged or foreign init_from file ends the run with one line, not torch's traceback.
        init_from = init_args.get("init_from") if init_args else None
        if init_from and Path(init_from).is_file():
            try:
                load_checkpoint_file(init_from, "model.init_from")
            except CheckpointError as error:
                raise SystemExit(f"error: {error}") from None
        # The decoder's output ids travel in the checkpoint's weights (lame_pl.checkpoint): a
        # vocabulary file that is gone where this runs (another directory, another machine) is
        # not needed. "last"/"best" are resolved later by the Trainer and are left alone.
        # The prediction writer records which checkpoint embedded its rows (a resume checks it).
        if ckpt and Path(ckpt).is_file():
            for callback in (config.get("trainer") or {}).get("callbacks") or []:
                args = callback.get("init_args") if hasattr(callback, "get") else None
                if (
                    str(callback.get("class_path", "")).endswith("EmbeddingWriter")
                    and args is not None
                    and not args.get("checkpoint")
                ):
                    args.checkpoint = str(ckpt)
        if ckpt and Path(ckpt).is_file():
            self._corpus_settings_from(read_checkpoint(ckpt), config)
        decoder = init_args.get("decoder") if init_args else None
        vocab = decoder.get("vocab_file") if decoder else None
        if ckpt and vocab and not Path(vocab).is_file() and Path(ckpt).is_file():
            if read_checkpoint(ckpt).stores_output_ids:
                rank_zero_info(f"decoder.vocab_file {vocab!r} is not here: the decoder's output ids come from {ckpt}")
                decoder.vocab_file = None

    def before_fit(self) -> None:
        """Refuses a fresh fit into a checkpoint folder an earlier run left checkpoints in (unless
        ``--start_over``), and hides from TensorBoard the steps a resumed or restarted run logs again.

        Runs before ``trainer.fit`` creates the TensorBoard writer, which takes the purge step.
        """
        config = self._subcommand_config()
        start_over = bool(config.get("start_over"))
        # Kept out of the config.yaml this run saves: fitting from that file must not delete again.
        config.start_over = False
        ckpt = config.get("ckpt_path")
        if ckpt:
            if start_over:
                raise SystemExit(f"error: --start_over true and --ckpt_path {ckpt} contradict: give one")
            try:
                step = resumed_step(self.trainer, str(ckpt))
            except CheckpointError as error:
                raise SystemExit(f"error: {error}") from None
            if step is not None:
                set_purge_step(self.trainer, step)
            return
        if self.trainer.fast_dev_run:  # saves no checkpoint and logs nothing: nothing to refuse or hide
            return
        for folder in checkpoint_folders(self.trainer):
            found = existing_checkpoints(folder)
            if not found:
                continue
            if not start_over:
                names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
                raise SystemExit(
                    f"error: checkpoint folder {folder} already holds an earlier run's checkpoints ({names}): "
                    "resume it with --ckpt_path last, or delete them and start over with --start_over true"
                )
            if self.trainer.is_global_zero:
                remove_checkpoints(found)
        if start_over:
            set_purge_step(self.trainer, 0)  # the earlier run's events, all of them, no longer shown

    @staticmethod
    def _corpus_settings_from(checkpoint: Any, config: Any) -> None:
        """A user's corpus (datamodules.CorpusDataModule) laid out as the checkpoint's run laid out
        its training inputs, where the command line leaves the instruction or text budget unset."""
        data = config.get("data") if config else None
        if data is None or not str(data.get("class_path", "")).endswith("CorpusDataModule"):
            return
        args = data.get("init_args")
        side = "query" if args.get("images") else "target"  # images embed as queries, lines as targets
        if args.get("instruction") is None:
            args.instruction = checkpoint.instructions.get(side, "")
            rank_zero_info(f"data.instruction: {args.instruction!r} (the training run's {side} instruction)")
        if args.get("max_text_length") is None and checkpoint.max_text_length:
            args.max_text_length = checkpoint.max_text_length
            rank_zero_info(f"data.max_text_length: {args.max_text_length} (the training run's)")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Here, where LightningCLI holds the config's callbacks instantiated, so that a config's own
        # progress bar or summary is seen (trainer_defaults would add ours beside it: two bars fail).
        given = config.get("callbacks")
        given = [] if given is None else list(given) if isinstance(given, list) else [given]
        return super()._instantiate_trainer(config, [*callbacks, *console_callbacks(config, [*given, *callbacks])])

    def instantiate_classes(self) -> None:
        # jsonargparse reports a failed constructor inside a long dump of the whole config;
        # pull out the constructors' own messages so that a bad value reads as one line.
        try:
            super().instantiate_classes()
        except ValueError as error:
            reasons = config_errors(str(error))
            if not reasons:
                raise
            raise SystemExit("error: " + "; ".join(reasons)) from error
        silence_noise(shard_data=isinstance(self.datamodule, ShardDataModule))


# jsonargparse's own framing around the constructors' messages; Unions nest (an optional
# stage spec inside the model), so the framing repeats at every level.
_FRAMING = (
    "Does not validate against any of the Union subtypes",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def config_errors(text: str) -> list[str]:
    """The constructor messages in a jsonargparse "Does not validate against any of the Union
    subtypes" error, without the alternatives that were never meant (``Expected a NoneType``)."""
    if "Errors:" not in text:
        return []
    reasons = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("- "):
            continue
        line = line.removeprefix("- ").strip()
        if line and not line.startswith(_FRAMING):
            reasons.append(line)
    return reasons


def console_callbacks(trainer_config: Mapping[str, Any], given: list[Callback]) -> list[Callback]:
    """What a run prints, where its config leaves it to Lightning (callbacks.console): the step
    progress bar, samples/s (also logged) and the model summary without unmeasured FLOPs.

    A config that names its own progress bar or summary keeps it, and one that switches either off
    (``enable_progress_bar``/``enable_model_summary: false``) gets none.
    """
    added: list[Callback] = []
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        added.append(StepProgressBar())
    if not any(isinstance(c, SamplesPerSecond) for c in given):
        added.append(SamplesPerSecond())
    if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
        added.append(ParameterSummary())
    return added


# Lines Lightning logs at every run that say nothing about it: the tip to install its cloud logger,
# and the note that the model summary is the one console_callbacks added.
_NOISE_LINES = re.compile(
    r"^\W*Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"
    r"|^Trainer already configured with model summary callbacks: \[<class 'lame_pl\.callbacks\.console\.ParameterSummary'>\]\."
)


def _not_noise(record: logging.LogRecord) -> bool:
    return not _NOISE_LINES.match(record.getMessage())


def silence_noise(shard_data: bool = False) -> None:
    """Silences, by their exact text and origin, the messages that every run printed and that never
    apply to this project; any other warning or message still shows.

    Args:
        shard_data: the run's data module is a ``ShardDataModule``: Lightning's warnings about
            iterable datasets, which its loaders answer, go too (another data module keeps them).
    """
    # torch deprecated LeafSpec; Lightning 2.6's own pytree helper still builds one at every fit.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Through rank_zero_info's logger, which carries the project's own lines too: only these two go.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_noise)
    if not shard_data:
        return
    # That an IterableDataset's __len__ may be wrong with several workers unless each is configured
    # on its own: a shard module's are (shards split by rank and worker, each worker's epoch cut at
    # its own batch count).
    warnings.filterwarnings(
        "ignore",
        message=r"Your `IterableDataset` has `__len__` defined",
        category=UserWarning,
        module=r"lightning\.pytorch\.utilities\.data",
    )
    # That a mid-epoch resume replays the epoch, the loader having no state_dict: the data module
    # holds the state and carries on in the epoch (ShardDataModule.load_state_dict).
    warnings.filterwarnings(
        "ignore",
        message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader "
        r"is not resumable",
        category=PossibleUserWarning,
        module=r"lightning\.pytorch\.loops\.training_epoch_loop",
    )


def class_path(cls: type) -> str:
    """The shortest path a config can name ``cls`` by: its package's when the package exports it,
    under the short alias of ``lame_pl.datamodules`` and ``lame_pl.callbacks``."""
    parts = cls.__module__.split(".")
    path = f"{cls.__module__}.{cls.__name__}"
    for depth in range(1, len(parts)):
        if getattr(importlib.import_module(".".join(parts[:depth])), cls.__name__, None) is cls:
            path = f"{'.'.join(parts[:depth])}.{cls.__name__}"
            break
    for full, short in SHORT_NAMES.items():
        if path.startswith(full + "."):
            return short + path[len(full) :]
    return path


def _listing(classes: tuple[type, ...]) -> str:
    """Each class's path, and below it its docstring's first line."""
    return "\n".join(
        f"  {class_path(cls)}\n      {(cls.__doc__ or '').strip().splitlines()[0].replace('``', '')}" for cls in classes
    )


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the description's lines kept as written (argparse refills them)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


DESCRIPTION = f"""\
lame_pl: LaME latent-reasoning multimodal embeddings (and the baselines they are compared with),
trained, validated, tested and embedded with PyTorch Lightning's command line.

Models (--model, by path or class name):
{_listing(MODELS)}
Data (--data):
{_listing(DATAMODULES)}

A class's settings: `lightning fit --model.help LaMEModule`, `--data.help ImageTextDataModule`.
The demo: `lightning fit --config configs/demo/base.yaml --config configs/demo/stage1.yaml`."""


def build_cli(args: ArgsType = None) -> LaMECLI:
    """Parses ``args`` (default: the command line), then runs the subcommand it names."""
    silence_noise()
    return LaMECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "formatter_class": _HelpFormatter},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """Runs ``fit``, ``validate``, ``test`` or ``predict`` from YAML configs and flags."""
    build_cli(args)
