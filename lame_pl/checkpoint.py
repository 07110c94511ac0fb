"""What a ``lightning fit`` checkpoint of ``LaMEModule`` holds, read without importing Lightning.

The embedder, the exporter, the evaluators and ``LaMEModule.load_from_checkpoint`` read a
checkpoint through here: its hyper-parameters (spec objects for a module built in Python,
plain dicts for one built by LightningCLI), the stage it was saved in, its weights and what the
training data module was configured with.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import pickle
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lame_pl.backbone import BackboneSpec, DecoderSpec
from lame_pl.decoder import OUTPUT_IDS
from lame_pl.stages import LoraSpec  # also registers the stage specs as safe globals for torch.load

# The checkpoint entry holding the stage the module was in (written by LaMEModule.on_save_checkpoint).
STAGE_KEY = "lame_stage"
# Where a restricted decoder's output ids sit in the module's state dict.
DECODER_OUTPUT_IDS = f"decoder.{OUTPUT_IDS}"
# What texts are cut to when a checkpoint does not say what its training run cut them to.
FALLBACK_MAX_TEXT_LENGTH = 512
# The checkpoint entry holding a local backbone folder's configs and processor files (written by
# LaMEModule.on_save_checkpoint; lame_pl.backbone.backbone_files).
BACKBONE_FILES = "lame_backbone_files"
# The same for a latent decoder built from a local folder (``decoder.path``).
DECODER_FILES = "lame_decoder_files"


def materialise_backbone_files(files: dict[str, bytes], kind: str = "backbones") -> Path:
    """A folder holding ``files`` (a backbone's or decoder's configs and processor files), written
    once under ``$LAME_PL_CACHE/<kind>`` (default ``~/.cache/lame_pl``) and keyed by their content."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    root = Path(os.environ.get("LAME_PL_CACHE") or Path.home() / ".cache" / "lame_pl")
    folder = root / kind / digest.hexdigest()[:20]
    if not (folder / ".complete").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if Path(name).name != name:  # a file name, never a path out of the folder
                raise ValueError(f"stored backbone file name {name!r} is not a plain file name")
            (tmp / name).write_bytes(data)
        (tmp / ".complete").write_text("")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    return folder


def _field(value: Any, key: str, default: Any = None) -> Any:
    """``value.key`` for a spec object, ``value[key]`` for a config dict."""
    if isinstance(value, dict):
        return value.get(key, default)
    return getattr(value, key, default)


def _with(value: Any, **changes: Any) -> Any:
    """A copy of ``value`` (a spec object or a config dict) with ``changes``.

    A spec is copied without re-running its checks: those would look for the files the
    changes stop it from naming (a missing ``path`` beside a ``vocab_file`` being dropped).
    """
    if isinstance(value, dict):
        return dict(value, **changes)
    value = copy.copy(value)
    for key, item in changes.items():
        setattr(value, key, item)
    return value


def as_spec(value: Any, cls: type) -> Any:
    """A spec of type ``cls`` from a spec object or a LightningCLI config dict (its own fields only)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})
    raise ValueError(f"checkpoint hyper-parameter of type {type(value).__name__} is not a {cls.__name__}")


@dataclass
class TrainedCheckpoint:
    """A checkpoint's parts.

    Attributes:
        path: The file.
        hparams: The module's hyper-parameters, as stored.
        state_dict: The module's weights (memory-mapped).
        stage: The stage the module was saved in.
        data_hparams: The data module's hyper-parameters (empty when none were saved).
        global_step: Optimiser steps taken when it was saved.
        backbone_files: A local backbone folder's configs and processor files (no weights).
        decoder_files: A local decoder folder's configs and tokenizer files (no weights).
    """

    path: Path
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    stage: int
    data_hparams: dict[str, Any]
    global_step: int
    backbone_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    decoder_files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def local_folder(self, name: str, value: Any) -> Any:
        """``value`` (the ``backbone`` or ``decoder`` hyper-parameter, a spec or a config dict)
        with a local ``path`` that is not here replaced by the stored files' folder.

        The folder is unpacked under ``$LAME_PL_CACHE`` with a warning naming both paths; the
        weights are the checkpoint's own. ``value`` is returned as it is when its path is here,
        when it has none, or when it is ``None``.

        Raises:
            FileNotFoundError: The path is not here and the checkpoint stores no copy of its files.
        """
        path = _field(value, "path")
        if path is None or Path(path).is_dir():
            return value
        files = {"backbone": self.backbone_files, "decoder": self.decoder_files}[name]
        if not files:
            raise FileNotFoundError(
                f"{name}.path {path!r} is not a directory here and checkpoint {self.path} "
                f"stores no copy of its configs: put that folder back (or pass {name}= a spec)"
            )
        folder = materialise_backbone_files(files, kind=f"{name}s")
        warnings.warn(
            f"{name}.path {path!r} is not here: the {name}'s configs "
            f"{'and processor ' if name == 'backbone' else ''}come from checkpoint {self.path} "
            f"(unpacked to {folder})",
            stacklevel=3,
        )
        return _with(value, path=str(folder))

    @property
    def backbone_spec(self) -> BackboneSpec:
        """Where the backbone came from.

        A local ``path`` that is not here is replaced, with a warning, by a folder of the configs
        and processor files the checkpoint carries (its weights are the checkpoint's own); a
        checkpoint without them raises naming the path.
        """
        return as_spec(self.local_folder("backbone", self.hparams["backbone"]), BackboneSpec)

    @property
    def decoder_spec(self) -> DecoderSpec | None:
        """The latent decoder's spec, as restoring builds it (``None`` without a decoder).

        Its ``vocab_file`` is dropped when the output ids are in the weights, and a local
        ``path`` that is not here is replaced as in ``backbone_spec``; build it with
        ``build_decoder(spec, pretrained=False)``, since a replaced folder holds no weights.
        """
        value = self.restore_overrides().get("decoder", self.hparams.get("decoder"))
        return as_spec(self.local_folder("decoder", value), DecoderSpec)

    @property
    def stores_output_ids(self) -> bool:
        """Whether the decoder's output ids are in the weights (checkpoints since they were kept there)."""
        return DECODER_OUTPUT_IDS in self.state_dict

    @property
    def encoder_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``lame_pl.model.build_encoder`` the run used."""
        hp = self.hparams
        return dict(
            num_reason_tokens=hp.get("num_reason_tokens", 8),
            bottleneck_mask=hp.get("bottleneck_mask", False),
            embed_dim=hp.get("embed_dim"),
            encode_mode=hp.get("encode_mode"),
            cot_tokens=hp.get("cot_tokens"),
        )

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, named as in ``LaMEEncoder`` (without the ``encoder.`` prefix)."""
        return {k.removeprefix("encoder."): v for k, v in self.state_dict.items() if k.startswith("encoder.")}

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The latent decoder's weights, named as in ``LatentDecoder`` (empty without a decoder)."""
        return {k.removeprefix("decoder."): v for k, v in self.state_dict.items() if k.startswith("decoder.")}

    @property
    def lora(self) -> LoraSpec | None:
        """The adapters the backbone carries: the saved stage's ``lora``, else another stage's."""
        if not any("lora_" in key for key in self.state_dict):
            return None
        order = (self.stage, *(n for n in (1, 2) if n != self.stage))
        for n in order:
            lora = _field(self.hparams.get(f"stage{n}"), "lora")
            if lora is not None:
                return as_spec(lora, LoraSpec)
        raise ValueError(f"checkpoint {self.path} holds LoRA weights but no stage of its hyper-parameters sets lora")

    @property
    def max_text_length(self) -> int | None:
        """The training run's ``data.max_text_length``, when the checkpoint names one."""
        value = self.data_hparams.get("max_text_length")
        return value if isinstance(value, int) and value >= 1 else None

    @property
    def instructions(self) -> dict[str, str]:
        """The training run's query and target instructions, where the data module had them."""
        return {
            side: self.data_hparams[f"{side}_instruction"]
            for side in ("query", "target")
            if isinstance(self.data_hparams.get(f"{side}_instruction"), str)
        }

    def restore_overrides(self, folders: Iterable[str] = ()) -> dict[str, Any]:
        """Hyper-parameters that make restoring this checkpoint read no file beside it.

        ``init_from`` (the weights the run started from, already in this checkpoint) is dropped,
        and so is ``decoder.vocab_file`` when the output ids are stored in the weights.

        Args:
            folders: Of ``backbone`` and ``decoder``, those whose local ``path``, when it is not
                here, is replaced by the folder of the files the checkpoint stores
                (``local_folder``, which warns or raises).

        Raises:
            FileNotFoundError: An older checkpoint without stored ids whose vocabulary file is
                not there (named with the directory it was looked for from), or a folder of
                ``folders`` that is not here and has no stored copy.
        """
        overrides: dict[str, Any] = {"init_from": None}
        decoder = self.hparams.get("decoder")
        vocab_file = _field(decoder, "vocab_file")
        if vocab_file is not None and self.stores_output_ids:
            overrides["decoder"] = _with(decoder, vocab_file=None)
        elif vocab_file is not None and not Path(vocab_file).is_file():
            raise FileNotFoundError(
                f"checkpoint {self.path} predates stored decoder output ids and its decoder.vocab_file "
                f"{vocab_file!r} is not a file from {os.getcwd()}; run from the directory it was trained in"
            )
        for name in folders:
            value = overrides.get(name, self.hparams.get(name))
            local = self.local_folder(name, value)
            if local is not value:
                overrides[name] = local
        return overrides


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message is one line naming the path."""


# A zip archive's first bytes: every torch.save file since PyTorch 1.6, Lightning's included.
_ZIP_MAGIC = b"PK\x03\x04"


def _first_line(error: BaseException) -> str:
    """The first sentence of ``error``'s message (torch's run to a paragraph of advice)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def _unreadable(path: Path, error: BaseException) -> str:
    """What is wrong with ``path``, which ``torch.load`` failed to read with ``error``."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(len(_ZIP_MAGIC))
    if size == 0:
        return "is empty (0 bytes)"
    if head != _ZIP_MAGIC:
        return f"is not a torch checkpoint file (no zip archive header; {size} bytes)"
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return f"holds objects that a weights-only load refuses (torch.load weights_only=True: {_first_line(error)})"
    return f"is truncated or damaged ({size} bytes; {_first_line(error)})"


def load_checkpoint_file(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A Lightning checkpoint's dict, read with ``torch.load(weights_only=True)``, memory-mapped.

    Memory-mapped, so that checking a large file reads its index and not its weights.

    Args:
        path: The file.
        what: How messages name the file (``checkpoint``, ``model.init_from``, ``--checkpoint``).

    Raises:
        FileNotFoundError: When ``path`` is not a file.
        CheckpointError: When it is empty, truncated, not a torch file, refused by the
            weights-only loader, or a torch file that is not a dict with a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError...
        raise CheckpointError(f"{what} {path} {_unreadable(path, error)}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{what} {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with a state_dict)"
        )
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{what} {path} is a dict without a state_dict: not a Lightning checkpoint")
    return checkpoint


def read_checkpoint(path: str | Path) -> TrainedCheckpoint:
    """Reads a ``LaMEModule`` checkpoint with ``torch.load(weights_only=True)``, memory-mapped.

    Raises:
        FileNotFoundError: When ``path`` is not a file.
        CheckpointError: When the file is not a readable LaMEModule checkpoint (a ``ValueError``).
    """
    path = Path(path)
    checkpoint = load_checkpoint_file(path)
    if "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} has no state_dict and hyper_parameters: not a lightning fit checkpoint"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    if "backbone" not in hparams:
        raise CheckpointError(f"checkpoint {path} has no backbone hyper-parameter: not a LaMEModule checkpoint")
    return TrainedCheckpoint(
        path=path,
        hparams=hparams,
        state_dict=checkpoint["state_dict"],
        stage=int(checkpoint.get(STAGE_KEY, hparams.get("stage", 1))),
        data_hparams=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        global_step=int(checkpoint.get("global_step", 0)),
        backbone_files=dict(checkpoint.get(BACKBONE_FILES) or {}),
        decoder_files=dict(checkpoint.get(DECODER_FILES) or {}),
    )
