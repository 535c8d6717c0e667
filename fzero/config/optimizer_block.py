"""The ``optimizer`` block of ``fzero.Config``: AdamW's hyperparameters, DeepSpeed's defaults.

Field names and defaults are DeepSpeed's unless a docstring says otherwise; ``validate(path)``
checks ranges within the block and names the JSON path of a bad key (checks across blocks:
``validate.py``). Fields typed ``... | Auto`` hold the string ``"auto"`` until ``Config.resolve``
replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.config.parse import NESTED_PARAMS, Auto
from fzero.config.ranges import check_at_least
from fzero.errors import ConfigError

# DeepSpeed's optimizer defaults for Adam and AdamW: its engine builds FusedAdam
# (deepspeed/ops/adam/fused_adam.py: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
# bias_correction true), or with "torch_adam": true torch.optim.AdamW, whose weight_decay
# default is 0.01 (deepspeed/runtime/engine.py, _configure_basic_optimizer).
FUSED_ADAM_WEIGHT_DECAY = 0.0
TORCH_ADAMW_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class OptimizerConfig:
    """The ``optimizer`` block: Adam with decoupled weight decay (AdamW).

    As in DeepSpeed, ``"Adam"`` means AdamW unless ``adam_w_mode`` is false (L2-coupled Adam,
    which fzero does not offer); ``"AdamW"`` is AdamW whatever ``adam_w_mode`` says. Type names
    are case-insensitive. Defaults are DeepSpeed's for the same block: ``weight_decay`` 0 (its
    FusedAdam), or 0.01 with ``torch_adam`` (torch's AdamW). ``torch_adam`` changes nothing else:
    fzero's fused AdamW computes torch's update. ``bias_correction: false`` drops Adam's
    ``1 - beta**step`` corrections, as FusedAdam does.
    """

    type: str = "AdamW"
    lr: float | Auto = 1e-3
    betas: tuple[float, float] | Auto = (0.9, 0.999)
    eps: float | Auto = 1e-8
    weight_decay: float | Auto | None = None  # None: DeepSpeed's default for this block
    adam_w_mode: bool = True
    torch_adam: bool = False
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", self.default_weight_decay)

    @property
    def default_weight_decay(self) -> float:
        return TORCH_ADAMW_WEIGHT_DECAY if self.torch_adam else FUSED_ADAM_WEIGHT_DECAY

    def validate(self, path: str = "optimizer") -> None:
        kind = self.type.lower()
        if kind not in ("adamw", "adam"):
            raise ConfigError(
                f"{path}.type", f"unsupported optimizer {self.type!r}; fzero implements Adam, AdamW"
            )
        if kind == "adam" and not self.adam_w_mode:
            raise ConfigError(
                f"{path}.params.adam_w_mode",
                "unsupported: L2-coupled Adam is not implemented; remove it to get AdamW",
            )
        check_at_least(f"{path}.params.lr", self.lr, 0)
        if self.betas != "auto" and (
            len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas)
        ):
            raise ConfigError(
                f"{path}.params.betas", f"need two values in [0, 1), got {list(self.betas)}"
            )
        if self.eps != "auto" and not self.eps > 0:
            raise ConfigError(f"{path}.params.eps", f"must be > 0, got {self.eps}")
        check_at_least(f"{path}.params.weight_decay", self.weight_decay, 0)


NESTED_PARAMS[OptimizerConfig] = "params"
