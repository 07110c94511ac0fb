"""``model.init_from``: a run that starts from another checkpoint's weights (not its optimiser)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lame_pl.checkpoint import DECODER_OUTPUT_IDS, load_checkpoint_file
from lame_pl.losses import MAX_LOGIT_SCALE


def load_init_weights(module: nn.Module, path: str) -> None:
    """Loads a checkpoint's model weights into ``module`` (a ``LaMEModule``) and reports what did not match.

    Raises:
        ValueError: When no key of the checkpoint matches the module.
    """
    # weights_only: a user-given file must not run code. This project's checkpoints load so
    # (their specs are registered as safe globals in lame_pl.backbone and lame_pl.stages).
    checkpoint = load_checkpoint_file(path, "model.init_from")  # one line naming a damaged file
    state = dict(checkpoint["state_dict"])
    # The decoder's output ids are a setting of this run (decoder.vocab_file), not a weight to take over.
    if module.decoder is not None and module.decoder.restricted:
        state[DECODER_OUTPUT_IDS] = module.decoder.output_ids
    else:
        state.pop(DECODER_OUTPUT_IDS, None)
    _choose_temperature(module, path, checkpoint, state)
    result = module.load_state_dict(state, strict=False)
    rank_zero_info(f"init_from {path}: loaded {len(state) - len(result.unexpected_keys)} tensors")
    if result.missing_keys:
        rank_zero_warn(f"init_from {path}: {len(result.missing_keys)} missing keys: {result.missing_keys[:10]}")
    if result.unexpected_keys:
        rank_zero_warn(
            f"init_from {path}: {len(result.unexpected_keys)} unexpected keys: {result.unexpected_keys[:10]}"
        )
    if len(result.unexpected_keys) == len(state):
        raise ValueError(f"init_from {path}: no key of the checkpoint matches this model")


def _choose_temperature(module: nn.Module, path: str, checkpoint: Mapping[str, Any], state: dict[str, Any]) -> None:
    """Decides between the configured temperature and ``init_from``'s, and says so when they differ.

    A temperature the checkpoint learned (its ``log_logit_scale`` differs from its own
    configured one) is kept when this run learns the temperature too: stage 2 goes on from
    stage 1's. Otherwise the run trains with the temperature its config shows.
    """
    saved = state.get("log_logit_scale")
    if saved is None:
        return
    configured = float(module.hparams.temperature)
    theirs = 1.0 / min(float(saved.float().reshape(-1)[0].exp()), MAX_LOGIT_SCALE)
    if math.isclose(theirs, configured, rel_tol=1e-5):
        return
    their_config = (checkpoint.get("hyper_parameters") or {}).get("temperature")
    learned = their_config is not None and not math.isclose(theirs, float(their_config), rel_tol=1e-5)
    if learned and module.hparams.learnable_temperature:
        rank_zero_info(
            f"init_from: temperature {configured:g} from the config replaced by {theirs:.4g} learned in {path}"
        )
        return
    state["log_logit_scale"] = module.log_logit_scale.detach().clone()  # this run's, loaded as any other key
    origin = "learned" if learned else "configured"
    rank_zero_info(
        f"init_from: temperature {configured:g} from the config kept, not {theirs:.4g} {origin} "
        f"in {path}" + (" (model.learnable_temperature is false)" if learned else "")
    )
