"""``LaMEEmbedder``: a trained LaME model that embeds texts and images, without Lightning.

It loads a ``lightning fit`` checkpoint (LoRA/DoRA adapters merged into the backbone) or a
folder written by ``lame_pl.export``, and builds its inputs with ``lame_pl.prompt``, the code
the training collators call, so a row is laid out exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lame_pl.backbone import BackboneSpec, build_backbone, build_processor
from lame_pl.checkpoint import FALLBACK_MAX_TEXT_LENGTH, TrainedCheckpoint, read_checkpoint
from lame_pl.model import LaMEEncoder, build_encoder, merge_lora
from lame_pl.prompt import PromptProcessor, Side

ImageInput = Image.Image | str | Path | None


def encoder_from_checkpoint(checkpoint: TrainedCheckpoint, merge: bool | None = None) -> LaMEEncoder:
    """The checkpoint's encoder (no decoder), in eval mode on the CPU.

    Args:
        checkpoint: The read checkpoint.
        merge: Merge LoRA/DoRA adapters into the base weights. ``None``: where the base weights
            are float32 (exact to ~1e-7); adapters on low-precision weights (the 2B recipe's
            bfloat16) stay as trained, since merging there rounds part of the adapter's update
            away. ``True`` (export): merge, in float32,
            so the whole encoder becomes float32.
    """
    backbone = build_backbone(checkpoint.backbone_spec, pretrained=False)  # the weights come next
    encoder = build_encoder(backbone, **checkpoint.encoder_settings)
    lora = checkpoint.lora
    if lora is not None:
        from lame_pl.stages import add_lora

        add_lora(encoder.backbone.language_model, lora)
    result = encoder.load_state_dict(checkpoint.encoder_state(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint.path}: the encoder's weights do not match its hyper-parameters "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if lora is not None:
        low_precision = any(p.dtype != torch.float32 for n, p in encoder.named_parameters() if "base_layer" in n)
        if merge or (merge is None and not low_precision):
            if low_precision:
                encoder.float()
            merge_lora(encoder.backbone.language_model)
    return encoder.eval()


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image from a PIL image or a path (a missing or unreadable file named in the error)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    from lame_pl.evaluation.encode import load_image as decode

    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} is not a file")
    return decode(path)  # EvalDataError, a ValueError, names a file that does not decode


class LaMEEmbedder:
    """Embeds texts, images or both with a trained LaME encoder.

    Build it with ``from_checkpoint`` or ``from_pretrained``.

    Args:
        encoder: The encoder (its adapters merged).
        processor: The backbone's processor.
        max_text_length: Most tokens of each instruction and each text, as in training.
        device: Where to run; ``None`` is CUDA when available, else the CPU.
        backbone_spec: Where the backbone came from (checkpoints only; ``None`` for a folder).
    """

    def __init__(
        self,
        encoder: LaMEEncoder,
        processor: Any,
        max_text_length: int,
        device: str | torch.device | None = None,
        backbone_spec: BackboneSpec | None = None,
    ) -> None:
        self.encoder = encoder.eval()
        self.prompts = PromptProcessor(processor, max_text_length)
        self.backbone_spec = backbone_spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder.to(self.device)
        # The training run's instructions ({"query": ..., "target": ...}, where known): what to
        # pass as ``instructions`` to embed as the model was trained.
        self.trained_instructions: dict[str, str] = {}
        # Where explain() finds the latent decoder, loaded on first use (embedding never needs it).
        self.decoder_source: tuple[str, Path] | None = None
        self.decoder: torch.nn.Module | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        encode_mode: str | None = None,
        cot_tokens: int | None = None,
        max_text_length: int | None = None,
        merge_adapters: bool | None = None,
    ) -> LaMEEmbedder:
        """Loads a ``lightning fit`` checkpoint of ``LaMEModule`` (no decoder is built).

        Args:
            path: The ``.ckpt`` file.
            device: Where to run; ``None`` is CUDA when available, else the CPU.
            encode_mode: Another encode mode than the one trained (``lame_pl.modes``).
            cot_tokens: T for ``encode_mode="explicit_cot"``.
            max_text_length: Token budget of each instruction and text; ``None`` is the training
                run's ``data.max_text_length`` (512 when the checkpoint names none).
            merge_adapters: See ``encoder_from_checkpoint``'s ``merge``.
        """
        checkpoint = read_checkpoint(path)
        spec = checkpoint.backbone_spec
        length = max_text_length or checkpoint.max_text_length or FALLBACK_MAX_TEXT_LENGTH
        encoder = encoder_from_checkpoint(checkpoint, merge_adapters)
        embedder = cls(encoder, build_processor(spec), length, device, spec)
        embedder.trained_instructions = checkpoint.instructions
        embedder.decoder_source = ("checkpoint", Path(path))
        if encode_mode is not None:
            embedder.set_encode_mode(encode_mode, cot_tokens)
        return embedder

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        encode_mode: str | None = None,
        cot_tokens: int | None = None,
        max_text_length: int | None = None,
    ) -> LaMEEmbedder:
        """Loads a folder written by ``tools/export.py`` (``lame_pl.export``); arguments as ``from_checkpoint``."""
        from lame_pl.export import read_folder

        encoder, processor, lame = read_folder(directory)
        length = max_text_length or lame.get("max_text_length") or FALLBACK_MAX_TEXT_LENGTH
        embedder = cls(encoder, processor, length, device)
        embedder.trained_instructions = dict(lame.get("instructions") or {})
        embedder.decoder_source = ("folder", Path(directory))
        if encode_mode is not None:
            embedder.set_encode_mode(encode_mode, cot_tokens)
        return embedder

    # ----------------------------------------------------------------------------- settings

    @property
    def processor(self) -> Any:
        """The backbone's processor."""
        return self.prompts.processor

    @property
    def max_text_length(self) -> int:
        """Most tokens of each instruction and each text."""
        return self.prompts.max_text_length

    @property
    def encode_mode(self) -> str:
        """The encode mode in force."""
        return self.encoder.encode_mode

    @property
    def num_reason_tokens(self) -> int:
        """K, the model's reason tokens."""
        return self.encoder.num_reason_tokens

    @property
    def embedding_dim(self) -> int:
        """D, the width of an embedding."""
        return self.encoder.embedding_dim

    def set_encode_mode(self, encode_mode: str, cot_tokens: int | None = None) -> None:
        """Encodes in ``encode_mode`` from now on (checked against K and the bottleneck mask)."""
        self.encoder.settings = self.encoder.settings.with_mode(encode_mode, cot_tokens)

    def to(self, device: str | torch.device) -> LaMEEmbedder:
        """Moves the model to ``device``."""
        self.device = torch.device(device)
        self.encoder.to(self.device)
        if self.decoder is not None:
            self.decoder.to(self.device)
        return self

    # ----------------------------------------------------------------------------- encoding

    def sides(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence[ImageInput] | None = None,
        instructions: str | Sequence[str] | None = None,
    ) -> list[Side]:
        """The rows to encode: text ``i`` and image ``i`` together (either may be missing)."""
        if texts is None and images is None:
            raise ValueError("encode: give texts, images or both")
        if isinstance(texts, str) or isinstance(images, (str, Path, Image.Image)):
            raise TypeError("encode: texts and images are lists (one entry a row), not a single value")
        n = len(texts) if texts is not None else len(images)
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"encode: {len(texts)} texts but {len(images)} images; a row pairs text i with image i")
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions or ""] * n
        elif len(instructions) != n:
            raise ValueError(f"encode: {len(instructions)} instructions for {n} rows; give one, or one a row")
        rows = []
        for i in range(n):
            image = None if images is None else images[i]
            rows.append(
                Side(
                    instructions[i],
                    "" if texts is None else texts[i] or "",
                    () if image is None else (load_image(image),),
                )
            )
        return rows

    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of one batch of processor inputs (``PromptProcessor``'s), float32 on the CPU."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.encoder(**inputs).embedding.float().cpu()

    def encode(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence[ImageInput] | None = None,
        instructions: str | Sequence[str] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embeds rows of text, image or both.

        Args:
            texts: One string a row (``""`` for none), or ``None``.
            images: One PIL image or image path a row (``None`` for none), or ``None``.
            instructions: One instruction for every row, or one a row; ``None`` for none. The
                model was trained with its run's instructions (see the exported model card).
            batch_size: Rows per forward pass.
            device: Move the model there first; ``None`` stays where it is.
            progress: Show a progress bar.

        Returns:
            ``(N, D)`` float32 L2-normalised embeddings on the CPU, in row order.
        """
        if batch_size < 1:
            raise ValueError(f"encode: batch_size must be >= 1, got {batch_size}")
        if device is not None:
            self.to(device)
        rows = self.sides(texts, images, instructions)
        starts = range(0, len(rows), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        out = [self.embed(self.prompts(rows[start : start + batch_size])) for start in starts]
        if not out:
            return torch.zeros(0, self.embedding_dim)
        return torch.cat(out)

    # ----------------------------------------------------------------------------- latent thoughts

    def load_decoder(self) -> torch.nn.Module:
        """The latent decoder of the checkpoint, or of a folder exported ``--with-decoder``."""
        if self.decoder is None:
            if self.decoder_source is None:
                raise ValueError(
                    "explain: this embedder was built without a checkpoint or folder to read a decoder from"
                )
            kind, where = self.decoder_source
            if kind == "checkpoint":
                from lame_pl.export import decoder_from_checkpoint
                from lame_pl.model import text_config

                hidden = text_config(self.encoder.backbone).hidden_size
                decoder = decoder_from_checkpoint(read_checkpoint(where), hidden)
            else:
                from lame_pl.export import read_decoder

                decoder = read_decoder(where)
            self.decoder = decoder.eval().to(self.device)
        return self.decoder

    @torch.inference_mode()
    def explain(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence[ImageInput] | None = None,
        instructions: str | Sequence[str] | None = None,
        max_tokens: int = 32,
        batch_size: int = 32,
    ) -> list[str]:
        """The text the latent decoder writes from each row's K reason states (greedy).

        The decoder was trained to regenerate a query's target from those states alone, so this
        reads what the bottleneck carries. Arguments as ``encode``.

        Returns:
            One text a row.
        """
        from lame_pl.latent_text import decode_reason_states

        if not self.encoder.settings.has_reason_states:
            raise ValueError(
                f"explain: encode_mode {self.encode_mode!r} with K = {self.num_reason_tokens} yields no reason states "
                "(a model with K > 0, encoded in lame or latent_sequential, has them)"
            )
        decoder = self.load_decoder()
        rows = self.sides(texts, images, instructions)
        out: list[str] = []
        for start in range(0, len(rows), batch_size):
            inputs = {k: v.to(self.device) for k, v in self.prompts(rows[start : start + batch_size]).items()}
            states = self.encoder(**inputs).reason_states
            out += decode_reason_states(decoder, self.processor.tokenizer, states, max_tokens)
        return out
