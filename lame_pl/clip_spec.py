"""Which open_clip dual encoder the CLIP anchor is, and its tokenizer and image transform, offline.

One ``CLIPSpec`` names an open_clip architecture (random init) or a local weights file, with
optional changes to the architecture's config (a smaller demo model). The model, the datamodule
and the evaluators build the model, the tokenizer and the image transform from the same spec,
so that training and evaluation see the same inputs. Nothing is ever downloaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Small built-in architectures, named in the error for an unknown one.
SMALL_ARCHES = ("ViT-S-32", "ViT-S-16", "ViT-M-32", "ViT-B-32", "RN50")
# Keys of an open_clip model config that the model constructor does not take.
_NOT_CONSTRUCTOR_KEYS = ("custom_text",)


@dataclass
class CLIPSpec:
    """An open_clip architecture, its changes and its weights.

    Args:
        arch: A built-in open_clip architecture name (``open_clip.list_models()``), e.g. ``ViT-B-32``.
        weights: A local open_clip or OpenAI state dict (``.pt``, ``.bin`` or ``.safetensors``,
            read with ``weights_only``); ``None`` initialises at random.
        overrides: Changes to the architecture's config, merged key by key into it (a nested
            dict such as ``vision_cfg`` changes only the keys it gives), e.g. ``{embed_dim: 128,
            vision_cfg: {layers: 2, width: 128}}``.
        image_size: Image side in pixels; ``None`` keeps the architecture's.
        context_length: Most text tokens, start and end included; ``None`` keeps the architecture's.
    """

    arch: str = "ViT-B-32"
    weights: str | None = None
    overrides: dict[str, Any] | None = None
    image_size: int | None = None
    context_length: int | None = None

    def __post_init__(self) -> None:
        import open_clip

        if open_clip.get_model_config(self.arch) is None or ":" in self.arch:
            raise ValueError(
                f"backbone.arch {self.arch!r} is not a built-in open_clip architecture; small ones: "
                f"{', '.join(SMALL_ARCHES)} (all: open_clip.list_models())"
            )
        if self.weights is not None and not Path(self.weights).is_file():
            raise FileNotFoundError(f"backbone.weights {self.weights!r} is not a file")
        for key, value in (("image_size", self.image_size), ("context_length", self.context_length)):
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"backbone.{key} must be an integer >= 2, got {value!r}")
        base = open_clip.get_model_config(self.arch)
        unknown = sorted(set(self.overrides or {}) - set(base))
        if unknown:
            raise ValueError(
                f"backbone.overrides has keys {unknown} that {self.arch}'s config lacks; it has {sorted(base)}"
            )

    def model_config(self) -> dict[str, Any]:
        """The architecture's open_clip config with ``overrides``, ``image_size`` and ``context_length`` applied."""
        import open_clip

        config = _merged(open_clip.get_model_config(self.arch), self.overrides or {})
        if self.image_size is not None:
            config["vision_cfg"]["image_size"] = self.image_size
        if self.context_length is not None:
            config["text_cfg"]["context_length"] = self.context_length
        return config

    @property
    def image_side(self) -> int:
        """The side of the square images the vision tower takes."""
        size = self.model_config()["vision_cfg"]["image_size"]
        return size if isinstance(size, int) else int(size[0])

    @property
    def text_length(self) -> int:
        """Most text tokens per text (the text tower's context length)."""
        return int(self.model_config()["text_cfg"].get("context_length", 77))


# Checkpoints written outside LightningCLI keep the spec in their hyper-parameters.
torch.serialization.add_safe_globals([CLIPSpec])


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_clip(spec: CLIPSpec) -> torch.nn.Module:
    """The open_clip model of ``spec`` in float32 on the CPU, in train mode.

    Raises:
        ValueError: When the architecture cannot be built offline or the weights do not load into it.
    """
    import open_clip

    config = spec.model_config()
    kwargs = {k: v for k, v in config.items() if k not in _NOT_CONSTRUCTOR_KEYS}
    try:
        # The whole config goes in as keyword arguments, the highest-priority override in
        # create_model; no base tower is ever fetched (pretrained_image/text False).
        model = open_clip.create_model(
            spec.arch,
            pretrained=spec.weights,
            pretrained_image=False,
            pretrained_text=False,
            force_custom_text=bool(config.get("custom_text", False)),
            **kwargs,
        )
    except (OSError, RuntimeError, ValueError) as error:
        # One line: torch's state-dict report spans several (missing keys, unexpected keys, sizes).
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        first = text if len(text) <= 300 else text[:297] + "..."
        if spec.weights:
            raise ValueError(
                f"backbone.weights {spec.weights!r} do not load into {spec.arch} as configured: {first}"
            ) from None
        raise ValueError(f"backbone.arch {spec.arch!r} could not be built offline: {first}") from None
    return model.train()


def build_tokenizer(spec: CLIPSpec) -> Any:
    """open_clip's tokenizer of the architecture (its bundled BPE vocabulary), cut at ``spec.text_length``."""
    import open_clip

    try:
        return open_clip.get_tokenizer(spec.arch, context_length=spec.text_length)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"backbone.arch {spec.arch!r}: its tokenizer could not be built offline ({error})") from None


def build_transform(spec: CLIPSpec) -> Any:
    """open_clip's evaluation transform (resize, centre crop, normalise) at the model's image size.

    Training uses it too, as LaME's demo trains without augmentation.
    """
    import open_clip

    return open_clip.image_transform(spec.image_side, is_train=False)
